"""Exports in the Hugging Face transformers format, and back (``palm export hf``, ``palm import hf``).

A transformers folder (:func:`export_hf`) holds:

* ``config.json``: the architecture under transformers' field names, ``model_type`` ``palm_rlhf``,
  ``auto_map`` to the two code files below, the special token ids, and the project's own
  ``config.json`` as ``palm_export`` (what :func:`import_hf` writes back);
* ``configuration_palm.py``, ``modeling_palm.py``: the model in plain PyTorch
  (:mod:`palm.model.hf_modeling`, copied as they are), loaded with ``trust_remote_code=True``;
  a language model (kinds pretrain, sft, ppo, dpo) is ``PalmForCausalLM``, a reward model
  ``PalmForSequenceClassification`` (one label: the raw reward);
* ``model.safetensors``: the same tensors under the transformers modules' names
  (:data:`WEIGHTS`; the key/value projection split into ``k_proj`` and ``v_proj``; the output
  layer is the embedding, tied, so it is stored once);
* ``tokenizer.json`` (the export's own file, byte for byte), ``tokenizer_config.json`` with the
  project's chat template as a Jinja ``chat_template``, ``special_tokens_map.json``, and for a
  language model ``generation_config.json`` (stops at end of turn or end of text, as ``palm chat``).

:func:`import_hf` reverses the renaming, so export then import gives the original tensors bit
for bit, its ``config.json`` and its ``tokenizer.json``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from palm.core.errors import UserError
from palm.core.tokenizer import ASSISTANT, END_TURN, PAD, SYSTEM, USER

if TYPE_CHECKING:
    from palm.model.export import Export

MODEL_TYPE = "palm_rlhf"
CODE = Path(__file__).resolve().parent / "hf_modeling"
# copied into every export (named whole so that palm/ops/deps.py sees them as the evaluate stage's code)
CODE_FILES = (CODE / "configuration_palm.py", CODE / "modeling_palm.py")
AUTO_MAP = {
    "AutoConfig": "configuration_palm.PalmConfig",
    "AutoModel": "modeling_palm.PalmModel",
    "AutoModelForCausalLM": "modeling_palm.PalmForCausalLM",
    "AutoModelForSequenceClassification": "modeling_palm.PalmForSequenceClassification",
}
# the transformers class of each exportable kind
ARCHITECTURES = {"pretrain": "PalmForCausalLM", "sft": "PalmForCausalLM", "ppo": "PalmForCausalLM",
                 "dpo": "PalmForCausalLM", "reward": "PalmForSequenceClassification"}

# weights: project name -> transformers name, per block (``layers.{i}.``) and outside the blocks;
# the key/value projection ``attn.kv`` [2*hd, d] is rows [:hd] the key, [hd:] the value
BLOCK_WEIGHTS = {
    "norm.weight": "input_layernorm.weight",
    "attn.q.weight": "self_attn.q_proj.weight",
    "attn.out.weight": "self_attn.o_proj.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
KV, KEY, VALUE = "attn.kv.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"
WEIGHTS = {"embedding.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
           "head.weight": "score.weight"}
_BLOCK = re.compile(r"layers\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")

# The project's chat template (palm/data/chat.py): each turn is its role token, its text and
# <|end|>; a generation prompt ends with <|assistant|>. Another role, or content that is not text,
# is an error rather than a silently different prompt.
CHAT_TEMPLATE = (
    "{%- set roles = {'system': '" + SYSTEM + "', 'user': '" + USER + "', 'assistant': '" + ASSISTANT + "'} -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in roles -%}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ': system, user or assistant') }}"
    "{%- endif -%}"
    "{%- if message['content'] is not string -%}"
    "{{ raise_exception('message content must be text') }}"
    "{%- endif -%}"
    "{{ roles[message['role']] ~ message['content'] ~ '" + END_TURN + "' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + ASSISTANT + "' }}{%- endif -%}"
)


# --- weights ------------------------------------------------------------------------------------

def to_hf(tensors: dict[str, Any], where: Path) -> dict[str, Any]:
    """The project's tensors under the transformers modules' names."""
    out = {}
    for name, t in tensors.items():
        block = _BLOCK.fullmatch(name)
        if name in WEIGHTS:
            out[WEIGHTS[name]] = t
        elif block and block[2] == KV:
            key, value = t.chunk(2, dim=0)
            out[f"model.layers.{block[1]}.{KEY}"] = key.contiguous()
            out[f"model.layers.{block[1]}.{VALUE}"] = value.contiguous()
        elif block and block[2] in BLOCK_WEIGHTS:
            out[f"model.layers.{block[1]}.{BLOCK_WEIGHTS[block[2]]}"] = t
        else:
            raise UserError(f"{where}: weight {name!r} has no Hugging Face counterpart; only plain palm exports "
                            "(no adapters, one whole model) can be exported")
    return out


def from_hf(tensors: dict[str, Any], where: Path) -> dict[str, Any]:
    """The inverse of :func:`to_hf`."""
    import torch

    back = {v: k for k, v in WEIGHTS.items()}
    block_back = {v: k for k, v in BLOCK_WEIGHTS.items()}
    out, halves = {}, {}
    for name, t in tensors.items():
        block = _HF_BLOCK.fullmatch(name)
        if name in back:
            out[back[name]] = t
        elif block and block[2] in (KEY, VALUE):
            halves.setdefault(block[1], {})[block[2]] = t
        elif block and block[2] in block_back:
            out[f"layers.{block[1]}.{block_back[block[2]]}"] = t
        else:
            raise UserError(f"{where}: weight {name!r} is not one palm export hf writes; "
                            "only folders written by `palm export hf` can be imported")
    for layer, kv in halves.items():
        if set(kv) != {KEY, VALUE}:
            raise UserError(f"{where}: layer {layer} has {', '.join(kv)} but not both key and value projections; "
                            "export the model again with palm export hf")
        out[f"layers.{layer}.{KV}"] = torch.cat([kv[KEY], kv[VALUE]], dim=0)
    return out


# --- export -------------------------------------------------------------------------------------

def _kind(path: Path) -> str | None:
    """The kind a folder's config.json names, if it can be read (else read_export explains)."""
    try:
        config = json.loads((path / "config.json").read_text())
        return config.get("kind", "pretrain") if isinstance(config, dict) else None
    except (OSError, ValueError):
        return None


