"""Known-benign third-party warnings, silenced one by one, so that a stage prints its own lines,
its progress bars and the warnings that mean something. Every entry point calls
:func:`quiet_known` before it imports megatron or MLflow (some of these fire at import time):
the stage package (``stages/__init__.py``), the training workers (``palm/train/launch.py``), the
``palm`` command and the Prefect flow. Each filter names the message, its category and the module
that issues it, so a different warning from the same library still shows
(tests/test_quiet.py; tests/test_finetune_stages.py checks a stage run's whole output)."""

from __future__ import annotations

import warnings


def quiet_known() -> None:
    """Ignore the known-benign warnings below (idempotent: a second call adds no filter)."""
    # CPU: no Transformer Engine or Apex; megatron falls back to its torch implementations, which
    # are the ones this project means to run (import time, optimizer and mixed-precision modules)
    warnings.filterwarnings("ignore", message=r"Transformer Engine and Apex are not installed\. Falling back to ",
                            category=UserWarning, module=r"megatron\.core\.")
    # the same for the norm: torch's, as on every CPU (megatron.core.models.backends, at import)
    warnings.filterwarnings("ignore", message=r"Apex is not installed\. Falling back to Torch Norm",
                            category=UserWarning, module=r"megatron\.core\.models\.")
    # megatron's own TransformerConfig default (cuda_graph_scope "full") trips its own deprecation
    # in __post_init__; this project captures no CUDA graphs
    warnings.filterwarnings("ignore", message=r"full scope is deprecated\. Use empty cuda_graph_scope",
                            category=UserWarning, module=r"megatron\.core\.transformer\.transformer_config")
    # megatron's checkpoint loader calls torch.distributed.checkpoint.load_state_dict, which torch
    # renamed to load; the pinned pair works (a torch that drops it fails a checkpoint test loudly)
    warnings.filterwarnings("ignore", message=r"`load_state_dict` is deprecated and will be removed in future "
                            r"versions\. Please use `load` instead", category=FutureWarning,
                            module=r"megatron\.core\.dist_checkpointing\.")
    # MLflow resolves a local dataset path (Tracker.log_input) against two registrations of the
    # same class (LocalArtifactDatasetSource twice) and says it picked that class
    warnings.filterwarnings("ignore", message=r"The specified dataset source can be interpreted in multiple ways: "
                            r"LocalArtifactDatasetSource, LocalArtifactDatasetSource\.", category=UserWarning,
                            module=r"mlflow\.data\.dataset_source_registry")
