"""Test-only workaround that imports xfuser 0.7.0 on a CPU-only torch.

xfuser imports triton at import time (through its sparse-attention kernels) and asks for an
accelerator when it computes its version table. For the tests we (1) import diffusers'
pipelines first, so they see the real environment, (2) let every ``triton`` import resolve
to an inert stub, and (3) report an MPS device while xfuser imports, which makes its
version probe return "no CUDA" instead of raising. Afterwards xfuser's own code paths under
test (``usp``'s all-to-all functions, ``PipelineGroupCoordinator``) run on CPU with gloo,
given two more fixes of xfuser's GPU assumptions: its ``synchronize`` is
``torch.cuda.synchronize`` (made a no-op), and ``_pipeline_isend`` drops the send's Work,
which NCCL tolerates but gloo does not (a dropped gloo send may never arrive): the Works are
kept alive. This lives in tests only: the library never imports xfuser this way.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any
from unittest import mock


class _Inert(types.ModuleType):
    """A module whose every attribute is another inert module; calling it is a no-op."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        sub = _Inert(f"{self.__name__}.{name}")
        setattr(self, name, sub)
        return sub

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]  # used as a decorator
        return self


class _TritonStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name == "triton" or name.startswith("triton."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> Any:
        return _Inert(spec.name)

    def exec_module(self, module: Any) -> None:
        module.__path__ = []


def import_xfuser() -> Any:
    """Import xfuser (and the modules the tests use) on CPU; returns the usp module."""
    if "xfuser.model_executor.layers.usp" in sys.modules:
        return sys.modules["xfuser.model_executor.layers.usp"]
    import diffusers
    import diffusers.loaders.peft  # noqa: F401
    from diffusers import DiffusionPipeline  # noqa: F401
    stub = _TritonStub()
    sys.meta_path.insert(0, stub)
    try:
        with mock.patch("torch.backends.mps.is_available", return_value=True):
            import xfuser
            import xfuser.core.distributed.group_coordinator  # noqa: F401
            from xfuser.model_executor.layers import usp
    finally:
        sys.meta_path.remove(stub)
        for name in [n for n in sys.modules if n == "triton" or n.startswith("triton.")]:
            del sys.modules[name]  # torch.compile must keep seeing "no triton"
    import xfuser.core.distributed.group_coordinator as gc

    gc.synchronize = lambda *args, **kwargs: None
    isend = gc.PipelineGroupCoordinator._pipeline_isend
    sent: list[Any] = []

    def _pipeline_isend(self: Any, tensor: Any) -> Any:
        work = isend(self, tensor)
        sent.append((work, tensor))
        return work
    gc.PipelineGroupCoordinator._pipeline_isend = _pipeline_isend
    return usp
