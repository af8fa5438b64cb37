"""palm-rlhf: from raw web pages to a chat model aligned with human feedback.

The library. Stages (``stages/``) are thin command lines over it; nothing here reads
``params.yaml`` or global state: configs and process groups are passed in.

One thing happens on ``import palm``, before any megatron-core module can load: megatron-core 0.16
makes its fusion decorator ``megatron.core.jit.jit_fuser`` ``torch.compile`` when its ``jit``
module loads, and about thirty of its modules apply it at import time (bias-GeLU, bias-SwiGLU,
rotary, MoE, cross-entropy helpers). None of those functions is on this project's code path, yet
the decorations import TorchDynamo and cost seconds of every process that imports megatron — every
stage process and every training worker (numbers:
benchmarks/records/code-notes-2026-12-06.md#palm-init). :class:`_EagerMegatronFusions` calls
megatron's own ``disable_jit_fuser()`` right after ``megatron.core.jit`` has loaded, so every later
decoration is megatron's no-op decorator. It only wraps the loading of that one module (no torch
import here; ``import palm`` stays instant).
"""

import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"

_JIT_MODULE = "megatron.core.jit"


class _EagerMegatronFusions(importlib.abc.MetaPathFinder):
    """Finds ``megatron.core.jit`` like the normal path finder does, and has its loader call the
    module's ``disable_jit_fuser()`` once the module has run."""

    def find_spec(self, name, path, target=None):
        if name != _JIT_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.disable_jit_fuser()

        spec.loader.exec_module = exec_module  # this module's loader only
        return spec


if _JIT_MODULE not in sys.modules and not any(isinstance(f, _EagerMegatronFusions) for f in sys.meta_path):
    sys.meta_path.insert(0, _EagerMegatronFusions())
