"""The MLflow Model Registry: registering the pipeline's models, resolving ``models:/`` URIs
to export folders, and walking a version's lineage back to the scrape run.

Registered models (:data:`NAMES`): ``palm-pretrain``, ``palm-sft``, ``palm-reward``,
``palm-chat`` (the PPO policy) and ``palm-dpo`` (the DPO policy, when the DAG trained one). The
``evaluate`` stage registers them all (:func:`register`) as
pyfunc models (:mod:`palm.apps.serving`) whose artifact is the export folder, with explicit pip
requirements and a signature. Each version's source run is the stage run that produced the
folder (found by the DVC md5 of the folder: that run's tag ``dvc.out.<path>.md5``), and the model
is logged as an artifact of that run (``registry/<name>``); a folder registered before (same
md5) is the same version again, not a new one. Aliases:

* ``current`` on each model: the version the latest ``evaluate`` saw;
* ``champion`` on each policy, ``palm-chat`` and ``palm-dpo``, each by its own metrics
  (:func:`candidate_reason`): a version becomes champion only when
  its KL to SFT is within ``evaluate.kl_limit`` (metric ``kl_within_limit``), its evaluation gave
  a verdict (``verdict``, 0 on too few held-out prompts), ``evaluate.champion_metric`` is not a
  judge's that the policy trained against (``trained_on_<judge>_ppo``: a PPO that optimised the
  rule checks cannot win by them) and it has a number for it; then, if there is a champion, only
  when that champion was
  evaluated on the same set (version tag ``palm.eval_set``: an id of the prompts, the judge and
  the sampling; a champion without one counts as another set) and the new value beats the
  champion's strictly in the direction ``evaluate.champion_direction`` (the values are version
  tags ``palm.metric.<key>``, any numeric metric). Otherwise the version is the ``candidate``
  and tag ``palm.candidate_reason`` says why in one line. When a ``palm-chat`` version becomes
  champion, the pretrain, SFT and reward versions it came with get ``champion`` too, so
  ``models:/palm-reward@champion`` is the reward model the champion was trained against (a
  ``palm-dpo`` champion moves its own alias only). A policy other than PPO is judged on its
  metrics under PPO's names (``palm.eval.evaluate.policy_view``: ``win_rate_dpo`` as
  ``win_rate``), so one ``champion_metric`` serves every policy and its tags read alike.

Lineage: every stage run carries the DVC md5 of its data and model dependencies
(``dvc.dep.<path>.md5``) and the run that produced each (``palm.input.<path>.run_id``,
:meth:`palm.ops.tracking.Tracker.link_inputs`); :func:`lineage` follows those links from a version's
source run to the runs with no tracked inputs (``scrape``).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

from palm.core.errors import UserError, first_line
from palm.core.io import atomic_dir
from palm.ops.tracking import redact, tracking_uri

# the evaluate stage's model -> registered name
NAMES = {"pretrain": "palm-pretrain", "sft": "palm-sft", "reward": "palm-reward", "ppo": "palm-chat",
         "dpo": "palm-dpo"}
CHAT = NAMES["ppo"]
# the gold judge whose numbers a metric name carries (by palm/eval/evaluate.py's names)
JUDGE_PREFIXES = (("gold_rm", "reward_model"), ("gold_", "rule"))
ARTIFACT = "registry"  # artifact folder of a source run that holds its registered models
PALM = Path(__file__).resolve().parents[1]  # the package, logged whole as each served model's code

# what inference imports (palm/apps/serving.py and the modules it loads): pinned from requirements.lock
INFERENCE_PACKAGES = ("mlflow", "torch", "megatron-core", "tokenizers", "safetensors", "numpy", "threadpoolctl",
                      "pyarrow", "pyyaml", "pandas")
CACHE_ENV = "PALM_MODEL_CACHE"
# the generation settings palm/apps/serving.py's predict takes as params: name -> default; their types
# make the signature's param schema (top_k 0: off, top_p 1: off)
PARAMS = {"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}
URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+|latest))$")


def _line(value: Any) -> str:
    """``value`` as text fit for a one-line message: line breaks and other control characters
    (a URI or name given by the user, or a server's answer, may hold them) escaped."""
    text = str(value)
    return text if text.isprintable() else "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def is_uri(ref: Any) -> bool:
    return isinstance(ref, str) and ref.startswith("models:/")


def client(root: Path | None = None, *, existing: bool = False):
    """An ``MlflowClient`` on the project's registry; ``existing``: refuse a SQLite file that is
    not there (MLflow would create an empty one)."""
    import mlflow

    uri = tracking_uri(Path(root) if root else Path.cwd())
    if existing and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no MLflow registry at {_line(uri)}: run from the project root after the pipeline has run "
                        "(dvc repro registers the models), or set MLFLOW_TRACKING_URI")
    return mlflow.MlflowClient(uri)


