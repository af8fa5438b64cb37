"""Strict loading of typed, frozen config dataclasses from ``params.yaml`` sections.

Every stage has one frozen dataclass; :func:`from_dict` builds it from a mapping and refuses
unknown keys, wrong types and (through the class's ``__post_init__``) impossible values, with a
:class:`~palm.core.errors.ConfigError` whose key is the dotted params name, e.g. ``scrape.max_pages``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from palm.core.errors import ConfigError, UserError

T = TypeVar("T")


def check(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigError(key, message)`` unless ``condition`` holds (for ``__post_init__``)."""
    if not condition:
        raise ConfigError(key, message)


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        item = typing.get_args(tp)[0]
        return "a list of mappings" if dataclasses.is_dataclass(item) else f"a list of {type_name(item)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key)
            except ConfigError:
                if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                    raise  # a mapping for an optional section (e.g. lora): its own error names the key
                continue
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            (item_tp, *_) = typing.get_args(tp)
            return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, key)
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if -(2**63) <= value < 2**63:  # what a seed, a size or a count can be (torch's int64)
                return value
            raise ConfigError(key, f"expected an integer of 64 bits at most, got {_shown(value)}")
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # finite only: YAML's .inf and .nan pass comparisons like `> 0` (inf) or make them
            # all false, and then break arithmetic later (int(inf) in a derived size)
            number = float(value) if isinstance(value, float) or abs(value) < 2**1023 else math.inf
            if math.isfinite(number):
                return number
            raise ConfigError(key, f"expected a finite number, got {_shown(value)}")
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a config class declared a type this loader does not know
        raise TypeError(f"unsupported config field type {tp!r} for {key}")
    raise ConfigError(key, f"expected {type_name(tp)}, got {_shown(value)}")


def _shown(value: Any) -> str:
    """``repr(value)``; for an int too long to print (Python refuses over 4300 digits), its size."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value).bit_length() > 14_000:
        return f"an integer of {abs(value).bit_length()} bits"
    return repr(value)


def _key_name(key: Any) -> str:
    """A params key as an error message shows it: as written, or quoted where it holds a line
    break or another character that does not print (the message stays one line)."""
    text = key if isinstance(key, str) else str(key)
    return text if text.isprintable() else repr(text)


def from_dict(cls: type[T], data: dict[str, Any], section: str = "") -> T:
    """Build ``cls`` from ``data``; every error names ``section.key``."""
    if not isinstance(data, dict):
        raise ConfigError(section, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{section}." if section else ""
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{prefix}{_key_name(key)}", f"unknown key{hint}; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{prefix}{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}", f"missing; expected {type_name(hints[name])}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(section) if section else err
    except (OverflowError, ZeroDivisionError) as err:  # a class's checks doing arithmetic on extreme values
        raise ConfigError(section, f"values out of range ({err}): {_shown(data)}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """The inverse of :func:`from_dict` (tuples become lists), for logging and checkpoints."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def read_params(path: str | Path) -> dict[str, Any]:
    """The whole ``params.yaml`` as a mapping (a clear error if it is missing or not YAML)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: params file not found; run from the project root or pass --params")
    except (OSError, UnicodeDecodeError) as err:  # a folder, unreadable, not UTF-8 text
        raise UserError(" ".join(f"{path}: cannot read the params file ({type(err).__name__}: {err})".split()))
    except (yaml.YAMLError, ValueError) as err:  # ValueError: a scalar YAML cannot build (2001-13-45)
        raise UserError(" ".join(f"{path}: not valid YAML: {err}".split()))
    except RecursionError:  # YAML's composer recurses once per level of nesting
        raise UserError(f"{path}: not valid YAML: nested deeper than the parser goes") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of stage sections at the top level")
    return data


def load_section(cls: type[T], params_path: str | Path, section: str) -> T:
    """Load ``section`` of ``params_path`` into ``cls`` strictly."""
    params = read_params(params_path)
    if section not in params:
        raise ConfigError(section, f"section missing from {params_path}")
    return from_dict(cls, params[section] if params[section] is not None else {}, section)
