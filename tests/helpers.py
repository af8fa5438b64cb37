"""Builders and constants the test modules share. No test module imports another
(tests/test_layering.py): what several use lives here, their fixtures in conftest.py.

Importing this module stays cheap, since conftest.py imports it in every run: the library is
imported inside the builders, and ``MODEL`` and ``EVAL_CFG``, whose classes' modules load torch
and megatron-core (seconds), are made on first use (the module's ``__getattr__``), once."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

if TYPE_CHECKING:
    import torch

    from palm.eval.evaluate import EvaluateConfig
    from palm.model.network import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@functools.cache
def _tiny_model() -> ModelConfig:
    from palm.model.network import ModelConfig

    return ModelConfig(vocab_size=400, d_model=32, n_layers=2, n_heads=2, head_dim=16, seq_len=128)


@functools.cache
def _eval_cfg() -> EvaluateConfig:
    from palm.eval.evaluate import EvaluateConfig

    return EvaluateConfig(prompts=6, max_new_tokens=10, batch_size=4, pairs=8, windows=3, replies=4, samples=3,
                          min_prompts=3)


def __getattr__(name: str):
    """``MODEL``: the tiny PaLM of the fine-tuning tests; ``EVAL_CFG``: the evaluate tests' config."""
    made = {"MODEL": _tiny_model, "EVAL_CFG": _eval_cfg}.get(name)
    if made is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return made()


# ---- processes, servers, project copies --------------------------------------------------------

def run_stage_cli(stage: str, args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600):
    """Run ``python -m stages.<stage>`` in ``cwd`` (a project copy) and return the result."""
    full_env = {**os.environ, "PYTHONPATH": str(cwd), **(env or {})}
    return subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# ---- ports ----
# free_port() gives a port nothing uses *now*; the process it is for binds it seconds later, and
# meanwhile something else can take it: another pytest-xdist worker's server, or any process's
# outgoing connection, whose local port the kernel draws from its ephemeral range
# (net.ipv4.ip_local_port_range, 32768-60999 by default), where bind(port 0) draws too. So the
# ports come from below that range, at random from a block of each xdist worker's own; and what
# starts a process on them goes through on_free_ports, which starts it again on fresh ports when
# it failed because a port was taken (a program outside the tests may still hold one): its log
# says so (PortTaken). A CI run once failed 4 tests of test_serve.py at setup on such a port.

T = TypeVar("T")
PORT_TAKEN = re.compile(r"already in use|EADDRINUSE|Errno 98|Connection in use", re.IGNORECASE)
_ports = random.Random()  # its own generator: a test seeding `random` leaves the ports alone


class PortTaken(RuntimeError):
    """A process started on a port from :func:`free_port` failed because something took the port
    meanwhile (its log says so); what it started is stopped. :func:`on_free_ports` retries."""


def _port_block() -> range:
    """This xdist worker's ports: below the kernel's ephemeral range, split between the workers
    (empty when there is no room: then the kernel picks)."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    low, high = 20000, min(ephemeral, 32768)
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0) % workers
    size = (high - low) // workers
    return range(low + worker * size, low + (worker + 1) * size) if size >= 200 else range(0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses (free when this returns: nothing listens on it,
    no connection holds it), from this worker's block of ports (see above). A process that is to
    listen on it is started through :func:`on_free_ports`."""
    block = _port_block()
    for port in [_ports.choice(block) for _ in range(100)] if block else []:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use
                continue
            return port
    with socket.socket() as s:  # no room below the ephemeral range: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_taken(*logs: Path | str) -> bool:
    """Whether one of these logs (files, or texts) says a port was already in use."""
    for log in logs:
        if isinstance(log, Path):
            log = log.read_text(errors="replace") if log.is_file() else ""
        if PORT_TAKEN.search(log):
            return True
    return False


def on_free_ports(start: Callable[..., T], count: int = 1, tries: int = 5) -> T:
    """``start(*ports)`` with ``count`` distinct ports from :func:`free_port`, and what it returns;
    while it raises :class:`PortTaken` (having stopped what it started), again with fresh ports,
    up to ``tries`` times in all."""
    for attempt in range(1, tries + 1):
        ports: list[int] = []
        while len(ports) < count:
            if (port := free_port()) not in ports:
                ports.append(port)
        try:
            return start(*ports)
        except PortTaken as err:
            if attempt == tries:
                raise
            print(f"note: {str(err)[:400]}; again on other ports", file=sys.stderr)
    raise AssertionError("unreachable")