def pip_requirements(lock: Path | None = None) -> list[str]:
    """``name==version`` of each of :data:`INFERENCE_PACKAGES`, from ``requirements.lock`` (the
    project's pins), or the installed version where the lock is absent or names none."""
    from importlib.metadata import PackageNotFoundError, version

    lock = lock or PALM.parent / "requirements.lock"
    pins = {}
    if lock.is_file():
        for line in lock.read_text().splitlines():
            name, sep, ver = line.split("#")[0].strip().partition("==")
            if sep:
                pins[name.strip().lower().replace("_", "-")] = ver.strip()
    out = []
    for name in INFERENCE_PACKAGES:
        try:
            out.append(f"{name}=={pins.get(name) or version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return out


def signature(kind: str):
    """A reward model: prompt and response in, scores out. A pretrain model: prompts in,
    continuations out. A policy (sft, ppo, dpo) takes either prompts (strings in, replies out) or one
    OpenAI chat request (``{"messages": [...], "max_tokens": ...}``: MLflow's chat format, answered
    with a chat completion), so its input schema is left open and ``predict`` checks the input
    itself; generation settings are the params of :data:`PARAMS`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    if kind == "reward":
        return ModelSignature(Schema([ColSpec(DataType.string, "prompt"), ColSpec(DataType.string, "response")]),
                              Schema([ColSpec(DataType.double)]))
    types = {int: DataType.long, float: DataType.double}
    params = ParamSchema([ParamSpec(k, types[type(v)], v) for k, v in PARAMS.items()])
    if kind == "pretrain":
        return ModelSignature(Schema([ColSpec(DataType.string)]), Schema([ColSpec(DataType.string)]), params)
    # MLflow enforces a declared input schema before predict sees it: a string column drops a chat
    # request's max_tokens, a chat schema refuses plain strings
    return ModelSignature(None, None, params)


# --- registering ----------------------------------------------------------------------------------

def _versions(c: Any, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description=f"palm-rlhf: the {name.removeprefix('palm-')} model "
                                                    "(registered by the evaluate stage)")
        return []
    return c.search_model_versions(f"name = '{name}'")


def save_pyfunc(out: Path, folder: Path, kind: str) -> Path:
    """Save the export ``folder`` (of ``kind``) as a pyfunc model in the new folder ``out``: what a
    registered version holds (``mlflow.pyfunc.load_model(out)`` loads it); returns ``out``."""
    import warnings

    import mlflow.pyfunc

    with warnings.catch_warnings():
        # no input example on purpose: MLflow would run the model on it (seconds per model)
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        mlflow.pyfunc.save_model(str(out), python_model=str(PALM / "apps" / "serving.py"),
                                 artifacts={"model": str(folder)}, code_paths=[str(PALM)],
                                 pip_requirements=pip_requirements(), signature=signature(kind),
                                 metadata={"palm.kind": kind})
    return out


def _log(c: Any, run_id: str, name: str, folder: Path, kind: str) -> str:
    """Save ``folder`` as a pyfunc model and log it into run ``run_id``; its artifact URI."""
    with tempfile.TemporaryDirectory() as tmp:
        c.log_artifacts(run_id, str(save_pyfunc(Path(tmp) / name, folder, kind)), f"{ARTIFACT}/{name}")
    return f"runs:/{run_id}/{ARTIFACT}/{name}"


def register(models: dict[str, Path], md5s: dict[str, str], sources: dict[str, str | None], *,
             evaluate_run: str | None, metrics: dict[str, Any], metric: str, direction: str, eval_set: str,
             root: Path | None = None, log: Any = None,
             policy_metrics: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Register the exports ``models`` (keys of :data:`NAMES`) with the DVC md5 of each folder
    and the run that produced it (``sources``; None: none is tracked, the model is logged into
    ``evaluate_run``). ``metrics``: the evaluation's, their numbers tagged on the ``palm-chat``
    version, judged by the champion rule (:func:`candidate_reason`; ``metric``, ``direction``:
    ``max`` or ``min``); ``policy_metrics``: another policy's (``dpo``) metrics under PPO's names,
    judged and tagged the same way on its own model; ``eval_set``: the id of the set they were
    measured on (tag ``palm.eval_set``; "": unknown, comparable with no champion). Returns, per
    model key, ``{"name", "version", "aliases", "new"}``."""
    log = log or (lambda s: print(s, file=sys.stderr))
    c = client(root)
    out: dict[str, dict[str, Any]] = {}
    versions: dict[str, Any] = {}
    for key, folder in models.items():
        name, md5, source = NAMES[key], md5s[key], sources.get(key)
        existing = [v for v in _versions(c, name) if v.tags.get("dvc.md5") == md5]
        if existing:
            version, new = max(existing, key=lambda v: int(v.version)), False
        else:
            run = source or evaluate_run
            if run is None:
                raise UserError(f"{folder}: no MLflow run to log it into (tracking is off)")
            if source is None:
                log(f"warning: evaluate: no tracked run produced {folder} (md5 {md5}); {name} is registered "
                    f"from the evaluate run {evaluate_run} instead")
            tags = {"dvc.md5": md5, "palm.path": str(folder), "palm.evaluate_run_id": evaluate_run or "",
                    "palm.source_run_id": source or ""}
            version, new = c.create_model_version(name, _log(c, run, name, folder, key), run_id=run, tags=tags), True
        c.set_registered_model_alias(name, "current", version.version)
        versions[key] = version
        out[key] = {"name": name, "version": int(version.version), "new": new, "aliases": ["current"]}

    judged = {"ppo": metrics, **{k: v for k, v in (policy_metrics or {}).items() if k in out}}
    for policy, found in judged.items():
        alias = _judge(c, out[policy], getattr(versions[policy], "tags", None) or {}, found, metric, direction,
                       eval_set, log)
        if alias == "champion" and policy == "ppo":  # the chain palm-chat's champion came with
            for key in ("pretrain", "sft", "reward"):
                c.set_registered_model_alias(out[key]["name"], "champion", str(out[key]["version"]))
                out[key]["aliases"].append("champion")
    for key, r in out.items():
        log(f"evaluate: registered {r['name']} version {r['version']}{'' if r['new'] else ' (already registered)'}"
            f" as {', '.join('@' + a for a in r['aliases'])}")
    return out


def _judge(c: Any, registered: dict[str, Any], before: dict[str, str], metrics: dict[str, Any], metric: str,
           direction: str, eval_set: str, log: Any) -> str:
    """Tag a policy's version with ``metrics`` and the set, and give it the alias the champion rule
    decides (``before``: its tags from an earlier registration, when not new); returns the alias."""
    name, number = registered["name"], str(registered["version"])
    reason = candidate_reason(c, registered["version"], metrics, metric, direction, eval_set, log, name=name)
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):  # text (the eval_set id…) is no metric tag
            c.set_model_version_tag(name, number, f"palm.metric.{k}", repr(float(v)))
    stale = [k for k, keep in (("palm.eval_set", eval_set), ("palm.candidate_reason", reason)) if not keep]
    for key in (k for k in stale if k in before):
        c.delete_model_version_tag(name, number, key)
    if eval_set:
        c.set_model_version_tag(name, number, "palm.eval_set", eval_set)
    alias = "candidate" if reason else "champion"
    if reason:
        c.set_model_version_tag(name, number, "palm.candidate_reason", reason)
        log(f"evaluate: {name} version {number} is the candidate, not champion: {reason}")
    c.set_registered_model_alias(name, alias, number)
    registered["aliases"].append(alias)
    return alias


