"""Caches that other users, or a tracking server, could plant things in (issue "Hostile neighbours").

The native kernel cache (palm/decode/native): a library is loaded only from a folder of this
user's that nobody else can write to, and only if the file is this user's, not a symlink, and not
writable by others; with no home folder the cache is a per-user folder made 0700. The planted
libraries are real: compiled with a constructor that writes a marker file, so loading one is
seen. Another user is real too where the tests run as root (CI): a folder or file ``chown``-ed to
``nobody`` (65534); elsewhere ``os.getuid`` is made to answer another uid.

The model download cache (palm/ops/registry.py): a registered version's name, number and md5 tag
and the export path in its downloaded MLmodel come from the tracking server; none may make the
download write, replace or point outside the cache. On a real MLflow registry (SQLite in a
temporary folder), with a crafted tag and crafted MLmodel files; a crafted name (which MLflow's
own client refuses to register, but a hostile server can answer with) by the version the server
returns."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from palm.core.errors import UserError
from palm.decode import native
from palm.ops import registry

NOBODY = 65534
EVIL_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("a planted library ran", f); fclose(f); }
}
int palm_decode_abi(void) { return 3; }
"""


# --- the native kernel cache ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory) -> str:
    """The file name ``load`` looks for here (``decode-<tag>.so``): what an attacker would plant."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler: no kernel is built or loaded here")
    folder = tmp_path_factory.mktemp("learn")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PALM_NATIVE_CACHE", str(folder))
        mp.delenv("CC", raising=False)
        mp.setattr(native, "_LOADED", {})
        if native.load() is None:
            pytest.skip("no compiled kernel here (PALM_NATIVE=0, or the build failed)")
    (so,) = folder.glob("decode-*.so")
    return so.name


@pytest.fixture
def fresh(monkeypatch):
    """A new process as far as ``load`` goes: nothing loaded yet, the default compiler."""
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("PALM_NATIVE", raising=False)


def plant(path: Path, marker: Path) -> Path:
    """Compile, at ``path``, a library whose constructor writes ``marker`` when it is loaded."""
    src = path.parent / "evil.c"
    src.write_text(EVIL_C)
    subprocess.run(["cc", "-shared", "-fPIC", f'-DMARKER="{marker}"', str(src), "-o", str(path)], check=True)
    src.unlink()
    return path


def load_warned() -> tuple[object, list[str]]:
    """``native.load()`` and the RuntimeWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lib = native.load()
    return lib, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def is_the_kernel(lib) -> bool:
    return lib is not None and lib.palm_decode_abi() == native.ABI and hasattr(lib, "palm_greedy")


def as_another_user(path: Path, monkeypatch, how: str) -> None:
    """Make ``path`` another user's: really (chown to nobody, as root), or as ``load`` sees it."""
    if how == "chown":
        if os.getuid() != 0:
            pytest.skip("chown to another user needs root (CI runs as root)")
        os.chown(path, NOBODY, NOBODY)
    else:
        uid = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: uid + 1)


