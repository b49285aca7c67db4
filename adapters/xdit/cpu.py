"""Running diffusers' ring attention on CPU (tests, tiny examples, benchmarks).

diffusers' ring merges blocks by their log-sum-exp, which none of its context-parallel
attention backends returns on CPU ("Native attention does not support return_lse=True").
:func:`lse_attention_on_cpu` swaps the native backend's forward op for
:func:`math_attention`, which does, for as long as the context lasts.
"""

from __future__ import annotations

import contextlib
from typing import Any
from unittest import mock

import torch

__all__ = ["lse_attention_on_cpu", "math_attention"]


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


def lse_attention_on_cpu() -> contextlib.AbstractContextManager[Any]:
    """A context (reusable) in which diffusers' native attention backend runs
    :func:`math_attention`."""
    from diffusers.models import attention_dispatch

    return mock.patch.object(attention_dispatch, "_native_attention_forward_op", math_attention)