def own_reason(metrics: dict[str, Any], metric: str) -> str:
    """Why a policy evaluated to ``metrics`` (by PPO's names) may not be champion on its own
    numbers, in one line; "" when it may. In order: ``kl_within_limit`` true (missing: not
    within); ``verdict`` truthy (missing: 1); ``metric`` not a gold judge's the policy trained
    against (``trained_on_<judge>_ppo``); a number for ``metric``."""
    if "kl_within_limit" not in metrics:
        return "no kl_within_limit in its metrics: its KL to the SFT policy is unchecked"
    within = metrics["kl_within_limit"]
    if not (isinstance(within, (bool, int, float)) and within):
        kl, limit = _number(metrics.get("kl")), _number(metrics.get("kl_limit"))
        if kl is not None and limit is not None and kl > limit:
            return f"kl {kl:.3g} > kl_limit {limit}"
        return f"kl_within_limit {_short(within, 20)}: not within the KL limit"
    if not metrics.get("verdict", 1):
        return "too few held-out prompts for a verdict (evaluate.min_prompts)"
    judge = next((j for prefix, j in JUDGE_PREFIXES if metric.startswith(prefix)), None)
    if judge and metrics.get(f"trained_on_{judge}_ppo"):
        return f"{metric} is the {judge} judge's, which this policy trained against: not independent evidence"
    if _number(metrics.get(metric)) is None:
        return f"no number for {metric} in its metrics: nothing to compare"
    return ""


