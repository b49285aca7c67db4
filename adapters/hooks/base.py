"""What every library's installer uses: the handle it binds to, and helpers for replacements.

An installer (``install_<point>(handle, module) -> list[Patch]``) depends only on
:class:`HookHandle`, which :class:`~adapters.xdit.XDiTCompression` satisfies; it never
imports the handle's module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from compressed_comm import CompressedGroup, Handle
from compressed_comm.wire import SUPPORTED_DTYPES

__all__ = ["HookHandle", "ModuleWith", "compressible", "eager", "group_name", "replace_method"]


class HookHandle(Protocol):
    """What a replacement asks of the handle that installed it."""

    #: DistriFusion-style: all-gathers return the other ranks' tensors of the last step
    asynchronous: bool
    #: the handle's key for :mod:`compressed_comm.ops` (:func:`compressed_comm.ops.bind`)
    key: str

    def group_for(self, pg: Any) -> CompressedGroup:
        """The compressed group over process group ``pg`` (None: the default group)."""
        ...

    def stream_name(self, kind: str) -> str:
        """The next stream name of ``kind`` for the attention layer now running."""
        ...

    def stale_all_gather(self, group: CompressedGroup, x: torch.Tensor,
                         stream: str) -> list[torch.Tensor]:
        """``x`` in this rank's slot and the other ranks' tensors of the previous step."""
        ...

    def keep_until_session_end(self, send: Handle[None]) -> None:
        """Hold a fire-and-forget send until the next session starts."""
        ...


def eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` eagerly under torch.compile (a graph break), never traced into a graph."""
    return torch.compiler.disable(fn, recursive=True)


def group_name(pg: Any) -> str:
    """How :mod:`compressed_comm.ops` name process group ``pg`` (``""``: the default group);
    traceable by torch.compile."""
    return "" if pg is None else pg.group_name


def compressible(x: torch.Tensor) -> bool:
    """Whether ``x`` can travel compressed (float dtype, no autograd)."""
    return x.dtype in SUPPORTED_DTYPES and not (x.requires_grad and torch.is_grad_enabled())


def replace_method(name: str, body: Callable[..., Any]
                   ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A builder for :func:`~adapters.hooks.points.make_patch` of the method ``name``: its
    replacement runs ``body(original, self, *args, **kwargs)`` eagerly."""
    def build(original: Callable[..., Any]) -> Callable[..., Any]:
        @eager
        def replacement(self: Any, *args: Any, **kwargs: Any) -> Any:
            return body(original, self, *args, **kwargs)
        replacement.__name__ = name
        return replacement
    return build


class ModuleWith:
    """A module (``torch.distributed``, its functional collectives) as a patched caller
    sees it: the real one's attributes except the given replacements."""

    def __init__(self, real: Any, **replacements: Callable[..., Any]) -> None:
        self._real = real
        self.__dict__.update(replacements)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)