def _empty_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty folder; give a new folder for the output "
                        "(or remove this one first)")


def hf_config(export: "Export", ids: dict[str, int]) -> dict[str, Any]:
    """The transformers ``config.json`` of ``export``."""
    m = export.model
    arch = ARCHITECTURES[export.kind]
    config = {
        "architectures": [arch], "auto_map": AUTO_MAP, "model_type": MODEL_TYPE,
        "vocab_size": m.vocab_size, "padded_vocab_size": m.padded_vocab_size, "hidden_size": m.d_model,
        "intermediate_size": m.ffn_dim, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": 1, "head_dim": m.head_dim, "max_position_embeddings": m.seq_len,
        "rope_theta": m.rope_base, "layer_norm_eps": m.norm_eps, "initializer_range": m.init_std,
        "tie_word_embeddings": True, "use_cache": True, "dtype": "float32",
        "bos_token_id": None, "eos_token_id": [ids["end_turn_id"], ids["eod_id"]], "pad_token_id": ids["pad_id"],
        "palm_export": export.config,
    }
    if arch == "PalmForSequenceClassification":  # one output: the raw reward (config: reward mean, std)
        config.update(num_labels=1, id2label={"0": "reward"}, label2id={"reward": 0}, problem_type="regression")
    return config


def tokenizer_files(export: "Export", ids: dict[str, int]) -> dict[str, dict[str, Any]]:
    """``tokenizer_config.json``, ``special_tokens_map.json`` and, for a language model,
    ``generation_config.json``. Left padding for generation (each row's prompt ends where its
    reply starts); a reward model scores the last real token whichever side is padded."""
    special = {"eos_token": END_TURN, "pad_token": PAD}
    files = {
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast", **special, "bos_token": None, "unk_token": None,
            "chat_template": CHAT_TEMPLATE, "model_max_length": export.model.seq_len,
            "padding_side": "right" if export.is_reward else "left", "clean_up_tokenization_spaces": False,
        },
        "special_tokens_map.json": special,
    }
    if not export.is_reward:
        files["generation_config.json"] = {
            "eos_token_id": [ids["end_turn_id"], ids["eod_id"]], "pad_token_id": ids["pad_id"],
            "bos_token_id": None,
        }
    return files


