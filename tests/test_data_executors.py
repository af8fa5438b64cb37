"""The data stages on every executor: the same corpus parts and token shards, byte for byte, from
the local executor, a local Ray (started by the stage) and a real single-node Slurm (sbatch arrays
with dependencies; the `slurm` fixture). The pages are collected once, from the default source (the
pydoc site, fewer pages), and each executor runs the pipelines on that same collection."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import make_tokenizer

from palm.data.scrape import ScrapeConfig, collect, scrape
from palm.data.tokenize import TokenizeConfig, tokenize_corpus

pytestmark = [pytest.mark.e2e]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """The default scrape settings (pydoc), 60 pages, collected once into a work folder."""
    tmp = tmp_path_factory.mktemp("collected")
    cfg = ScrapeConfig(max_pages=60, tasks=3)
    collect(cfg, tmp / "work")
    return cfg, tmp / "work", make_tokenizer(tmp / "tok") / "tokenizer.json"


def _run(collected, tmp: Path, name: str, **executor) -> tuple[dict, dict, dict]:
    """Scrape (from the shared collection) and tokenize on one executor: (parts, shards, stats)."""
    cfg, work, tok = collected
    out = tmp / name
    shutil.copytree(work, out / "work")  # the collection is reused: collected.json is there
    for d in ("raw", "corpus", "tokens"):
        (out / d).mkdir(parents=True)
    stats = scrape(replace(cfg, **executor), out / "raw", out / "corpus", work=out / "work", progress=False)
    tokenize_corpus(out / "corpus", tok, out / "tokens", TokenizeConfig(tasks=2, **executor), progress=False)
    return _files(out / "corpus"), _files(out / "tokens"), stats


@pytest.fixture(scope="module")
def local(collected, tmp_path_factory):
    return _run(collected, tmp_path_factory.mktemp("local"), "local", executor="local", workers=2)


def test_local_and_ray_write_the_same_bytes(collected, local, tmp_path):
    parts, shards, stats = _run(collected, tmp_path, "ray", executor="ray", workers=2)
    assert stats["documents"] > 10 and len(parts) >= 2  # several parts, some documents dropped
    assert parts == local[0] and shards == local[1] and stats == local[2]
    import ray

    assert not ray.is_initialized()  # the stage stopped the Ray it started


def test_local_and_slurm_write_the_same_bytes(collected, local, tmp_path, slurm, monkeypatch):
    for key, value in slurm.items():  # sbatch and squeue find the test's cluster through SLURM_CONF
        monkeypatch.setenv(key, value)
    from palm.data.executors import SlurmConfig

    parts, shards, stats = _run(collected, tmp_path, "slurm", executor="slurm",
                                slurm=SlurmConfig(partition="debug", time="00:10:00", poll_s=1.0))
    assert parts == local[0] and shards == local[1] and stats == local[2]
    logs = tmp_path / "slurm" / "work"
    assert not logs.exists()  # done: the work folder (the sbatch scripts and logs in it) is gone


def test_a_bad_executor_setting_is_one_line(tmp_path):
    from palm.core.errors import ConfigError

    with pytest.raises(ConfigError, match="slurm.partition"):
        ScrapeConfig(executor="slurm")
    with pytest.raises(ConfigError, match="tasks"):
        TokenizeConfig(tasks=0)
