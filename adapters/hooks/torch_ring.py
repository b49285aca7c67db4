"""torch's context-parallel ring attention (xDiT's ring on torch >= 2.5): the K||V rotater,
compressed."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from compressed_comm import ops

from .base import HookHandle, compressible, group_name
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

    Eagerly the all-gather runs during the first block's attention and the ring pass hop by
    hop; inside a compiled graph the whole all-gather or ring pass is one
    ``compressed_comm::`` op (:mod:`compressed_comm.ops`) at ``exchange_buffers``.
    """

    def __init__(self, handle: HookHandle, pg: Any, use_ring: bool, head_dim: int) -> None:
        self._handle = handle
        self._pg = pg
        self._use_ring = use_ring
        self._head_dim = head_dim
        self._calls = 0
        self._blocks: Any = None
        self._hops: Iterator[tuple[int, torch.Tensor]] | None = None
        self._gathered: torch.Tensor | None = None  # compiled: every origin's, rank order

    def exchange_buffers(self, curr_buffer: torch.Tensor) -> None:
        self._calls += 1
        if self._calls > 1:
            return
        x = curr_buffer.contiguous().view(-1, self._head_dim)
        if torch.compiler.is_compiling():
            op = ops.ring_pass if self._use_ring else ops.all_gather
            self._gathered = op(x, self._handle.key, group_name(self._pg), "kv")
            return
        group = self._handle.group_for(self._pg)
        stream = self._handle.stream_name("kv")
        if self._use_ring:
            self._hops = group.ring_iter(x, stream=stream)
            next(self._hops)  # this rank's own block; posts the first hop
        else:
            self._blocks = group.all_gather_async(x, stream=stream)

    def next_buffer(self) -> torch.Tensor:
        if self._hops is not None:
            _, block = next(self._hops)
            return block.reshape(-1)
        world = dist.get_world_size(self._pg)
        origin = (dist.get_rank(self._pg) - self._calls) % world
        if self._gathered is not None:
            return self._gathered.chunk(world)[origin].reshape(-1)
        if self._blocks is None:
            raise RuntimeError("torch ring: next_buffer() before exchange_buffers()")
        return self._blocks.wait()[origin].reshape(-1)


def install_torch_ring(handle: HookHandle, module: Any) -> list[Patch]:
    """torch's ``_templated_ring_attention`` creates a rotater per call with
    ``_create_rotater(group, seq_dim)``; the forward K||V rotater becomes compressed. Both
    replacements trace into compiled graphs (no graph break)."""
    owner = resolve_owner(TORCH_RING, module)
    # the K shapes of the ring attentions running (innermost last), pushed by the wrapped
    # entry point and taken by its rotater (a list: torch.compile traces its mutations, not
    # a ContextVar's; so ring attention runs on one thread of a process, as in xDiT)
    kv_shapes: list[tuple[int, ...] | None] = []
    method_enum = owner._RotateMethod

    def build_rotater(original: Callable[..., Any]) -> Callable[..., Any]:
        def _create_rotater(pg: Any, seq_dim: int, method: Any = None) -> Any:
            shape = kv_shapes[-1] if kv_shapes else None
            if kv_shapes:
                kv_shapes[-1] = None
            chosen = owner._cp_options.rotate_method
            if (method is not None or shape is None
                    or chosen not in (method_enum.ALL_GATHER, method_enum.ALL_TO_ALL)):
                # explicit methods are the backward pass's gradient rotaters
                return original(pg, seq_dim, method)
            return CompressedRotater(handle, pg, chosen == method_enum.ALL_TO_ALL, shape[-1])
        return _create_rotater

    def build_entry(original: Callable[..., Any]) -> Callable[..., Any]:
        def _templated_ring_attention(group: Any, seq_dim: int, op: Any, query: torch.Tensor,
                                      key: torch.Tensor, value: torch.Tensor, *args: Any,
                                      **kwargs: Any) -> Any:
            same = key.shape == value.shape and key.dtype == value.dtype and key.dim() > 0
            kv_shapes.append(tuple(key.shape) if same and compressible(key) else None)
            try:
                return original(group, seq_dim, op, query, key, value, *args, **kwargs)
            finally:
                kv_shapes.pop()
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