def launch(argv: list[str], url: str, log: Path, env: dict | None = None, timeout_s: float = 300,
           cwd: Path | None = None) -> subprocess.Popen:
    """A server process (a session of its own, so that killing its group ends its workers too),
    returned once ``url``/health answers. If it exits or its deadline passes first, its group is
    SIGKILLed and the error raised: :class:`PortTaken` when its log says its port was taken."""
    from pipelines.servers import wait_healthy

    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
    try:
        wait_healthy(url, proc, log, timeout_s)
    except BaseException as err:
        kill_group(proc)
        if isinstance(err, Exception) and port_taken(log):
            raise PortTaken(f"{argv[:4]} could not bind its port: {err}") from err
        raise
    return proc


@contextlib.contextmanager
def server(argv: list[str], url: str, log: Path, env: dict | None = None, timeout_s: float = 300):
    """:func:`launch` as a context: the server's group is SIGKILLed at the end if still alive.
    On a port of :func:`free_port`, it is entered inside :func:`on_free_ports` (e.g.
    :func:`prefect_server`)."""
    proc = launch(argv, url, log, env, timeout_s)
    try:
        yield proc
    finally:
        kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def command(proc) -> str:
    """A psutil process's command line, or "" when it ended meanwhile."""
    import psutil

    try:
        return " ".join(proc.cmdline())
    except psutil.Error:  # ended meanwhile
        return ""


@contextlib.contextmanager
def prefect_server(home: Path):
    """A real ``prefect server start`` (its SQLite database under ``home``; no UI, which the
    tests using it do not open) that this process's Prefect client talks to until the end.

    Not Prefect's ``prefect_test_harness``: its start-up asks ``/health`` with a 5 s read timeout
    and gives up at the first timeout, leaving the server process behind; on a loaded 2-core CI
    machine the server's first answer can take longer. :func:`pipelines.serve.wait_healthy` asks
    again until its deadline."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.serve import ServeConfig, api_url, prefect_env, server_command

    with contextlib.ExitStack() as stack:
        def start(port: int) -> str:
            cfg = ServeConfig(port=port)
            env = {**os.environ, **prefect_env(home, cfg), "PREFECT_UI_ENABLED": "false"}
            stack.enter_context(server(server_command(cfg), api_url(cfg), home / "prefect-server.log", env=env))
            return api_url(cfg)

        url = on_free_ports(start)
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: url}))
        yield url
        _drain_prefect_workers()


def _drain_prefect_workers() -> None:
    """Send what Prefect's log and event workers still hold before their server goes away (they
    would retry it at exit otherwise)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)


def make_project(dst: Path, git: bool = True) -> Path:
    """A copy of the project's tracked files (no data, no venv) in ``dst``, as a git + DVC repo,
    with ``.venv`` linked so the DVC stage commands find the interpreter."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if not src.is_file() or rel.startswith(("tests/", "benchmarks/")):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / rel)
    venv = Path(sys.prefix)
    (dst / ".venv").symlink_to(venv)
    if git:
        commit(dst)
    return dst


def commit(root: Path) -> None:
    """Make ``root`` a git repository (if it is not one) and commit everything in it."""
    run = lambda *a: subprocess.run(a, cwd=root, check=True, capture_output=True)  # noqa: E731
    if not (root / ".git").exists():
        run("git", "init", "-q")
    run("git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy")


def set_params(root: Path, **sections) -> None:
    """Merge ``sections`` into the sections of ``root/params.yaml``."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    for name, values in sections.items():
        params[name] = {**params[name], **values}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def metrics(root: Path, name: str) -> dict:
    """A stage's ``reports/<name>/metrics.json``."""
    return json.loads((root / "reports" / name / "metrics.json").read_text())


def full(p: "torch.Tensor", like: "torch.nn.Parameter") -> "torch.Tensor":
    """The whole tensor of a TP-sharded parameter (gathered along its partition dim), in a worker
    process of the parallel tests (tests/dist/)."""
    import torch
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(like, "tensor_model_parallel", False):
        return p.detach().float().clone()
    parts = [torch.empty_like(p) for _ in range(tp)]
    torch.distributed.all_gather(parts, p.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=like.partition_dim).float()


# ---- weights -----------------------------------------------------------------------------------

def redraw_weights(model, seed: int = 1234) -> None:
    """Overwrite a whole single-process PaLM's weights so that every part of it matters.

    PaLM's own init (N(0,1) embedding, 0.02 projections, unit norm gains) makes the blocks a small
    correction to the embedding: greedy decoding then just repeats the last token, and a norm gain
    read wrongly (e.g. as gain - 1) is invisible. Here projections ``[out, in]`` are
    N(0, 4/fan_in), so attention and MLP move the residual more than the embedding does (with
    1/fan_in greedy decoding still repeated the last token), and norm gains vary around 1.
    Used by the reference tests (test_reference.py, test_palm_rlhf_pytorch.py).
    """
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                new = 1.0 + 0.3 * torch.randn(p.shape, generator=g)
            elif name == "embedding.weight":
                new = torch.randn(p.shape, generator=g)
            else:
                new = 2.0 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
            p.copy_(new.to(p.dtype))


