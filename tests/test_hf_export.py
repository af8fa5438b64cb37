"""``palm export hf`` / ``palm import hf`` (palm/model/hf.py, palm/model/hf_modeling/): the folder
that transformers loads computes what the project's own model computes.

Against the project as the reference: a tiny chat model's logits (a plain batch and a left-padded
one) to 1e-5 in fp32; transformers' greedy ``generate`` (KV cache on and off) gives the tokens of
``palm.decode.generate.generate``; a reward model's sequence-classification score (right, left
and pad-token padding) equals ``palm.eval.evaluate.scores``; ``apply_chat_template`` gives the
ids of ``palm.data.chat.ChatTemplate``. Import after export gives the original tensors bit for
bit, config.json and tokenizer.json. A folder that is not an export, a kind that cannot be
exported, an occupied output and a foreign transformers folder are one ``error:`` line each.
The models' weights are redrawn (helpers.redraw_weights) so that every block, norm gain and the
rotary embedding move the logits: the tolerances are tight against logits of order 1.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import MODEL, make_reward, redraw_weights, with_kind  # noqa: E402

from palm.apps import cli  # noqa: E402
from palm.model.export import load_model, load_tokenizer, read_export  # noqa: E402
from palm.model.parallel import process_groups  # noqa: E402

TOL = 1e-5
MAX_NEW = 16
CONVERSATIONS = [
    [{"role": "user", "content": "What does dumps do?"}],
    [{"role": "system", "content": "You answer in one line."},
     {"role": "user", "content": "How are you?  I am fine,\nthank you."}],
    [{"role": "system", "content": " Be brief. "},
     {"role": "user", "content": "What does it do?"},
     {"role": "assistant", "content": "It works well."},
     {"role": "user", "content": "Und was macht loads? – “quotes”, émigré ✓"}],
]


@pytest.fixture(scope="module", autouse=True)
def hf_cache(tmp_path_factory):
    """transformers copies a folder's code into its modules cache: a throwaway one, never ~/.cache."""
    old = {k: os.environ.get(k) for k in ("HF_HOME", "HF_MODULES_CACHE", "HF_HUB_OFFLINE")}
    home = tmp_path_factory.mktemp("hf_home")
    os.environ.update(HF_HOME=str(home), HF_MODULES_CACHE=str(home / "modules"), HF_HUB_OFFLINE="1")
    yield
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def reward(tmp_path_factory, tok) -> Path:
    """A reward export whose weights (head included) are redrawn, as chat_export does for a policy."""
    from palm.model.reward import RewardModel
    from palm.model.weights import export_safetensors

    out = make_reward(tmp_path_factory.mktemp("reward") / "reward", tok, mean=0.5, std=2.0)
    config = json.loads((out / "config.json").read_text())
    with process_groups():
        net = RewardModel(MODEL, seed=13)
        redraw_weights(net, seed=7)
        export_safetensors(net, out, config)
    return out


