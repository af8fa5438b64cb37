"""Models that stay usable (palm/model/parallel.py's GroupHold, palm/apps/serving.py): every model
loaded for inference in a process shares one set of megatron process groups, up while any of them
lives. Loading, swapping and dropping models in any order leaves the others working, and nothing is
printed at interpreter exit.

The pyfunc test runs the real path of ``mlflow.pyfunc.load_model("models:/palm-chat@champion")``
(the pyfunc model a registered version holds, saved by :func:`palm.ops.registry.save_pyfunc`, on
tiny exports) in a subprocess, so that interpreter exit is seen too."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import ROOT, make_parent, make_reward, make_tokenizer, with_kind  # noqa: E402

from palm.model import parallel  # noqa: E402

# a new user's session: models loaded one after another, each rebinding or dropping the last
SESSION = r'''
import gc
import sys

import mlflow.pyfunc
import pandas as pd

sft, ppo, reward = sys.argv[1:4]
ASK = ["What does `json.dumps` do?"]
PARAMS = {"max_new_tokens": 4, "temperature": 0.0}


def chat(model):
    out = model.predict(ASK, params=PARAMS)
    assert len(out) == 1 and isinstance(out[0], str), out
    return out


def score(model):
    out = model.predict(pd.DataFrame({"prompt": ASK, "response": ["It writes JSON."]}))
    assert len(out) == 1, out
    return float(out[0])


a = mlflow.pyfunc.load_model(sft)
first = chat(a)
b = mlflow.pyfunc.load_model(ppo)
chat(b)
del a  # the first model loaded goes first
gc.collect()
second = chat(b)
c = mlflow.pyfunc.load_model(reward)
scored = score(c)
del b  # then the one in the middle
gc.collect()
assert score(c) == scored
a = mlflow.pyfunc.load_model(sft)
del c  # then the last one loaded, while an older one is back
gc.collect()
assert chat(a) == first
b = mlflow.pyfunc.load_model(ppo)
assert chat(b) == second
print("all predictions done")
# two models still loaded at exit
'''


def up() -> bool:
    from megatron.core import parallel_state

    return parallel_state.model_parallel_is_initialized()


def test_pyfunc_models_loaded_swapped_and_dropped_in_any_order_keep_working(tmp_path):
    from palm.ops.registry import save_pyfunc

    tok = make_tokenizer(tmp_path / "tok")
    exports = {"sft": with_kind(make_parent(tmp_path / "sft", tok, seed=11), "sft"),
               "ppo": with_kind(make_parent(tmp_path / "ppo", tok, seed=12), "ppo"),
               "reward": make_reward(tmp_path / "reward", tok)}
    pyfuncs = [str(save_pyfunc(tmp_path / "pyfunc" / kind, folder, kind)) for kind, folder in exports.items()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SESSION, *pyfuncs], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "all predictions done" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Exception ignored" not in proc.stderr, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]


def test_holds_share_the_groups_and_the_last_one_released_ends_them():
    assert not up(), "a test before this one left process groups up"
    a, b = parallel.GroupHold(), parallel.GroupHold()
    assert up()
    del a  # dropped: released
    gc.collect()
    assert up()
    b.release()
    assert not up()
    b.release()  # a second time: nothing
    c = parallel.GroupHold()  # started again
    del b
    assert up()
    del c
    assert not up()


def test_a_hold_in_a_callers_groups_leaves_them_to_the_caller(single):
    hold = parallel.GroupHold()
    del hold
    assert up()  # the fixture's groups: it tears them down
    with parallel.process_groups():
        assert up()
    assert up()


def test_groups_of_a_process_groups_block_end_with_it_and_a_hold_taken_inside_them_counts_for_nothing():
    assert not up()
    with parallel.process_groups():
        inner = parallel.GroupHold()
    assert not up()
    outer = parallel.GroupHold()
    del inner  # a hold on the block's groups, now gone: nothing
    assert up()
    outer.release()
    assert not up()


def test_a_teardown_ends_every_hold_and_the_holds_from_before_it_count_no_more():
    assert not up()
    old = parallel.GroupHold()
    parallel.teardown()
    assert not up()
    new = parallel.GroupHold()
    old.release()  # from before the teardown: takes nothing from the new hold
    assert up()
    del new
    assert not up()


def test_a_hold_that_cannot_start_the_groups_leaves_no_count():
    from palm.core.errors import UserError

    assert not up()
    with pytest.raises(UserError, match="world size 1"):
        parallel.GroupHold(tensor_parallel=2)
    assert not up()
    hold = parallel.GroupHold()
    assert up()
    hold.release()
    assert not up()