# ---- a pydoc-like corpus and a tiny tokenizer --------------------------------------------------

PAGES = {  # pydoc pages as the scrape stage extracts them: a "Functions" section, entries in one line
    "json": "json (version 2.0.9) index Module Reference\nJSON is a lightweight data interchange format.\n"
            "Functions\n"
            "dump(obj, fp, *, indent=None) Serialize ``obj`` as a JSON formatted stream to ``fp``. "
            "``default(obj)`` is a function that should return a serializable version of obj. "
            "dumps(obj, *, indent=None) Serialize ``obj`` to a JSON formatted ``str``. See help(type(self)) for more. "
            "load(fp, *, cls=None) Deserialize ``fp`` to a Python object. "
            "loads(s, *, cls=None) Deserialize ``s`` (a ``str`` instance) to a Python object. "
            "Also see dump(obj, fp) Which writes to a file.\n"
            "Data\n__all__ = ['dump', 'dumps', 'load', 'loads']",
    "textwrap": "textwrap index Module Reference\nText wrapping and filling.\n"
                "Classes\nclass TextWrapper(builtins.object)\n"
                "Functions\n"
                "dedent(text) Remove any common leading whitespace from every line in `text`. "
                "fill(text, width=70, **kwargs) Fill a single paragraph of text, returning a new string. "
                "wrap(text, width=70, **kwargs) Wrap a single paragraph of text, returning a list of wrapped lines.",
    "math": "math index Module Reference\nMathematical functions.\nFunctions\n"
            "sqrt(x, /) Return the square root of x as a float value. floor(x, /) Return the floor of x.",
}
TEXT = "\n".join(PAGES.values()) + "\nHow are you? I am fine, thank you. What does it do? It works well.\n" * 3


def pydoc_corpus(folder: Path) -> Path:
    from palm.data.corpus import write_corpus

    rows = [{"url": f"http://127.0.0.1:8000/{m}.html", "title": f"Pydoc: module {m}", "text": t,
             "sha1": hashlib.sha1(t.encode()).hexdigest(), "fetched_at": "2026-01-01T00:00:00Z", "source": "pydoc"}
            for m, t in PAGES.items()]
    folder.mkdir(parents=True, exist_ok=True)
    write_corpus(rows, folder)
    return folder