def candidate_reason(c: Any, version: int, metrics: dict[str, Any], metric: str, direction: str, eval_set: str,
                     log: Any = None, name: str = CHAT) -> str:
    """Why version ``version`` of the policy ``name`` (default ``palm-chat``), evaluated to
    ``metrics`` (by PPO's names) on the set ``eval_set``, is not to be champion, in one line; ""
    when it is (a version that is champion stays so). In order: :func:`own_reason` on its own
    numbers; then, if there is a champion: its tag ``palm.eval_set`` equal to the non-empty ``eval_set`` (a champion
    without one was evaluated on another set), and ``value`` beating its ``palm.metric.<metric>``
    strictly in ``direction`` (missing there: it does)."""
    from mlflow.exceptions import MlflowException

    try:
        champ = c.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champ = None
    if champ is not None and _is_version(champ, version):
        return ""
    reason = own_reason(metrics, metric)
    if reason:
        return reason
    value = _number(metrics[metric])
    if champ is None:
        return ""
    theirs = (getattr(champ, "tags", None) or {}).get("palm.eval_set")
    who = f"the champion (version {_line(champ.version)})"
    if not theirs:
        return f"{who} has no eval_set (evaluated before eval sets were recorded): not comparable"
    if not eval_set:
        return f"no eval_set for this evaluation ({who}: {_short(theirs)}): not comparable"
    if theirs != eval_set:
        return (f"evaluated on a different set (eval_set {_short(eval_set)} vs champion's {_short(theirs)}): "
                "not comparable")
    best = _champion_value(champ, metric, version, log)
    if best is None or beats(value, best, direction):
        return ""
    return f"{metric} {value:.4g} {'<=' if direction == 'max' else '>='} champion's {best:.4g}"


def champion_alias(c: Any, version: int, value: float, metric: str, direction: str, log: Any = None,
                   name: str = CHAT) -> str:
    """The metric comparison of the champion rule alone (:func:`candidate_reason` checks the KL,
    the verdict and the eval set first): ``champion`` if ``name`` (``palm-chat``) has none, if ``version``
    is it, or if ``value`` beats the champion's tagged value of ``metric`` strictly in
    ``direction``; else ``candidate``. A champion's metric tag that is not a number counts as
    missing (a warning line through ``log``, default stderr): the registry's answer never stops
    the registration."""
    from mlflow.exceptions import MlflowException

    try:
        champ = c.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return "champion"
    if _is_version(champ, version):
        return "champion"
    best = _champion_value(champ, metric, version, log)
    return "champion" if best is None or beats(value, best, direction) else "candidate"


def _is_version(champ: Any, version: int) -> bool:
    try:
        return int(champ.version) == version
    except (TypeError, ValueError):  # a version that is not a number is not this one
        return False


def beats(value: float, theirs: float, direction: str) -> bool:
    return value > theirs if direction == "max" else value < theirs


