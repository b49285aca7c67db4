"""diffusers' own context parallelism (``transformer.enable_parallelism``): its Ulysses
all-to-all and its ring's all-gather of K||V, compressed.

On CPU, diffusers' ring merges blocks by their log-sum-exp, which none of its
context-parallel attention backends returns there ("Native attention does not support
return_lse=True"): :func:`lse_attention_on_cpu` swaps the native backend's forward op for
:func:`math_attention`, which does, for as long as the context lasts (tests, tiny examples,
benchmarks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from compressed_comm import ops

from .base import HookHandle, ModuleWith, compressible, group_name
from .points import HookPoint, Patch, make_patch, resolve_owner

__all__ = ["DIFFUSERS_RING", "DIFFUSERS_ULYSSES", "RING_ROW", "install_diffusers_ring",
           "install_diffusers_ulysses", "lse_attention_on_cpu", "math_attention", "ring_row"]

_DISPATCH = "diffusers.models.attention_dispatch"

DIFFUSERS_ULYSSES = HookPoint(
    "diffusers_ulysses", "diffusers", _DISPATCH, "", ("_all_to_all_single",),
    "diffusers' own context parallelism (enable_parallelism, ulysses_degree): "
    "the Ulysses all-to-all of Q/K/V and of the attention output")

DIFFUSERS_RING = HookPoint(
    "diffusers_ring", "diffusers", _DISPATCH, "", ("funcol",),
    "diffusers' own context parallelism (enable_parallelism, ring_degree): the "
    "all-gather of every rank's K||V (TemplatedRingAttention)")


def install_diffusers_ulysses(handle: HookHandle, module: Any) -> list[Patch]:
    """``attention_dispatch._all_to_all_single(x, group)``: diffusers' Ulysses all-to-all
    (``TemplatedUlyssesAttention``) of Q/K/V ``(P, S/P, B, H/P, D)`` and of the output
    ``(P, H/P, B, S/P, D)``; compressed along dim 0, one stream per chunk. The log-sum-exp
    ``(P, H/P, B, S/P)`` (4-D, only with ring attention on top) passes through exact: it is
    small and the ring's merge weights its blocks by its exponential."""
    owner = resolve_owner(DIFFUSERS_ULYSSES, module)

    key = handle.key

    def build(original: Callable[..., torch.Tensor]) -> Callable[..., Any]:
        def _all_to_all_single(x: torch.Tensor, group: Any) -> torch.Tensor:
            if x.dim() != 5 or not compressible(x) or x.shape[0] != dist.get_world_size(group):
                return original(x, group)
            return ops.all_to_all(x, key, group_name(group), "a2a")
        return _all_to_all_single

    return [make_patch(owner, "_all_to_all_single", handle, build)]


#: the widest row a flat K||V buffer is viewed in (a head's channels, or several heads')
RING_ROW = 128


def ring_row(numel: int) -> int:
    """Row length of a flat ``K||V`` buffer of ``numel`` elements: the largest power of two
    up to :data:`RING_ROW` dividing it. The buffer is ``(B, S, H, D)`` K then V, flattened,
    so for head dims that are powers of two (64, 128) rows hold whole heads and columns are
    channels; 0 if no row of at least 8 fits."""
    row = RING_ROW
    while row >= 8 and numel % row:
        row //= 2
    return row if row >= 8 else 0


def install_diffusers_ring(handle: HookHandle, module: Any) -> list[Patch]:
    """``TemplatedRingAttention`` all-gathers every rank's flat ``K||V`` with
    ``funcol.all_gather_tensor(buf, gather_dim=0, group=ring group)``; compressed as an
    all-gather of the buffer viewed ``(-1, ring_row)`` (own slot exact, one stream per
    origin). With ``asynchronous`` the other ranks' K/V are those of the previous step
    (DistriFusion-style patch parallelism: this step's gather overlaps the attention). The
    backward pass (tensors that need gradients) goes through unchanged."""
    owner = resolve_owner(DIFFUSERS_RING, module)

    key, stale = handle.key, handle.asynchronous

    def build(real: Any) -> Any:
        def all_gather_tensor(tensor: torch.Tensor, gather_dim: int, group: Any,
                              *args: Any, **kwargs: Any) -> Any:
            row = ring_row(tensor.numel())
            if gather_dim != 0 or tensor.dim() != 1 or not compressible(tensor) or not row:
                return real.all_gather_tensor(tensor, gather_dim, group, *args, **kwargs)
            x = tensor.contiguous().view(-1, row)
            return ops.all_gather(x, key, group_name(group), "kv", stale).reshape(-1)
        return ModuleWith(real, all_gather_tensor=all_gather_tensor)

    return [make_patch(owner, "funcol", handle, build)]


def math_attention(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                   is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False, return_lse: bool = False, _save_ctx: bool = True,
                   _parallel_config: Any = None) -> Any:
    """Attention of ``(B, S, H, D)`` tensors in plain torch math; with ``return_lse`` also
    the log-sum-exp ``(B, S, H)``. The signature of diffusers' native forward op."""
    q, k, v = (x.permute(0, 2, 1, 3).float() for x in (query, key, value))
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else s + attn_mask
    out = (torch.softmax(s, -1) @ v).permute(0, 2, 1, 3).to(query.dtype)
    return (out, torch.logsumexp(s, -1).permute(0, 2, 1)) if return_lse else out


def lse_attention_on_cpu() -> contextlib.AbstractContextManager[None]:
    """A context (reusable) in which diffusers' native attention backend runs
    :func:`math_attention`."""
    return _NativeOpSwap()


class _NativeOpSwap:
    """Swaps diffusers' native attention forward op for :func:`math_attention` while
    entered (re-entrant and reusable)."""

    def __init__(self) -> None:
        self._saved: list[Any] = []

    def __enter__(self) -> None:
        from diffusers.models import attention_dispatch

        self._saved.append(attention_dispatch._native_attention_forward_op)
        attention_dispatch._native_attention_forward_op = math_attention

    def __exit__(self, *exc: object) -> None:
        from diffusers.models import attention_dispatch

        attention_dispatch._native_attention_forward_op = self._saved.pop()