def make_tokenizer(folder: Path, vocab: int = 400) -> Path:
    from palm.core.tokenizer import TokenizerConfig, train_tokenizer

    tok = train_tokenizer(iter([TEXT] * 4), TokenizerConfig(vocab_size=vocab, min_frequency=1), progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def chat_project(tmp: Path, **sections) -> Path:
    """A project copy with the pydoc-like corpus and a tiny tokenizer, for the chat data stages."""
    root = make_project(tmp)
    pydoc_corpus(root / "data" / "corpus")
    make_tokenizer(root / "artifacts" / "tokenizer")
    set_params(root, model={"seq_len": 128}, **sections)
    return root


# ---- inputs of the fine-tuning tests (SFT, reward, PPO): chat data made by the real data stages'
# library from the pydoc-like corpus and the tiny tokenizer, and a parent "export" of a tiny
# randomly initialised PaLM in the exact format the pretrain stage writes -------------------------

def finetune_project(tmp: Path, seq_len: int = 128, **sections) -> Path:
    """A project copy with the pydoc-like corpus, a tiny tokenizer and a tiny randomly initialised
    parent in models/pretrain (``MODEL`` at ``seq_len``), ``sections`` merged into its params."""
    root = make_project(tmp)
    pydoc_corpus(root / "data" / "corpus")
    make_tokenizer(root / "artifacts" / "tokenizer")
    model = _tiny_model()
    make_parent(root / "models" / "pretrain", root / "artifacts" / "tokenizer",
                model if seq_len == model.seq_len else type(model)(**{**model.__dict__, "seq_len": seq_len}))
    set_params(root, model={"seq_len": seq_len}, **sections)
    return root


def policy_project(tmp: Path, git: bool = True) -> Path:
    """A project copy with the pydoc-like corpus, a tiny tokenizer, ``data/sft`` built from them and a
    tiny policy in ``models/sft``: what the ppo stage starts from (its reward model is the caller's)."""
    from palm.data.chat import ChatDataConfig, build_chat_data

    root = make_project(tmp, git=git)
    corpus = pydoc_corpus(root / "data" / "corpus")
    tok = make_tokenizer(root / "artifacts" / "tokenizer")
    (root / "data" / "sft").mkdir(parents=True)
    build_chat_data("sft", ChatDataConfig(valid_fraction=0.3, seed=5), corpus=corpus, tokenizer=tok,
                    seq_len=_tiny_model().seq_len, out=root / "data" / "sft")
    make_parent(root / "models" / "sft", tok)
    return root


def chat_data(root: Path, *, seq_len: int = 128, path: str = "default", valid_fraction: float = 0.3) -> dict:
    """``root/{corpus,tokenizer,sft,prefs}``; returns the paths and the tokenizer's sha256."""
    from palm.core.tokenizer import sha256_file
    from palm.data.chat import ChatDataConfig, build_chat_data

    corpus = pydoc_corpus(root / "corpus")
    tok = make_tokenizer(root / "tokenizer")
    out = {"corpus": corpus, "tokenizer": tok, "sha": sha256_file(tok / "tokenizer.json")}
    for kind in ("sft", "prefs"):
        folder = out[kind] = root / kind
        folder.mkdir(parents=True)
        build_chat_data(kind, ChatDataConfig(path=path, valid_fraction=valid_fraction, seed=5), corpus=corpus,
                        tokenizer=tok, seq_len=seq_len, out=folder)
    return out


def make_parent(out: Path, tokenizer: Path, model: ModelConfig | None = None, seed: int = 11) -> Path:
    """A tiny PaLM export (model.safetensors, config.json, tokenizer.json) as pretrain writes it
    (``model``: ``MODEL`` unless given)."""
    from palm.core.config import to_dict
    from palm.core.tokenizer import sha256_file
    from palm.model import parallel
    from palm.model.network import PaLM
    from palm.model.weights import export_safetensors

    model = _tiny_model() if model is None else model
    parallel.init_distributed()
    try:
        net = PaLM(model, seed=seed)
        export_safetensors(net, out, {"model": to_dict(model), "tokenizer_sha256": sha256_file(tokenizer / "tokenizer.json"),
                                      "step": 0, "format": "palm-rlhf/1"})
    finally:
        parallel.teardown()
    shutil.copy2(tokenizer / "tokenizer.json", out / "tokenizer.json")
    return out


def chat_export(out: Path, tokenizer: Path, *, kind: str = "ppo", seed: int = 3, redraw: int = 5) -> Path:
    """A tiny chat export (``MODEL``, kind ``kind``) whose weights are redrawn (:func:`redraw_weights`
    with seed ``redraw``) so that its replies are varied text, unlike PaLM's own init; another
    ``redraw`` seed makes another model with the same tokenizer."""
    make_parent(out, tokenizer, seed=seed)
    from palm.model.network import PaLM
    from palm.model.parallel import process_groups
    from palm.model.weights import export_safetensors

    config = json.loads((out / "config.json").read_text())
    with process_groups():
        net = PaLM(_tiny_model(), seed=seed)
        redraw_weights(net, seed=redraw)
        export_safetensors(net, out, {**config, "kind": kind})
    return out


def make_reward(out: Path, tokenizer: Path, model: ModelConfig | None = None, seed: int = 13, mean: float = 0.0,
                std: float = 1.0) -> Path:
    """A tiny reward-model export (PaLM + scalar head, randomly initialised) as the reward stage
    writes it, with its reward mean and std in config.json (``model``: ``MODEL`` unless given)."""
    from palm.core.config import to_dict
    from palm.core.tokenizer import sha256_file
    from palm.model import parallel
    from palm.model.reward import RewardModel
    from palm.model.weights import export_safetensors

    model = _tiny_model() if model is None else model
    parallel.init_distributed()
    try:
        net = RewardModel(model, seed=seed)
        export_safetensors(net, out, {"model": to_dict(model), "tokenizer_sha256": sha256_file(tokenizer / "tokenizer.json"),
                                      "step": 0, "format": "palm-rlhf/1", "kind": "reward",
                                      "reward": {"mean": mean, "std": std, "sequences": 0}})
    finally:
        parallel.teardown()
    shutil.copy2(tokenizer / "tokenizer.json", out / "tokenizer.json")
    return out


# ---- the evaluate stage's inputs (test_evaluate.py, test_registry.py) --------------------------

EVALUATE_ARGS = ["--pretrain", "models/pretrain", "--sft", "models/sft", "--ppo", "models/ppo", "--reward",
                 "models/reward", "--sft-data", "data/sft", "--prefs", "data/prefs", "--tokens", "data/tokens",
                 "--curves", "reports/pretrain/curve.csv", "reports/sft/curve.csv",
                 "--report", "reports/evaluate/report.html", "--plots", "reports/evaluate/plots",
                 "--champion-hf", "models/champion-hf"]


def with_kind(folder: Path, kind: str, **extra) -> Path:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "kind": kind, **extra}))
    return folder


