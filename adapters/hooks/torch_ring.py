"""torch's context-parallel ring attention (xDiT's ring on torch >= 2.5): the K||V rotater,
compressed."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch

from compressed_comm import CompressedGroup

from .base import HookHandle, compressible, eager
from .points import HookPoint, Patch, make_patch, resolve_owner

__all__ = ["TORCH_RING", "CompressedRotater", "install_torch_ring"]

TORCH_RING = HookPoint(
    "torch_ring", "torch", "torch.distributed.tensor.experimental._context_parallel._attention",
    "", ("_create_rotater", "_templated_ring_attention"),
    "torch's context-parallel ring attention (xDiT's ring on torch >= 2.5): the K||V rotater")


class CompressedRotater:
    """torch's ``_RingRotater`` interface over a compressed all-gather or ring pass.

    ``exchange_buffers`` receives this rank's flat ``K||V`` (first call) and the block it
    just got (later calls: nothing to do, packets are forwarded unchanged by the ring);
    ``next_buffer`` returns the next origin's flat ``K||V``, rank-1 first.
    """

    def __init__(self, group: CompressedGroup, stream: str, use_ring: bool,
                 head_dim: int) -> None:
        self._group = group
        self._stream = stream
        self._use_ring = use_ring
        self._head_dim = head_dim
        self._calls = 0
        self._blocks: Any = None
        self._hops: Iterator[tuple[int, torch.Tensor]] | None = None

    def exchange_buffers(self, curr_buffer: torch.Tensor) -> None:
        self._calls += 1
        if self._calls > 1:
            return
        x = curr_buffer.contiguous().view(-1, self._head_dim)
        if self._use_ring:
            self._hops = self._group.ring_iter(x, stream=self._stream)
            next(self._hops)  # this rank's own block; posts the first hop
        else:
            self._blocks = self._group.all_gather_async(x, stream=self._stream)

    def next_buffer(self) -> torch.Tensor:
        if self._hops is not None:
            _, block = next(self._hops)
            return block.reshape(-1)
        if self._blocks is None:
            raise RuntimeError(f"ring stream {self._stream!r}: next_buffer() before "
                               "exchange_buffers()")
        blocks = self._blocks.wait()
        origin = (self._group.rank - self._calls) % self._group.world_size
        return blocks[origin].reshape(-1)


def install_torch_ring(handle: HookHandle, module: Any) -> list[Patch]:
    """torch's ``_templated_ring_attention`` creates a rotater per call with
    ``_create_rotater(group, seq_dim)``; the forward K||V rotater becomes compressed."""
    owner = resolve_owner(TORCH_RING, module)
    # the K shape of the ring attention being run, set by the wrapped entry point
    kv_shape: ContextVar[tuple[int, ...] | None] = ContextVar("kv_shape", default=None)
    method_enum = owner._RotateMethod

    def build_rotater(original: Callable[..., Any]) -> Callable[..., Any]:
        @eager
        def _create_rotater(pg: Any, seq_dim: int, method: Any = None) -> Any:
            shape = kv_shape.get()
            kv_shape.set(None)
            chosen = owner._cp_options.rotate_method
            if (method is not None or shape is None
                    or chosen not in (method_enum.ALL_GATHER, method_enum.ALL_TO_ALL)):
                # explicit methods are the backward pass's gradient rotaters
                return original(pg, seq_dim, method)
            group = handle.group_for(pg)
            return CompressedRotater(group, handle.stream_name("kv"),
                                     chosen == method_enum.ALL_TO_ALL, shape[-1])
        return _create_rotater

    def build_entry(original: Callable[..., Any]) -> Callable[..., Any]:
        def _templated_ring_attention(group: Any, seq_dim: int, op: Any, query: torch.Tensor,
                                      key: torch.Tensor, value: torch.Tensor, *args: Any,
                                      **kwargs: Any) -> Any:
            same = key.shape == value.shape and key.dtype == value.dtype and key.dim() > 0
            token = kv_shape.set(tuple(key.shape) if same and compressible(key) else None)
            try:
                return original(group, seq_dim, op, query, key, value, *args, **kwargs)
            finally:
                kv_shape.reset(token)
        return _templated_ring_attention

    patches = [make_patch(owner, "_create_rotater", handle, build_rotater)]
    entry = make_patch(owner, "_templated_ring_attention", handle, build_entry)
    patches.append(entry)
    # modules that imported the entry point by name (torch's re-export, xfuser's usp)
    for mod in list(sys.modules.values()):
        if mod is not owner and getattr(mod, "_templated_ring_attention", None) is entry.original:
            patches.append(Patch(mod, "_templated_ring_attention", entry.original,
                                 entry.replacement))
    return patches