def test_a_library_in_a_folder_others_can_write_is_not_loaded(kernel_name, fresh, tmp_path, monkeypatch):
    """The reproduced attack's folder: shared, writable by all, a library of the right name in it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    marker = tmp_path / "marker"
    planted = plant(shared / kernel_name, marker)
    monkeypatch.setenv("PALM_NATIVE_CACHE", str(shared))
    lib, warned = load_warned()
    assert not marker.exists(), "the planted library was loaded: its constructor ran"
    assert is_the_kernel(lib)  # built privately instead: the kernel is not lost
    assert len(warned) == 1 and f"{shared} is writable by other users (mode 777)" in warned[0], warned
    assert "private folder" in warned[0] and "PALM_NATIVE_CACHE" in warned[0]
    assert planted.is_file() and sorted(p.name for p in shared.iterdir()) == [kernel_name]  # left alone


@pytest.mark.parametrize("how", ["chown", "getuid"])
def test_a_library_in_another_users_folder_is_not_loaded(kernel_name, fresh, tmp_path, monkeypatch, how):
    """The folder and its library belong to someone else (mode 0755/0644: nothing writable)."""
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    marker = tmp_path / "marker"
    planted = plant(theirs / kernel_name, marker)
    planted.chmod(0o644)
    if how == "chown":
        as_another_user(planted, monkeypatch, how)
    as_another_user(theirs, monkeypatch, how)
    monkeypatch.setenv("PALM_NATIVE_CACHE", str(theirs))
    lib, warned = load_warned()
    assert not marker.exists(), "the planted library was loaded: its constructor ran"
    assert is_the_kernel(lib)
    assert len(warned) == 1 and f"{theirs} is owned by uid" in warned[0] and "not by this user" in warned[0], warned


@pytest.mark.parametrize("how", ["group-writable", "world-writable", "another owner", "a symlink"])
def test_an_unsafe_library_in_this_users_folder_is_built_again_not_loaded(kernel_name, fresh, tmp_path,
                                                                          monkeypatch, how):
    """The folder is fine (this user's, 0700); the file is not: replaced by a fresh build."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    marker = tmp_path / "marker"
    target = cache / kernel_name
    if how == "a symlink":
        plant(tmp_path / "evil.so", marker).chmod(0o600)
        target.symlink_to(tmp_path / "evil.so")
    else:
        plant(target, marker)
        target.chmod({"group-writable": 0o620, "world-writable": 0o602, "another owner": 0o644}[how])
        if how == "another owner":
            as_another_user(target, monkeypatch, "chown")
    monkeypatch.setenv("PALM_NATIVE_CACHE", str(cache))
    lib, warned = load_warned()
    assert not marker.exists(), "the planted library was loaded: its constructor ran"
    assert is_the_kernel(lib)
    assert len(warned) == 1 and f"{target} is " in warned[0] and "built again" in warned[0], warned
    st = os.lstat(target)  # the rebuilt library: a regular file of this user's alone
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
    monkeypatch.setattr(native, "_LOADED", {})  # a new process: the rebuilt library is loaded, silently
    assert load_warned()[1] == []


def no_home(monkeypatch, tmp: Path) -> None:
    """No home folder known (HOME unset, no passwd entry) and ``tmp`` as the temporary folder."""
    import pwd

    for var in ("PALM_NATIVE_CACHE", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(var, raising=False)

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    with pytest.raises(RuntimeError):
        Path.home()


def test_without_a_home_folder_the_cache_is_this_users_own_and_0700(kernel_name, fresh, tmp_path, monkeypatch):
    no_home(monkeypatch, tmp_path)
    lib, warned = load_warned()
    assert is_the_kernel(lib) and warned == []
    mine = tmp_path / f"palm-rlhf-{os.getuid()}"
    st = os.lstat(mine)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
    assert sorted(p.name for p in mine.iterdir()) == [kernel_name]
    assert not (tmp_path / "palm-rlhf").exists()  # not the old path every user shared


@pytest.mark.parametrize("how", ["chown", "world-writable"])
def test_without_a_home_folder_a_per_user_folder_planted_first_is_not_used(kernel_name, fresh, tmp_path,
                                                                         monkeypatch, how):
    """Another user made ``palm-rlhf-<my uid>`` first, a library in it: a private folder instead."""
    no_home(monkeypatch, tmp_path)
    planted_dir = tmp_path / f"palm-rlhf-{os.getuid()}"
    planted_dir.mkdir()
    marker = tmp_path / "marker"
    plant(planted_dir / kernel_name, marker).chmod(0o755)
    if how == "chown":
        as_another_user(planted_dir / kernel_name, monkeypatch, how)
        as_another_user(planted_dir, monkeypatch, how)
    else:
        planted_dir.chmod(0o777)
    lib, warned = load_warned()
    assert not marker.exists(), "the planted library was loaded: its constructor ran"
    assert is_the_kernel(lib)
    assert len(warned) == 1 and str(planted_dir) in warned[0] and "private folder" in warned[0], warned
    # the private folder is gone again (the library stays mapped), nothing else was left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [planted_dir.name]


def test_a_build_under_a_group_writable_umask_is_still_loaded_silently(kernel_name, fresh, tmp_path, monkeypatch):
    """Under umask 002 (user private groups) the linker writes a 0775 library: the build makes it
    this user's alone, so the cache keeps working instead of being refused as unsafe."""
    monkeypatch.setenv("PALM_NATIVE_CACHE", str(tmp_path / "cache"))
    old = os.umask(0o002)
    try:
        lib, warned = load_warned()
        monkeypatch.setattr(native, "_LOADED", {})
        again, warned_again = load_warned()
    finally:
        os.umask(old)
    assert is_the_kernel(lib) and is_the_kernel(again) and warned == warned_again == []
    assert stat.S_IMODE(os.lstat(tmp_path / "cache" / kernel_name).st_mode) == 0o700


# --- the model download cache --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real MLflow registry on SQLite, and the model cache, in a temporary folder (for this
    module: a new SQLite registry takes seconds); ``register`` makes version 1 of a new model from
    a folder holding ``mlmodel`` (an MLmodel file's dict; default palm-rlhf's layout) and an
    export at ``artifacts/model``, with ``tags``, and returns its URI."""
    import mlflow

    tmp = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        mp.setenv(registry.CACHE_ENV, str(tmp / "cache"))
        c = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
        exp = c.create_experiment("security", artifact_location=(tmp / "artifacts").as_uri())

        def register(name: str, tags: dict, mlmodel: dict | None = None) -> str:
            model = tmp / "src" / name
            (model / "artifacts" / "model").mkdir(parents=True)
            (model / "artifacts" / "model" / "config.json").write_text("{}")
            mlmodel = mlmodel or {"flavors": {"python_function": {"artifacts": {"model": {"path": "artifacts/model"}}}}}
            (model / "MLmodel").write_text(yaml.safe_dump(mlmodel))
            run = c.create_run(exp).info.run_id
            c.log_artifacts(run, str(model), f"registry/{name}")
            c.create_registered_model(name)
            c.create_model_version(name, f"runs:/{run}/registry/{name}", run_id=run, tags=tags)
            c.set_terminated(run)
            return f"models:/{name}/1"

        yield SimpleNamespace(client=c, register=register, cache=tmp / "cache", tmp=tmp)


def victim(folder: Path) -> Path:
    """A folder outside the cache with a file in it, as the attack's ``~/.ssh``."""
    folder.mkdir(parents=True)
    (folder / "id_ed25519").write_text("private key")
    return folder


def intact(folder: Path) -> bool:
    return sorted(p.name for p in folder.iterdir()) == ["id_ed25519"] and \
        (folder / "id_ed25519").read_text() == "private key"


GOOD_MD5 = "0123456789abcdef0123456789abcdef.dir"


def test_a_good_version_downloads_into_the_cache(store):
    uri = store.register("palm-good", {"dvc.md5": GOOD_MD5})
    folder = registry.resolve(uri)
    assert folder == store.cache / "palm-good" / "1-0123456789ab" / "artifacts" / "model"
    assert (folder / "config.json").is_file()


def test_a_crafted_md5_tag_cannot_replace_a_folder_outside_the_cache(store):
    """The reproduced attack, by the tag alone: ``CACHE/NAME/1-<tag[:12]>`` with the tag
    ``/../../../vi`` is ``CACHE/../vi``, a folder beside the cache the download would replace."""
    outside = victim(store.tmp / "vi")
    uri = store.register("palm-tagged", {"dvc.md5": "/../../../vi"})
    with pytest.raises(UserError, match=r"tag dvc.md5 '/\.\./\.\./\.\./vi' is not a DVC md5 \(expected 32 hex"):
        registry.resolve(uri)
    assert intact(outside)


def test_a_crafted_name_from_the_server_cannot_replace_a_folder_outside_the_cache(store, monkeypatch):
    """The reproduced attack: the server answers with the name ``<somewhere>/home/x`` and the tag
    ``/../../.ssh``; MLflow's client refuses such a name, so the server's answer is stood in for."""
    outside = victim(store.tmp / "home" / ".ssh")
    uri = store.register("palm-named", {"dvc.md5": GOOD_MD5})
    real = registry.get_version

    def hostile(c, u):
        v = real(c, u)
        return SimpleNamespace(name=str(store.tmp / "home" / "x"), version=v.version,
                               tags={"dvc.md5": "/../../.ssh"}, run_id=v.run_id)

    monkeypatch.setattr(registry, "get_version", hostile)
    with pytest.raises(UserError, match=r"registered model name '/.*/home/x': not a name this cache takes"):
        registry.resolve(uri)
    assert intact(outside)


@pytest.mark.parametrize("name, version, md5, expected", [
    ("/abs/home/x", "1", GOOD_MD5, "registered model name '/abs/home/x'"),
    ("..", "1", GOOD_MD5, "registered model name '..'"),
    ("a/../../b", "1", GOOD_MD5, "registered model name 'a/../../b'"),
    ("palm-chat", "1/../..", GOOD_MD5, "model version '1/../..' is not a version number"),
    ("palm-chat", "1", "/../../.ssh", "tag dvc.md5 '/../../.ssh' is not a DVC md5"),
    ("palm-chat", "1", "0123456789ab/../../../x", "tag dvc.md5 '0123456789ab/../../../x'"),
])
def test_cache_folder_refuses_names_versions_and_tags_that_are_not_plain(tmp_path, name, version, md5, expected):
    with pytest.raises(UserError) as err:
        registry.cache_folder(name, version, md5, tmp_path / "cache")
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert registry.cache_folder("palm-chat", "3", GOOD_MD5, tmp_path / "cache") == \
        tmp_path / "cache" / "palm-chat" / "3-0123456789ab"
    assert registry.cache_folder("palm-chat", 3, None, tmp_path / "cache").name == "3-unknown"


def test_a_cache_folder_that_is_a_symlink_out_of_the_cache_is_refused(tmp_path):
    elsewhere = victim(tmp_path / "elsewhere")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "palm-chat").symlink_to(elsewhere)
    with pytest.raises(UserError, match="outside"):
        registry.cache_folder("palm-chat", "1", GOOD_MD5, tmp_path / "cache")
    assert intact(elsewhere)