def make_eval_reward(out: Path, tokenizer: Path, seed: int = 5) -> Path:
    """The evaluate tests' reward-model export (``MODEL``; reward mean 0.1, std 0.5)."""
    from palm.core.config import to_dict
    from palm.core.tokenizer import sha256_file
    from palm.model import parallel
    from palm.model.parallel import process_groups
    from palm.model.reward import RewardModel
    from palm.model.weights import export_safetensors

    model = _tiny_model()
    with process_groups():
        net = RewardModel(model, parallel.megatron_config(model), seed=seed)
        export_safetensors(net, out, {"model": to_dict(model), "kind": "reward", "format": "palm-rlhf/1",
                                      "tokenizer_sha256": sha256_file(tokenizer / "tokenizer.json"), "step": 0,
                                      "reward": {"mean": 0.1, "std": 0.5}})
    shutil.copy2(tokenizer / "tokenizer.json", out / "tokenizer.json")
    return out


def make_tokens(out: Path, tokenizer: Path, texts: list[str] | None = None) -> Path:
    """Token shards as the tokenize stage writes them, of ``texts`` (default: the test corpus' lines),
    one document each, in both splits."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from palm.core.tokenizer import load_tokenizer, sha256_file

    tok = load_tokenizer(tokenizer / "tokenizer.json")
    eod = tok.token_to_id("<|endoftext|>")
    out.mkdir(parents=True)
    texts = texts if texts is not None else [line for line in TEXT.splitlines() if line.strip()]
    docs = [tok.encode(text).ids + [eod] for text in texts]
    for split in ("train", "valid"):
        builder = IndexedDatasetBuilder(str(out / f"{split}.bin"), dtype=np.uint16)
        for ids in docs:
            builder.add_document(torch.tensor(ids, dtype=torch.int64).to(torch.uint16), [len(ids)])
        builder.finalize(str(out / f"{split}.idx"))
    (out / "meta.json").write_text(json.dumps({"tokenizer_sha256": sha256_file(tokenizer / "tokenizer.json"),
                                               "vocab_size": tok.get_vocab_size(), "eod_id": eod,
                                               "dtype": "uint16"}))
    return out


# ---- tiny token shards for the pretrain tests: megatron ``IndexedDatasetBuilder`` + ``meta.json``.
# The documents follow simple rules (counting runs in a small vocabulary), so a few training steps
# already beat the unigram baseline. ---------------------------------------------------------------

SHARDS_VOCAB, SHARDS_EOD = 64, 0
SHARDS_SHA = "ab" * 32  # the tokenizer sha256 the shards claim


def make_shards(out: Path, *, docs: int = 120, seed: int = 0, sha: str = SHARDS_SHA) -> Path:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", docs), ("valid", max(4, docs // 10))):
        builder = IndexedDatasetBuilder(str(out / f"{split}.bin"), dtype=np.uint16)
        for _ in range(n):
            start, step = int(rng.integers(1, SHARDS_VOCAB)), int(rng.integers(1, 4))
            length = int(rng.integers(40, 120))
            ids = [1 + (start + i * step) % (SHARDS_VOCAB - 1) for i in range(length)] + [SHARDS_EOD]
            builder.add_document(torch.from_numpy(np.asarray(ids, dtype=np.uint16)), [len(ids)])
        builder.finalize(str(out / f"{split}.idx"))
    (out / "meta.json").write_text(json.dumps(
        {"tokenizer_sha256": sha, "vocab_size": SHARDS_VOCAB, "eod_id": SHARDS_EOD, "dtype": "uint16"}))
    return out


TINY_PRETRAIN = {
    "model": {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "head_dim": 16, "seq_len": 32},
    "pretrain": {"train_steps": 12, "micro_batch_size": 4, "num_microbatches": 2, "dtype": "fp32",
                 "log_interval": 4, "eval_interval": 4, "eval_batches": 2, "checkpoint_interval": 4,
                 "optim": {"lr": 0.01, "min_lr": 0.001, "warmup_steps": 2}},
}
PRETRAIN_ARGS = ["--tokens", "data/tokens", "--tokenizer", "artifacts/tokenizer",
                 "--checkpoints", "checkpoints/pretrain", "--out", "models/pretrain"]


def pretrain_project(tmp: Path, **overrides) -> Path:
    """A project copy with a stand-in tokenizer, tiny shards and ``TINY_PRETRAIN`` (each section
    updated by ``overrides``) in params.yaml, for the pretrain stage."""
    root = make_project(tmp)
    tok = root / "artifacts" / "tokenizer"
    tok.mkdir(parents=True)
    (tok / "tokenizer.json").write_text('{"a tokenizer": "for tests"}')
    sha = hashlib.sha256((tok / "tokenizer.json").read_bytes()).hexdigest()
    (tok / "meta.json").write_text(json.dumps({"sha256": sha, "vocab_size": 64, "eod_id": 0}))
    make_shards(root / "data" / "tokens", sha=sha)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in TINY_PRETRAIN.items():
        params[section] = {**params[section], **values, **overrides.get(section, {})}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


# --- make serve on a project copy (tests/test_serve.py, tests/test_security_servers.py) ---------------

SERVE_WORDS = "river stone cloud lantern garden copper violin meadow harbor pepper signal orbit velvet candle".split()


def serve_cli(root: Path, *args: str, **kwargs) -> subprocess.Popen:
    """``python -m pipelines.serve ARGS`` (what ``make serve`` / ``make stop`` run) in ``root``: the
    runner looks for runs every 2 s instead of 10; the project's own MLflow store and Prefect
    server, whatever an earlier test in this process pointed the environment at."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING_URI"))}
    env.update(PYTHONPATH=str(root), PREFECT_RUNNER_POLL_FREQUENCY="2")
    return subprocess.Popen([sys.executable, "-m", "pipelines.serve", *args], cwd=root, env=env, text=True, **kwargs)


