"""Strict loading of typed, frozen config dataclasses from ``params.yaml`` sections.

Every stage has one frozen dataclass; :func:`from_dict` builds it from a mapping and refuses
unknown keys, wrong types and (through the class's ``__post_init__``) impossible values, with a
:class:`~palm.core.errors.ConfigError` whose key is the dotted params name, e.g. ``scrape.max_pages``.
"""

from __future__ import annotations

import dataclasses
import difflib
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


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
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
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a config class declared a type this loader does not know
        raise TypeError(f"unsupported config field type {tp!r} for {key}")
    raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")


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
            raise ConfigError(f"{prefix}{key}", f"unknown key{hint}; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{prefix}{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}", f"missing; expected {_type_name(hints[name])}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(section) if section else err


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
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}".replace("\n", " "))
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of stage sections at the top level")
    return data


def load_section(cls: type[T], params_path: str | Path, section: str) -> T:
    """Load ``section`` of ``params_path`` into ``cls`` strictly."""
    params = read_params(params_path)
    if section not in params:
        raise ConfigError(section, f"section missing from {params_path}")
    return from_dict(cls, params[section] if params[section] is not None else {}, section)