@pytest.mark.parametrize("n, path", enumerate(["ABSOLUTE", "../../../outside", "artifacts/../../../outside", "."]))
def test_an_mlmodel_artifact_path_outside_the_model_folder_is_refused(store, tmp_path, n, path):
    """A downloaded MLmodel whose export path is absolute or leaves the model folder: refused, and
    the download is not kept in the cache."""
    outside = victim(tmp_path / "outside")
    path = str(outside) if path == "ABSOLUTE" else path
    mlmodel = {"flavors": {"python_function": {"artifacts": {"model": {"path": path}}}}}
    uri = store.register(f"palm-mlmodel-{n}", {"dvc.md5": GOOD_MD5}, mlmodel)
    with pytest.raises(UserError, match=re.escape(f"artifact path {path!r}")) as err:
        registry.resolve(uri)
    assert "\n" not in str(err.value)
    assert intact(outside)
    assert not (store.cache / f"palm-mlmodel-{n}" / "1-0123456789ab").exists()


def test_a_failed_download_names_no_password(store):
    """A version whose artifacts sit behind an HTTP store with a user and password in its URL, the
    store unreachable: the one-line error says which download failed, without the password
    (MLflow's own error names the URL it requested)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing answers there
    c = store.client
    exp = c.create_experiment("behind-a-password", artifact_location=f"http://user:s3cret@127.0.0.1:{port}/artifacts")
    run = c.create_run(exp).info.run_id
    c.create_registered_model("palm-hidden")
    c.create_model_version("palm-hidden", f"runs:/{run}/registry/palm-hidden", run_id=run,
                           tags={"dvc.md5": GOOD_MD5})
    with pytest.raises(UserError) as err:
        registry.resolve("models:/palm-hidden/1")
    message = str(err.value)
    assert "s3cret" not in message and "models:/palm-hidden/1" in message and "\n" not in message, message
    assert not (store.cache / "palm-hidden").exists() or not any((store.cache / "palm-hidden").rglob("MLmodel"))


# --- fuzzing findings: what a tracking server answers, what a user types ------------------------------

def test_a_champion_metric_tag_that_is_not_a_number_counts_as_missing(store):
    """Fuzzing found a ValueError from ``float`` on the champion's tag: registration goes on, the
    new version becomes champion, and a warning line says why."""
    c = store.client
    store.register(registry.CHAT, {"dvc.md5": GOOD_MD5, "palm.metric.win_rate": "high"})
    c.set_registered_model_alias(registry.CHAT, "champion", "1")
    said = []
    assert registry.champion_alias(c, 2, 0.5, "win_rate", "max", said.append) == "champion"
    assert len(said) == 1 and "palm.metric.win_rate 'high', not a number" in said[0] and "\n" not in said[0]
    c.set_model_version_tag(registry.CHAT, "1", "palm.metric.win_rate", "0.75")  # a number again: compared
    assert registry.champion_alias(c, 2, 0.5, "win_rate", "max", said.append) == "candidate"
    assert registry.champion_alias(c, 1, 0.5, "win_rate", "max", said.append) == "champion"  # it is the champion


def test_a_champion_version_that_is_not_a_number_is_not_this_version():
    from mlflow.exceptions import MlflowException  # noqa: F401 - champion_alias imports it too

    champ = SimpleNamespace(version="abc", tags={"palm.metric.kl": "0.5"})
    c = SimpleNamespace(get_model_version_by_alias=lambda name, alias: champ)
    assert registry.champion_alias(c, 1, 0.25, "kl", "min", print) == "champion"
    assert registry.champion_alias(c, 1, 0.75, "kl", "min", print) == "candidate"


def test_lineage_shows_a_run_the_tags_name_that_is_gone_as_missing(store):
    """Fuzzing found an MlflowException from ``get_run`` for a run a tag names that the server
    does not hold (deleted): the run is shown as missing, the rest of the chain still."""
    c = store.client
    uri = store.register("palm-lineage-gone", {"dvc.md5": GOOD_MD5})
    run = c.get_model_version("palm-lineage-gone", "1").run_id
    c.set_tag(run, "palm.ops.stage", "ppo")
    c.set_tag(run, "dvc.dep.models/sft.md5", GOOD_MD5)
    c.set_tag(run, "palm.input.models/sft.run_id", "0" * 32)  # no such run
    info = registry.lineage(uri)
    assert info["order"] == [run, "0" * 32] and info["runs"]["0" * 32]["status"] == "MISSING"
    lines = list(registry.format_lineage(info))
    assert any(line.strip().startswith(f"run {'0' * 32} [missing: not in the tracking server") for line in lines), lines
    assert all("\n" not in line for line in lines)
    assert '"MISSING"' in registry.lineage_json(info)


def test_lineage_of_a_version_that_is_not_a_number_is_a_one_line_error(store, monkeypatch):
    """Fuzzing found a ValueError from ``int`` on the version the server answered."""
    store.register("palm-lineage-odd", {"dvc.md5": GOOD_MD5})
    monkeypatch.setattr(registry, "get_version",
                        lambda c, u: SimpleNamespace(name="palm-lineage-odd", version="1.5", run_id=None, tags={}))
    with pytest.raises(UserError, match=r"answered version '1\.5' of palm-lineage-odd, not a version number") as err:
        registry.lineage("models:/palm-lineage-odd/1")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content, expected", [
    (b"flavors: [unclosed\n", "not YAML"),
    (b"flavors: \xff\xfe\n", "not UTF-8 text"),
    (b"[" * 5000 + b"]" * 5000, "nested too deep"),
    (None, "unreadable"),
])
def test_an_mlmodel_file_that_cannot_be_read_is_a_one_line_error_naming_it(tmp_path, content, expected):
    """Fuzzing found yaml errors, UnicodeDecodeError and RecursionError from reading an MLmodel."""
    if content is not None:
        (tmp_path / "MLmodel").write_bytes(content)
    with pytest.raises(UserError) as err:
        registry.export_folder(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'MLmodel'}: not a readable MLmodel file (") and expected in message
    assert "\n" not in message and "\r" not in message, message


@pytest.mark.parametrize("uri", ["models:/palm-chat@champion\n", "models:/palm\nchat@champion", "mod\rels:/x",
                                 "models:/nothing-here\n/1"])
def test_a_uri_with_a_line_break_gives_a_one_line_error(store, uri):
    """Fuzzing found UserErrors of two lines: the URI the user gave, with its ``\\n``, in them."""
    with pytest.raises(UserError) as err:
        registry.get_version(store.client, uri)
    assert "\n" not in str(err.value) and "\r" not in str(err.value)
    assert repr(uri)[1:-1] in str(err.value)


def test_an_mlmodel_artifact_path_with_a_nul_byte_is_a_one_line_error(tmp_path):
    """Found by ``make fuzz``: a NUL byte in the MLmodel's artifact path made ``Path.resolve``
    raise ValueError out of :func:`registry.export_folder`."""
    (tmp_path / "MLmodel").write_text(yaml.safe_dump(
        {"flavors": {"python_function": {"artifacts": {"model": {"path": "\x00"}}}}}))
    with pytest.raises(UserError, match="not a usable path") as err:
        registry.export_folder(tmp_path)
    assert "\n" not in str(err.value)
