"""The configuration reference (docs/reference/config.md): every params.yaml key is documented
where its dataclass field is defined, and the committed page is what the generator writes."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import typing

import pytest
import yaml
from helpers import ROOT

spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs" / "config_reference.py")
ref = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = ref  # dataclasses look their module up
spec.loader.exec_module(ref)


def params_keys(value: typing.Any, cls: type, prefix: str) -> list[tuple[str, type, str]]:
    """``(dotted key, class, field)`` for every key set in a params.yaml mapping, recursively
    (list entries of nested mappings as ``key[i].name``)."""
    found = []
    hints = typing.get_type_hints(cls)
    for name, inner in (value or {}).items():
        found.append((f"{prefix}{name}", cls, name))
        nested, how = ref._unwrap(hints[name]) if name in hints else (None, "")
        if nested is None or inner is None:
            continue
        if how == "list":
            for i, item in enumerate(inner):
                found += params_keys(item, nested, f"{prefix}{name}[{i}].")
        else:
            found += params_keys(inner, nested, f"{prefix}{name}.")
    return found


@pytest.fixture(scope="module")
def sections():
    return ref.sections()


def test_every_params_yaml_key_is_documented(sections):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    missing = []
    for section, cls in sections:
        for key, owner, name in params_keys(params[section], cls, f"{section}."):
            fields = {f.name for f in dataclasses.fields(owner)}
            if name not in fields:
                missing.append(f"{key} (not a field of {owner.__name__})")
            elif not ref.field_docs(owner).get(name) and not ref._unwrap(typing.get_type_hints(owner)[name])[0]:
                missing.append(key)
    assert missing == [], ("params.yaml keys without documentation: add a comment beside (or just above) "
                           "the field in its config dataclass:\n" + "\n".join(missing))


def test_every_key_of_the_reference_is_documented(sections):
    assert ref.undocumented() == [], "config fields without documentation (comment them where they are defined)"


def test_the_committed_page_is_the_generators_output(sections):
    assert ref.PAGE.exists() and ref.PAGE.read_text() == ref.render(), (
        f"{ref.PAGE.relative_to(ROOT)} is stale: run `{ref.REGENERATE}` and commit it")


def test_a_field_without_a_comment_is_caught():
    """The documentation reader takes comments above and beside a field, inherits a silent
    override's from the base, and reports a field with none (so the checks above can fail)."""

    @dataclasses.dataclass(frozen=True)
    class Base:
        # above, first line
        # above, second line
        a: int = 1  # and beside
        b: str = "x"

    @dataclasses.dataclass(frozen=True)
    class Child(Base):
        a: int = 2
        c: float = 0.5  # c's own

    docs = ref.field_docs(Child)
    assert docs == {"a": "above, first line above, second line and beside", "b": "", "c": "c's own"}
    rows = {k.path: k for k in ref.keys(Child)}
    assert rows["a"].default == "`2`" and rows["b"].doc == ""
