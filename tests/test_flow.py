"""pipelines.flow checks its Prefect parameters against the DAG before anything reaches DVC."""

from __future__ import annotations

import pytest

from conftest import ROOT
from palm.errors import UserError
from pipelines.flow import plan, stages_in_order


def test_stages_are_checked_against_the_dag_and_run_in_its_order():
    order = stages_in_order(ROOT)
    assert plan(str(ROOT)) == (ROOT.resolve(), order)
    assert plan(str(ROOT), []) == (ROOT.resolve(), order)
    assert plan(str(ROOT), list(reversed(order[:2])))[1] == order[:2]  # DAG order, not the given one
    for bad in (["no-such-stage"], ["--force"], [order[0], "scrape; rm -rf /"]):
        with pytest.raises(UserError, match=r"^pipeline stages: unknown stage .*; the DAG has ") as err:
            plan(str(ROOT), bad)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="expected a list of stage names"):
        plan(str(ROOT), "scrape")  # a string is not a list of names


def test_root_must_be_a_readable_dvc_project(tmp_path):
    for root in (str(tmp_path), str(tmp_path / "missing"), "", "relative/nowhere"):
        with pytest.raises(UserError, match=r"^pipeline root: .* is not a project folder \(no dvc.yaml there\)$"):
            plan(root)
    (tmp_path / "dvc.yaml").write_text("stages: [this is not a stage mapping\n")
    with pytest.raises(UserError, match=r"^pipeline root: DVC cannot read the pipeline in ") as err:
        plan(str(tmp_path))
    assert "\n" not in str(err.value)