def start_serve(base: Path, docs: int, **serve: Any) -> tuple[Path, str, subprocess.Popen, Path]:
    """``make serve`` of a project copy under ``base`` whose scrape reads ``docs`` small text files
    and whose ``serve`` section gets ``serve`` (a free port, until scrape by default); returns
    (root, API url, the serve process, its output file) once it serves the deployment. Started
    again, on a fresh copy and port, when its port was taken (:func:`on_free_ports`)."""
    import random

    import pytest

    from pipelines.serve import HOME

    folder = base / "docs"
    folder.mkdir()
    rng = random.Random(0)
    for i in range(docs):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(SERVE_WORDS) for _ in range(400)) + "\n")
    out = base / "serve.out"

    def start(port: int) -> tuple[Path, str, subprocess.Popen, Path]:
        root = base / "project"
        if root.exists():  # an earlier try's, whose port was taken
            shutil.rmtree(root)
        root = make_project(root, git=False)
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["scrape"].update(source="files", files_path=str(folder), tasks=1, workers=1)
        params["serve"].update({"until": "scrape", "port": port, "startup_timeout_s": 300.0, **serve})
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        commit(root)
        url = f"http://127.0.0.1:{params['serve']['port']}/api"
        with out.open("w") as f:
            proc = serve_cli(root, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 360  # a loaded CI machine
        while "serving deployment" not in out.read_text():
            if proc.poll() is not None and port_taken(out.read_text(), root / HOME / "server.log"):
                raise PortTaken(f"make serve on port {port}: {out.read_text().strip()[-300:]}")
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"make serve did not come up (exit {proc.poll()}):\n{out.read_text()}")
            time.sleep(0.5)
        return root, url, proc, out

    return on_free_ports(start)


def stop_serve(root: Path, proc: subprocess.Popen) -> None:
    """``make stop`` for a serve a test left running."""
    if proc.poll() is None:
        serve_cli(root, "--stop").wait(timeout=120)
        proc.wait(timeout=30)