def _champion_value(champ: Any, metric: str, version: int, log: Any = None) -> float | None:
    """The champion's tag ``palm.metric.<metric>`` as a number; None when missing (never
    measured on it) or not a number (also a warning line through ``log``, default stderr)."""
    theirs = (getattr(champ, "tags", None) or {}).get(f"palm.metric.{metric}")
    if theirs is None:
        return None
    try:
        number = float(theirs)
    except (TypeError, ValueError):
        number = math.nan
    if math.isnan(number):
        (log or (lambda s: print(s, file=sys.stderr)))(
            f"warning: evaluate: the champion ({_line(getattr(champ, 'name', CHAT))} version {_line(champ.version)}) has tag palm.metric.{metric} "
            f"{_line(repr(theirs))[:100]}, not a number: treated as missing, so version {version} becomes champion")
        return None
    return number


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a number (not a bool, not NaN); else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _short(value: Any, n: int = 12) -> str:
    """``value`` for a one-line message, cut to its first ``n`` characters (an id's start)."""
    text = _line(value)
    return text if len(text) <= n else text[:n] + "…"


# --- resolving ------------------------------------------------------------------------------------

def get_version(c: Any, uri: str):
    """The model version ``uri`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or
    ``models:/NAME/latest``, the newest) names."""
    from mlflow.exceptions import MlflowException

    m = URI.fullmatch(uri) if isinstance(uri, str) else None
    if not m:
        raise UserError(f"{_line(uri)}: not a registry URI (models:/NAME@ALIAS or models:/NAME/VERSION, "
                        f"e.g. models:/{CHAT}@champion)")
    try:
        if m["alias"]:
            return c.get_model_version_by_alias(m["name"], m["alias"])
        if m["version"] == "latest":
            newest = c.search_model_versions(f"name = '{m['name']}'", max_results=1,
                                             order_by=["version_number DESC"])
            if not newest:
                raise MlflowException(f"Registered Model with name={m['name']} has no version")
            return newest[0]
        return c.get_model_version(m["name"], m["version"])
    except MlflowException as err:
        raise UserError(f"{_line(uri)}: not in the registry at {_line(redact(c.tracking_uri))} ({_line(redact(first_line(err)))}); run the pipeline "
                        "(dvc repro evaluate registers the models) or set MLFLOW_TRACKING_URI") from None


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "palm-rlhf" / "models")


# what a version's name, number and folder md5 may be before they become a cache path: they come
# from the tracking server, which need not be trusted to choose where this machine writes
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NUMBER = re.compile(r"^[0-9]{1,18}$")
MD5 = re.compile(r"^[0-9a-f]{32}(\.dir)?$")  # DVC's md5 of a file, or of a folder (….dir)


def _names(value: Any) -> list[str]:
    """A server's list of names (aliases), as text; anything else in it is left out."""
    return [str(v) for v in value if isinstance(v, (str, int))] if isinstance(value, (list, tuple)) else []


def _inside(path: Path, folder: Path, what: str) -> Path:
    """``path`` resolved (symlinks followed), if it lies inside ``folder`` (resolved); else a UserError."""
    try:
        real, top = Path(path).resolve(), Path(folder).resolve()
    except (ValueError, OSError) as err:  # a NUL byte in a server-given path, a symlink loop
        raise UserError(f"{_line(what)}: {str(path)!r} is not a usable path ({_line(err)})") from None
    if real == top or not real.is_relative_to(top):
        raise UserError(f"{_line(what)}: {str(path)!r} resolves to {_line(real)}, outside {_line(top)} "
                        "(expected a path inside it)")
    return real


def cache_folder(name: Any, version: Any, md5: Any, cache: Path | None = None) -> Path:
    """The cache folder of version ``version`` of the registered model ``name`` whose export has
    the DVC md5 ``md5`` (None: untagged): ``CACHE/NAME/VERSION-MD5[:12]``. Each value is checked
    first (a UserError naming it): a hostile tracking server could otherwise name a folder outside
    the cache, which the download would replace."""
    cache = Path(cache or cache_dir())
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UserError(f"registered model name {name!r}: not a name this cache takes (expected letters, digits, "
                        "'.', '_' or '-', starting with a letter or digit, at most 128)")
    if not NUMBER.fullmatch(str(version)):
        raise UserError(f"{name}: model version {version!r} is not a version number (expected digits)")
    if md5 is not None and not (isinstance(md5, str) and MD5.fullmatch(md5)):
        raise UserError(f"{name} version {version}: tag dvc.md5 {md5!r} is not a DVC md5 (expected 32 hex "
                        "digits, optionally followed by .dir)")
    local = cache / name / f"{version}-{md5[:12] if md5 else 'unknown'}"
    _inside(local, cache, f"{name} version {version}: its cache folder")
    return local


