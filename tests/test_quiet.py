"""The known-benign third-party warnings are silenced one by one (palm/core/quiet.py): each by its
message, category and module; another warning of the same module, the same message from another
module and the project's own warnings still show. (A stage run's whole output is checked by
tests/test_finetune_stages.py.)"""

from __future__ import annotations

import warnings

import pytest

from palm.core.quiet import quiet_known

# (message, category, module) as the libraries issue them (pinned megatron-core and MLflow)
KNOWN = [
    ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning,
     "megatron.core.optimizer"),
    ("Transformer Engine and Apex are not installed. Falling back to local implementations of multi_tensor_applier "
     "and multi_tensor_scale", UserWarning, "megatron.core.optimizer.optimizer"),
    ("Transformer Engine and Apex are not installed. Falling back to local implementations of multi_tensor_applier, "
     "multi_tensor_l2norm, and multi_tensor_scale", UserWarning, "megatron.core.optimizer.clip_grads"),
    ("Transformer Engine and Apex are not installed. Falling back to local implementations of multi_tensor_applier "
     "and multi_tensor_scale", UserWarning, "megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision"),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning, "megatron.core.models.backends"),
    ("full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.", UserWarning,
     "megatron.core.transformer.transformer_config"),
    ("`load_state_dict` is deprecated and will be removed in future versions. Please use `load` instead.",
     FutureWarning, "megatron.core.dist_checkpointing.strategies.torch"),
    ("The specified dataset source can be interpreted in multiple ways: LocalArtifactDatasetSource, "
     "LocalArtifactDatasetSource. MLflow will assume that this is a LocalArtifactDatasetSource source.", UserWarning,
     "mlflow.data.dataset_source_registry"),
]
# what must still show: another message of the same module, a known message from another module
# (the project's own code) or of another category
SHOWN = [
    ("Some weights were not loaded", UserWarning, "megatron.core.transformer.transformer_config"),
    ("`save_state_dict` is deprecated and will be removed in future versions. Please use `save` instead.",
     FutureWarning, "megatron.core.dist_checkpointing.strategies.torch"),
    ("The specified dataset source can be interpreted in multiple ways: HTTPDatasetSource, "
     "LocalArtifactDatasetSource.", UserWarning, "mlflow.data.dataset_source_registry"),
    ("Hint: inferred schema contains integer column(s)", UserWarning, "mlflow.models.signature"),
    ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning,
     "palm.train.engine"),
    ("Apex is not installed. Falling back to Torch Norm", DeprecationWarning, "megatron.core.models.backends"),
    ("full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.", UserWarning, "torch.nn"),
]


def shown(message: str, category: type[Warning], module: str) -> bool:
    """Whether the current filters let this warning through (issued as ``module`` would)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit(message, category, f"/site-packages/{module.replace('.', '/')}.py", 1,
                               module=module, registry={})
    return bool(caught)


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("always")
        quiet_known()
        yield


@pytest.mark.parametrize("message,category,module", KNOWN, ids=[f"{m[2]}:{m[0][:24]}" for m in KNOWN])
def test_a_known_benign_warning_is_silenced(quiet, message, category, module):
    assert not shown(message, category, module)


@pytest.mark.parametrize("message,category,module", SHOWN, ids=[f"{m[2]}:{m[0][:24]}" for m in SHOWN])
def test_a_different_warning_still_shows(quiet, message, category, module):
    assert shown(message, category, module)


def test_every_filter_names_message_category_and_module_and_a_second_call_adds_none():
    with warnings.catch_warnings():
        warnings.resetwarnings()
        before = list(warnings.filters)
        quiet_known()
        added = [f for f in warnings.filters if f not in before]
        quiet_known()
        assert len(warnings.filters) == len(before) + len(added)
    assert added
    for action, message, category, module, lineno in added:
        assert action == "ignore" and message is not None and module is not None, (message, module)
        assert category in (UserWarning, FutureWarning), category  # never Warning: no blanket ignore