class FeedbackPage:
    """``palm feedback <args>`` (serve or compare) as a user starts it, on any free port: ``url``,
    the address it prints with the session's key; ``base``, without it; ``key``."""

    def __init__(self, *args: str):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "palm.apps.cli", "feedback", *args, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        line = self.proc.stdout.readline()
        assert line.startswith("open http://127.0.0.1:"), line + self.proc.stderr.read()[-2000:]
        self.url = line.split()[1]
        self.base, self.key = self.url.split("?key=")

    def kill(self) -> str:
        """SIGKILL, as a crash; returns what it said on stderr."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        log = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return log


# ---- a real single-node Slurm (tests/test_slurm.py) ----
# Debian's slurm-wlm and munge (`make slurm` installs them): munged, slurmctld and slurmd started
# as root from a slurm.conf of their own in a temp folder (own ports, own munge key and socket), so
# several clusters (one per pytest worker) and a system Slurm never meet. The clients (sbatch,
# squeue, scontrol, srun in the jobs) find it through SLURM_CONF alone: the munge socket is in the
# slurm.conf (AuthInfo / CredentialInfo socket=...).

SLURM_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "scancel",
                  "srun")
SLURM_MARKER_ENV = "PALM_TEST_SLURM"  # carried by the daemons and every job: what the clean-up kills
SLURM_DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
              "BOOT_FAIL", "DEADLINE"}


class SlurmUnavailable(RuntimeError):
    """No Slurm here: the binaries are missing, not root, or a daemon did not come up (the
    message is one line, with the tail of the daemon's log)."""


def _slurm_conf(tmp: Path, ctld_port: int, slurmd_port: int, munge_socket: Path) -> str:
    node = subprocess.run(["slurmd", "-C"], check=False, capture_output=True, text=True,
                          timeout=60).stdout.splitlines()
    fields = dict(f.split("=", 1) for f in (node[0].split() if node else []) if "=" in f)
    name = fields.get("NodeName") or socket.gethostname().split(".")[0]
    hardware = " ".join(f"{k}={fields[k]}" for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket",
                                                     "ThreadsPerCore", "RealMemory") if k in fields)
    if not hardware:
        hardware = f"CPUs={os.cpu_count()}"
    return "\n".join([
        "ClusterName=palmtest",
        f"SlurmctldHost={name}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        f"AuthInfo=socket={munge_socket}",
        "CredType=cred/munge",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SwitchType=switch/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "ReturnToService=2",
        "MinJobAge=600",  # finished jobs stay in `scontrol show job` for 10 minutes
        "InactiveLimit=0",
        "KillWait=5",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=2",
        f"StateSaveLocation={tmp / 'state'}",
        f"SlurmdSpoolDir={tmp / 'spool'}",
        f"SlurmctldPidFile={tmp / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={tmp / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={tmp / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={tmp / 'log' / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        f"NodeName={name} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN",
        f"PartitionName=debug Nodes={name} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _log_tail(path: Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " | ".join(text[-lines:]) or f"(no {path.name})"


def _kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment carries ``SLURM_MARKER_ENV=marker`` (the daemons,
    slurmstepd and the jobs' processes), then wait until they are gone."""
    import psutil

    wanted = f"{SLURM_MARKER_ENV}={marker}".encode()
    found = []
    for pid in psutil.pids():
        if pid == os.getpid():
            continue
        try:
            if wanted in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(psutil.Process(pid))
        except (OSError, psutil.Error):
            continue
    for proc in found:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(found, timeout=30)


@contextlib.contextmanager
def slurm_cluster(tmp: Path, timeout_s: float = 90):
    """A one-node Slurm (partition ``debug``, the machine's CPUs and memory) of its own under
    ``tmp``; yields the environment (``os.environ`` plus ``SLURM_CONF``) that its clients and jobs
    run with. At the end every job is cancelled and every process it started (daemons, job steps)
    killed and waited for. Raises :class:`SlurmUnavailable` when it cannot start; slurmctld and
    slurmd start again on fresh ports when one was taken (:func:`on_free_ports`)."""
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:
        raise SlurmUnavailable(f"Slurm is not installed (missing {', '.join(missing)}; make test installs it: "
                               f"apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        raise SlurmUnavailable("the Slurm daemons of the tests run as root (SlurmUser=root); not root here")
    tmp = Path(tmp).resolve()
    for sub in ("state", "spool", "run", "log", "munge"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    (tmp / "munge").chmod(0o755)  # munged refuses a key or socket folder others can write
    key, sock = tmp / "munge" / "munge.key", tmp / "munge" / "munge.socket"
    subprocess.run(["mungekey", "--create", "--force", "--keyfile", str(key)], check=True, capture_output=True)
    key.chmod(0o600)
    conf = tmp / "slurm.conf"
    marker = str(tmp)
    env = {**os.environ, "SLURM_CONF": str(conf), SLURM_MARKER_ENV: marker}
    for var in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
        env.pop(var)  # a surrounding job's settings would leak into every submission
    log = tmp / "log"
    # --force: munged wants every folder above its socket searchable by all users, and pytest's
    # temp folders are not (0700); the clients all run as root
    munged = ["munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
              f"--log-file={log / 'munged.log'}", f"--pid-file={tmp / 'run' / 'munged.pid'}",
              f"--seed-file={tmp / 'munge' / 'munged.seed'}"]
    slurm = {"slurmctld": ["slurmctld", "-D", "-i", "-f", str(conf)], "slurmd": ["slurmd", "-D", "-f", str(conf)]}
    procs: dict[str, subprocess.Popen] = {}

    def daemon(name: str, argv: list[str]) -> subprocess.Popen:
        with (log / f"{name}.out").open("wb") as out:
            procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=env, start_new_session=True)
        return procs[name]

    def start(ctld_port: int, slurmd_port: int) -> None:
        """slurmctld and slurmd on these ports, up once the node is idle; stopped again when they
        are not (PortTaken when a port was taken)."""
        for name in slurm:  # an earlier try's logs
            for old in (log / f"{name}.log", log / f"{name}.out"):
                old.unlink(missing_ok=True)
        conf.write_text(_slurm_conf(tmp, ctld_port, slurmd_port, sock))
        try:
            for name, argv in slurm.items():
                daemon(name, argv)
            _wait_for(lambda: _node_idle(env), procs, timeout_s, "slurmd", log)
        except Exception as err:
            _stop_daemons([procs.pop(name) for name in slurm if name in procs])
            if port_taken(*(log / f"{name}.{ext}" for name in slurm for ext in ("log", "out"))):
                raise PortTaken(f"Slurm on ports {ctld_port} and {slurmd_port}: {err}") from None
            raise

    try:
        try:
            _wait_for(lambda: sock.exists(), daemon("munged", munged), timeout_s, "munged", log)
            on_free_ports(start, count=2)
        except SlurmUnavailable:
            raise
        except Exception as err:  # noqa: BLE001 - any start-up failure is "no Slurm here"
            raise SlurmUnavailable(f"Slurm did not start ({err}): {_logs(log)}") from None
        yield env
    finally:
        if "slurmctld" in procs and procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--partition=debug"], check=False, env=env, capture_output=True,
                           timeout=30)
        _stop_daemons(list(procs.values()))
        _kill_marked(marker)  # slurmstepd and job processes left behind


def _stop_daemons(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to each daemon's group, last started first; SIGKILL to those not gone in 15 s."""
    for proc in reversed(procs):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            kill_group(proc)


def _logs(log: Path) -> str:
    return "; ".join(f"{p.name}: {_log_tail(p, 3)}" for p in sorted(log.glob("*")) if p.stat().st_size)


def _node_idle(env: dict) -> bool:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], check=False, env=env, capture_output=True, text=True,
                         timeout=30)
    return out.returncode == 0 and out.stdout.split() == ["idle"]


def _wait_for(ready, procs, timeout_s: float, name: str, log: Path) -> None:
    procs = procs if isinstance(procs, dict) else {name: procs}
    deadline = time.monotonic() + timeout_s
    while not ready():
        dead = [n for n, p in procs.items() if p.poll() is not None]
        if dead:
            raise SlurmUnavailable(f"{dead[0]} exited with {procs[dead[0]].returncode} at start: {_logs(log)}")
        if time.monotonic() > deadline:
            raise SlurmUnavailable(f"{name} not ready after {timeout_s:.0f} s: {_logs(log)}")
        time.sleep(0.3)


def job_states(job_id: str | int, env: dict) -> dict[str, str]:
    """``{job id: JobState}`` of a job, or of every element of an array job (``123_0``, ...,
    from ``scontrol show job``: pending elements still grouped, e.g. ``123_[2-3]``)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], check=False, env=env, capture_output=True,
                         text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"scontrol show job {job_id}: {out.stderr.strip() or out.stdout.strip()}")
    states = {}
    for line in out.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "ArrayTaskId" in fields:
            key = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
        else:
            key = fields.get("JobId", str(job_id))
        states[key] = fields.get("JobState", "UNKNOWN")
    return states


def wait_job(job_id: str | int, env: dict, timeout: float = 120) -> dict[str, str]:
    """Poll ``scontrol show job`` until the job (every element of an array job) has finished;
    returns ``{job id: final JobState}`` (``COMPLETED``, ``FAILED``, ...). Raises ``TimeoutError``
    with the states seen last."""
    deadline = time.monotonic() + timeout
    while True:
        states = job_states(job_id, env)
        if states and all(s in SLURM_DONE for s in states.values()):
            return states
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s: {states}")
        time.sleep(0.5)


# ---- a fresh clone (docs/tutorial.md's test) ----------------------------------------------------

RUN_LEFTOVERS = ("dvc.lock", "reports/", "models/", "data/", "artifacts/")


def clone_project(dst: Path) -> Path:
    """:func:`make_project` as a fresh ``git clone`` has it: without what a run in the checkout left
    behind unignored (an untracked ``dvc.lock``, metrics under ``reports/``). Other untracked files
    (new modules not committed yet) stay, as in :func:`make_project`."""
    make_project(dst, git=False)
    untracked = subprocess.run(["git", "ls-files", "-o", "--exclude-standard"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.split()
    for rel in untracked:
        if rel == RUN_LEFTOVERS[0] or rel.startswith(RUN_LEFTOVERS[1:]):
            (dst / rel).unlink(missing_ok=True)
    commit(dst)
    return dst