def resolve(uri: str, root: Path | None = None) -> Path:
    """The export folder of the registered version ``uri``: downloaded once into
    ``$PALM_MODEL_CACHE`` (default ``~/.cache/palm-rlhf/models``) as ``NAME/VERSION-MD5``
    (the start of the folder's DVC md5), atomically. The name, version, md5 and the export's
    path in the downloaded MLmodel are checked to stay inside the cache (:func:`cache_folder`,
    :func:`export_folder`)."""
    import mlflow.artifacts

    c = client(root, existing=True)
    version = get_version(c, uri)
    # the folder's md5 in the name: another registry's version of the same number is another folder
    local = cache_folder(version.name, version.version, version.tags.get("dvc.md5"))
    if not (local / "MLmodel").is_file():
        with atomic_dir(local) as tmp:
            try:
                mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}",
                                                    dst_path=str(tmp), tracking_uri=c.tracking_uri)
            except Exception as err:  # noqa: BLE001 - MLflow's and the HTTP client's errors name the URL
                raise UserError(f"{_line(uri)}: downloading {version.name} version {version.version} from the "
                                f"registry failed: {_line(redact(first_line(err, 300)))} (is the tracking server reachable?)") from None
            # checked before it replaces anything: a bad MLmodel is not kept
            export_folder(tmp, f"{uri} ({version.name} version {version.version}), its MLmodel")
    return export_folder(local)