def export_cli(src: Path, out: Path) -> Path:
    assert cli.main(["export", "hf", str(src), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def chat_hf(chat, tmp_path_factory) -> Path:
    return export_cli(chat, tmp_path_factory.mktemp("out") / "chat_hf")


@pytest.fixture(scope="module")
def reward_hf(reward, tmp_path_factory) -> Path:
    return export_cli(reward, tmp_path_factory.mktemp("out") / "reward_hf")


@pytest.fixture(scope="module")
def hf_chat(chat_hf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(chat_hf, trust_remote_code=True).eval()


def ids(export: Path) -> dict[str, int]:
    from palm.core.tokenizer import special_ids

    return special_ids(load_tokenizer(read_export(export)))


def random_rows(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, MODEL.vocab_size, (n,), generator=g).tolist() for n in lengths]


# --- the language model --------------------------------------------------------------------------

def palm_logits(chat: Path, rows: list[list[int]]) -> list[torch.Tensor]:
    """The project's logits ``[s, V]`` of each row alone (one process: the whole vocabulary)."""
    with process_groups(), torch.no_grad():
        model = load_model(read_export(chat))
        return [model(torch.tensor([r]))[0, :, :MODEL.vocab_size] for r in rows]


def test_logits_equal_the_projects_model_plain_and_left_padded(chat, hf_chat):
    rows = random_rows([24, 24, 24], seed=0)
    ours = torch.stack(palm_logits(chat, rows))  # [b, s, V]
    with torch.no_grad():
        theirs = hf_chat(input_ids=torch.tensor(rows)).logits
    assert theirs.shape == ours.shape and theirs.dtype == torch.float32
    assert ours.std() > 0.5  # premise: logits of order 1, so TOL is tight
    diff = (theirs - ours).abs().max().item()
    print(f"max |logit difference|, plain batch: {diff:.3g}")
    assert diff < TOL

    # left padding: each row's logits are those of the row alone
    rows = random_rows([7, 19, 12], seed=1)
    width = max(map(len, rows))
    pad = hf_chat.config.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        padded = hf_chat(input_ids=input_ids, attention_mask=mask).logits
    for i, (r, alone) in enumerate(zip(rows, palm_logits(chat, rows))):
        d = (padded[i, width - len(r):] - alone).abs().max().item()
        print(f"max |logit difference|, left-padded row {i}: {d:.3g}")
        assert d < TOL


def test_lm_head_is_the_tied_embedding(hf_chat):
    assert hf_chat.lm_head.weight.data_ptr() == hf_chat.model.embed_tokens.weight.data_ptr()


def test_greedy_generate_equals_the_projects_decoding_with_and_without_cache(chat, hf_chat):
    from transformers import AutoTokenizer

    from palm.data.chat import ChatTemplate
    from palm.data.chat_readers import Turn
    from palm.decode.generate import generate

    special = ids(chat)
    template = ChatTemplate(load_tokenizer(read_export(chat)))
    prompts = [template.render_prompt(tuple(Turn(m["role"], m["content"]) for m in c)) for c in CONVERSATIONS]
    with process_groups():
        ours = generate(load_model(read_export(chat)), prompts, MAX_NEW, pad_id=special["pad_id"],
                        stop_ids=(special["end_turn_id"], special["eod_id"]))
    assert len(set(map(len, prompts))) == len(prompts)  # premise: rows of unequal length (left padding)
    assert int(ours.response_mask.sum()) > MAX_NEW  # premise: more than one row says more than one token
    assert len(set(ours.response[0].tolist())) > 3  # premise: varied text, not one token repeated

    tokenizer = AutoTokenizer.from_pretrained(hf_chat.name_or_path, trust_remote_code=True)
    assert tokenizer.padding_side == "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    steps = []  # the length of the input of each forward pass: one token per step once the cache is filled
    hook = hf_chat.model.embed_tokens.register_forward_hook(lambda m, i, o: steps.append(i[0].shape[1]))
    try:
        cached = hf_chat.generate(**batch, do_sample=False, max_new_tokens=MAX_NEW, use_cache=True)
    finally:
        hook.remove()
    uncached = hf_chat.generate(**batch, do_sample=False, max_new_tokens=MAX_NEW, use_cache=False)
    assert steps[0] == batch["input_ids"].shape[1] and set(steps[1:]) == {1}, steps
    assert cached.tolist() == ours.tokens.tolist()
    assert uncached.tolist() == ours.tokens.tolist()


def test_chat_template_gives_the_projects_token_ids(chat, chat_hf):
    from transformers import AutoTokenizer

    from palm.data.chat import ChatTemplate
    from palm.data.chat_readers import Turn

    tokenizer = AutoTokenizer.from_pretrained(chat_hf, trust_remote_code=True)
    template = ChatTemplate(load_tokenizer(read_export(chat)))
    special = ids(chat)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (special["end_turn_id"], special["pad_id"])
    for conv in CONVERSATIONS:
        turns = tuple(Turn(m["role"], m["content"]) for m in conv)
        prompt = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(prompt) == template.render_prompt(turns)
        whole = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False)
        assert list(whole) == template.render(turns)[0]
    with pytest.raises(Exception, match="unknown role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_generation_config_stops_where_palm_chat_stops(chat, hf_chat):
    special = ids(chat)
    assert list(hf_chat.generation_config.eos_token_id) == [special["end_turn_id"], special["eod_id"]]
    assert hf_chat.generation_config.pad_token_id == special["pad_id"]


# --- the reward model ----------------------------------------------------------------------------

def test_reward_score_equals_the_projects_score_whatever_the_padding(reward, reward_hf):
    from transformers import AutoModelForSequenceClassification

    from palm.eval.evaluate import scores

    rows = random_rows([5, 17, 11, 17], seed=2)
    with process_groups():
        ours = scores(load_model(read_export(reward)), rows, batch_size=4).float()
    assert ours.std() > 0.1  # premise: scores far apart against TOL

    model = AutoModelForSequenceClassification.from_pretrained(reward_hf, trust_remote_code=True).eval()
    assert model.config.num_labels == 1
    pad = model.config.pad_token_id
    width = max(map(len, rows))
    real = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    right = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    left = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    with torch.no_grad():
        by_mask = model(input_ids=right, attention_mask=torch.tensor(real)).logits[:, 0]
        by_pad_id = model(input_ids=right).logits[:, 0]  # transformers' rule: the last token not pad_token_id
        left_padded = model(input_ids=left, attention_mask=torch.tensor([r[::-1] for r in real])).logits[:, 0]
    for name, theirs in (("right", by_mask), ("pad id", by_pad_id), ("left", left_padded)):
        d = (theirs - ours).abs().max().item()
        print(f"max |reward difference|, {name} padding: {d:.3g}")
        assert d < TOL, name


# --- import: back to the project's format --------------------------------------------------------

@pytest.mark.parametrize("which", ["chat", "reward"])
def test_export_then_import_gives_the_original_bit_for_bit(which, request, tmp_path):
    from safetensors.torch import load_file

    src, hf = request.getfixturevalue(which), request.getfixturevalue(f"{which}_hf")
    back = tmp_path / "back"
    assert cli.main(["import", "hf", str(hf), str(back)]) == 0
    a, b = load_file(str(src / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.int32), b[name].view(torch.int32)), name  # the bits
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert (back / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert read_export(back).kind == read_export(src).kind


# --- the code travels alone ----------------------------------------------------------------------

def test_modelling_code_imports_only_torch_and_transformers(chat_hf):
    for name in ("modeling_palm.py", "configuration_palm.py"):
        tree = ast.parse((chat_hf / name).read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module}
        assert roots <= {"__future__", "typing", "torch", "transformers"}, (name, roots)
    config = json.loads((chat_hf / "config.json").read_text())
    assert config["model_type"] == "palm_rlhf" and config["architectures"] == ["PalmForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_palm.PalmForCausalLM"


# --- errors: one line each ------------------------------------------------------------------------

def one_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {argv[0]}: "), err
    return lines[0]


def test_export_errors(chat, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a complete model export" in one_error(capsys, ["export", "hf", str(empty), str(tmp_path / "o1")])
    value = with_kind(shutil.copytree(chat, tmp_path / "value"), "value")
    line = one_error(capsys, ["export", "hf", str(value), str(tmp_path / "o2")])
    assert "'value' model cannot be exported" in line and "exportable: pretrain, sft, ppo, dpo, reward" in line
    line = one_error(capsys, ["export", "hf", str(chat), str(chat)])  # would overwrite the model itself
    assert "already exists and is not an empty folder" in line
    assert sorted(p.name for p in chat.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_import_errors(chat, chat_hf, tmp_path, capsys):
    # a project export is not a transformers folder
    line = one_error(capsys, ["import", "hf", str(chat), str(tmp_path / "o1")])
    assert "model_type None, not 'palm_rlhf'" in line and "palm export hf" in line
    # another architecture's transformers folder
    llama = shutil.copytree(chat_hf, tmp_path / "llama")
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert "model_type 'llama', not 'palm_rlhf'" in one_error(capsys, ["import", "hf", str(llama), str(tmp_path / "o2")])
    # an export whose tokenizer was replaced
    other = shutil.copytree(chat_hf, tmp_path / "other")
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace("<|end|>", "<|END|>"))
    assert "is not the tokenizer the model was trained with" in one_error(
        capsys, ["import", "hf", str(other), str(tmp_path / "o3")])
    assert "no such folder" in one_error(capsys, ["import", "hf", str(tmp_path / "nowhere"), str(tmp_path / "o4")])
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