def export_hf(ref: str | Path, out: str | Path) -> Path:
    """Write the export ``ref`` names (a folder or a registry URI) as a transformers folder ``out``
    (new, or an empty folder); returns ``out``."""
    from safetensors.torch import load_file, save_file

    from palm.core.io import atomic_dir
    from palm.core.tokenizer import special_ids
    from palm.model.export import load_tokenizer, read_export, resolve

    path, out = resolve(ref), Path(out)
    kind = _kind(path)
    if kind is not None and kind not in ARCHITECTURES:
        raise UserError(f"{path}/config.json: a {kind!r} model cannot be exported to Hugging Face "
                        f"(exportable: {', '.join(ARCHITECTURES)}); export a language or reward model")
    export = read_export(path, kinds=tuple(ARCHITECTURES))
    _empty_target(out)
    ids = special_ids(load_tokenizer(export))
    tensors = to_hf(load_file(str(export.path / "model.safetensors")), export.path / "model.safetensors")
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, data in {"config.json": hf_config(export, ids), **tokenizer_files(export, ids)}.items():
            (tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        shutil.copyfile(export.tokenizer_path, tmp / "tokenizer.json")
        for code in CODE_FILES:
            shutil.copyfile(code, tmp / code.name)
    return out


# --- import -------------------------------------------------------------------------------------

def read_hf(path: Path) -> dict[str, Any]:
    """The ``palm_export`` block of a folder written by :func:`export_hf`, checked."""
    not_ours = "only folders written by `palm export hf` can be imported"
    if not path.is_dir():
        raise UserError(f"{path}: no such folder (a Hugging Face folder written by `palm export hf`)")
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise UserError(f"{path}: not a palm Hugging Face export: {', '.join(missing)} missing; {not_ours}")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}/config.json: unreadable ({type(err).__name__}: {err}); {not_ours}") from None
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise UserError(f"{path}/config.json: model_type {found!r}, not {MODEL_TYPE!r}: not a palm model; {not_ours}")
    palm = config.get("palm_export")
    if not (isinstance(palm, dict) and isinstance(palm.get("model"), dict)
            and isinstance(palm.get("tokenizer_sha256"), str)):
        raise UserError(f"{path}/config.json: no palm_export block with the model and its tokenizer_sha256; "
                        f"{not_ours}")
    return palm


def import_hf(src: str | Path, out: str | Path) -> Path:
    """Write the transformers folder ``src`` (from :func:`export_hf`) back as a project export
    ``out`` (new, or an empty folder), checked as every stage checks its input; returns ``out``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from palm.core.io import atomic_dir
    from palm.core.tokenizer import sha256_file
    from palm.model.export import read_export

    src, out = Path(src), Path(out)
    palm = read_hf(src)
    sha = sha256_file(src / "tokenizer.json")
    if sha != palm["tokenizer_sha256"]:
        raise UserError(f"{src}/tokenizer.json: sha256 {sha[:12]}… is not the tokenizer the model was trained with "
                        f"({palm['tokenizer_sha256'][:12]}… in config.json palm_export); export the model again")
    _empty_target(out)
    try:
        hf = load_file(str(src / "model.safetensors"))
    except (OSError, SafetensorError) as err:
        raise UserError(f"{src}/model.safetensors: unreadable ({type(err).__name__}: {err}); "
                        "export the model again") from None
    tensors = from_hf(hf, src / "model.safetensors")
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(palm, indent=2, sort_keys=True) + "\n")
        shutil.copyfile(src / "tokenizer.json", tmp / "tokenizer.json")
        try:  # the folder every stage would accept, or the reason it would not
            read_export(tmp)
        except UserError as err:
            reason = str(err).replace(str(tmp), "the imported folder")
            raise UserError(f"{src}/config.json: palm_export is not a valid palm export ({reason})") from None
    return out