def export_folder(model_dir: Path, label: str | None = None) -> Path:
    """Where a downloaded pyfunc model keeps its export (its artifact ``model``): a path inside
    ``model_dir`` (an absolute path or one that leaves it, via ``..`` or a symlink: a UserError,
    which names ``label``, default the MLmodel file)."""
    import yaml

    label = _line(label or str(Path(model_dir) / "MLmodel"))
    try:
        conf = yaml.safe_load((Path(model_dir) / "MLmodel").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as err:
        # not there, not UTF-8, not YAML, or nested deeper than the parser goes
        why = {UnicodeDecodeError: "not UTF-8 text", RecursionError: "nested too deep to read"}.get(type(err))
        if why is None:
            why = f"{'not YAML' if isinstance(err, yaml.YAMLError) else 'unreadable'}: {_line(first_line(err, 200))}"
        raise UserError(f"{label}: not a readable MLmodel file ({why})") from None
    try:
        path = conf["flavors"]["python_function"]["artifacts"]["model"]["path"]
    except (KeyError, TypeError):
        raise UserError(f"{label}: no artifact 'model' in its python_function flavor "
                        "(not a model palm-rlhf registered)") from None
    if not isinstance(path, str) or not path or Path(path).is_absolute():
        raise UserError(f"{label}: artifact path {path!r} is not a relative path (expected one inside the model folder)")
    _inside(Path(model_dir) / path, model_dir, f"{label}: artifact path {path!r}")
    return Path(model_dir) / path


# --- lineage --------------------------------------------------------------------------------------

def lineage(uri: str, root: Path | None = None) -> dict[str, Any]:
    """The chain of runs behind the version ``uri``: ``{"model", "runs", "corpus"}``.

    ``runs``: by id, each ``{"stage", "status", "start_time", "git_commit", "inputs", "outputs",
    "registered"}``, ``inputs`` a list of ``{"path", "md5", "run_id"}`` (``run_id`` None: no tracked
    run produced that input), ``outputs`` ``{path: md5}``, ``registered`` the versions whose source
    is the run. ``order``: the run ids, the source run first, each before its inputs' runs (depth
    first, each once). ``corpus``: the scrape run's ``data/corpus`` md5 and run id."""
    from mlflow.exceptions import MlflowException

    c = client(root, existing=True)
    version = get_version(c, uri)
    if not NUMBER.fullmatch(str(version.version)):
        raise UserError(f"{_line(uri)}: the registry answered version {_line(repr(version.version))[:100]} of "
                        f"{_line(version.name)}, not a version number (expected digits)")
    model = {"uri": uri, "name": version.name, "version": int(version.version), "run_id": version.run_id,
             "aliases": _names(getattr(version, "aliases", None)), "dvc_md5": version.tags.get("dvc.md5")}
    runs: dict[str, dict[str, Any]] = {}
    order: list[str] = []

    def visit(run_id: str) -> None:
        if run_id in runs:
            return
        try:
            run = c.get_run(run_id)
        except MlflowException as err:  # deleted, or never in this tracking server: shown as missing
            runs[run_id] = {"stage": None, "status": "MISSING", "start_time": None, "git_commit": None,
                            "inputs": [], "registered": [], "outputs": {}, "missing": _line(redact(first_line(err, 200)))}
            order.append(run_id)
            return
        tags = run.data.tags
        inputs = [{"path": p, "md5": tags[k], "run_id": tags.get(f"palm.input.{p}.run_id")}
                  for k in sorted(tags) if (p := _between(k, "dvc.dep.", ".md5"))]
        try:
            registered = [f"{v.name}/{v.version}" for v in c.search_model_versions(f"run_id = '{run_id}'")]
        except MlflowException:  # a run id the search cannot take (a quote in it): none found
            registered = []
        runs[run_id] = {"stage": tags.get("palm.ops.stage"), "status": run.info.status,
                        "start_time": run.info.start_time, "git_commit": tags.get("git_commit"),
                        "inputs": inputs, "registered": sorted(registered),
                        "outputs": {p: tags[k] for k in sorted(tags) if (p := _between(k, "dvc.out.", ".md5"))}}
        order.append(run_id)
        for i in inputs:
            if i["run_id"]:
                visit(i["run_id"])

    if version.run_id:
        visit(version.run_id)
    scrape = [(rid, r) for rid, r in runs.items() if r["stage"] == "scrape"]
    corpus = None
    if scrape:
        rid, r = scrape[0]
        path, md5 = next(((p, m) for p, m in r["outputs"].items() if p.endswith("corpus")), (None, None))
        corpus = {"path": path, "md5": md5, "run_id": rid}
    return {"model": model, "runs": runs, "order": order, "corpus": corpus}


def _between(key: str, prefix: str, suffix: str) -> str | None:
    return key[len(prefix):-len(suffix)] if key.startswith(prefix) and key.endswith(suffix) else None


def format_lineage(info: dict[str, Any]) -> Iterable[str]:
    """Lines of a lineage as a tree: each run, its inputs indented under it (a run reached twice
    is shown once; later it is named, "above")."""
    m = info["model"]
    yield (f"{m['uri']}: {m['name']} version {m['version']}"
           + (f" (@{', @'.join(m['aliases'])})" if m["aliases"] else "") + f", folder md5 {m['dvc_md5']}")
    shown: set[str] = set()

    def node(run_id: str, depth: int) -> Iterable[str]:
        r = info["runs"][run_id]
        pad = "  " * depth
        reg = f"; registered {', '.join(r['registered'])}" if r["registered"] else ""
        if run_id in shown:
            yield f"{pad}{r['stage']} run {_line(run_id)} (above)"
            return
        shown.add(run_id)
        if r.get("missing") is not None:
            yield f"{pad}run {_line(run_id)} [missing: not in the tracking server ({r['missing']})]"
            return
        yield f"{pad}{r['stage']} run {run_id} [{r['status']}, git {str(r['git_commit'])[:12]}]{reg}"
        for i in r["inputs"]:
            yield f"{pad}  <- {i['path']} md5 {i['md5']}" + ("" if i["run_id"] else " (no tracked run made it)")
            if i["run_id"] in info["runs"]:
                yield from node(i["run_id"], depth + 2)

    if info["order"]:
        yield from node(info["order"][0], 1)
    else:
        yield "  (no source run recorded)"
    corpus = info["corpus"]
    yield (f"corpus: {corpus['path']} md5 {corpus['md5']}, from scrape run {corpus['run_id']}" if corpus
           else "corpus: not reached (no scrape run in the chain)")


def lineage_json(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2, sort_keys=True)
