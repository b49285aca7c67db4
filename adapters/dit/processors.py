"""Attention processors for diffusers DiTs whose attention runs across ranks.

Each processor reproduces the projections, norms and rotary embeddings of the diffusers
processor it replaces (named in its docstring, as of diffusers 0.42) and hands the local
image q/k/v and the replicated text q/k/v to a :class:`~adapters.dit.attention.ParallelAttention`.
diffusers is imported lazily (only ``apply_rotary_emb``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["FluxProcessor", "JointProcessor", "SelfProcessor", "CogVideoXProcessor"]

Attend = Callable[..., tuple[torch.Tensor, "torch.Tensor | None"]]


def _rotary(x: torch.Tensor, freqs: Any, sequence_dim: int) -> torch.Tensor:
    from diffusers.models.embeddings import apply_rotary_emb
    return apply_rotary_emb(x, freqs, sequence_dim=sequence_dim)


def _no_mask(proc: Any, mask: Any) -> None:
    if mask is not None:
        raise ValueError(f"{proc.layer}: parallel self-attention does not support an "
                         "attention mask")


def _heads(x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """(B, S, H * D) -> (B, H, S, D)."""
    return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B, S, H * D)."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


_PROJECTIONS = ("to_q", "to_k", "to_v", "norm_q", "norm_k")
_ADDED_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")


def _qkv(attn: Any, states: torch.Tensor, *, added: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projected, head-split and q/k-normalised (B, H, S, D) queries, keys and values; with
    ``added``, through the context (text) projections of a joint attention."""
    to_q, to_k, to_v, norm_q, norm_k = (
        getattr(attn, n, None) for n in (_ADDED_PROJECTIONS if added else _PROJECTIONS))
    b = states.shape[0]
    q, k, v = (_heads(proj(states), b, attn.heads) for proj in (to_q, to_k, to_v))
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return q, k, v


class _Processor:
    """Common state: the layer's name (its stream prefix) and the rank's attention, called
    with the processor (whose ``layer`` it reads only when it needs it: a compiled graph
    that does not read it serves every layer)."""

    def __init__(self, layer: str, attend: Attend, text_len: Callable[[], int]) -> None:
        self.layer = layer
        self.attend = attend
        self.text_len = text_len


class FluxProcessor(_Processor):
    """Replaces ``FluxAttnProcessor`` (double-stream blocks: separate text; single-stream
    blocks: text tokens prefixed to the image tokens)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: Any = None) -> Any:
        _no_mask(self, attention_mask)
        if getattr(attn, "fused_projections", False):
            raise ValueError(f"{self.layer}: fused QKV projections are not supported; call "
                             "transformer.unfuse_qkv_projections() before parallelising")
        q, k, v = _qkv(attn, hidden_states)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            eq, ek, ev = _qkv(attn, encoder_hidden_states, added=True)
            q, k, v = torch.cat([eq, q], 2), torch.cat([ek, k], 2), torch.cat([ev, v], 2)
        if image_rotary_emb is not None:
            q = _rotary(q, image_rotary_emb, 2)
            k = _rotary(k, image_rotary_emb, 2)
        t = encoder_hidden_states.shape[1] if joint else self.text_len()
        text = (q[:, :, :t], k[:, :, :t], v[:, :, :t]) if t else None
        image, text_out = self.attend(self, q[:, :, t:], k[:, :, t:], v[:, :, t:], text)
        out = _flat(torch.cat([text_out, image], dim=2) if t else image).to(q.dtype)
        if not joint:
            return out
        text_out, image = out.split_with_sizes([t, out.shape[1] - t], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text_out.contiguous())


class JointProcessor(_Processor):
    """Replaces ``JointAttnProcessor2_0`` (SD3 joint attention; also its image-only ``attn2``)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        _no_mask(self, attention_mask)
        q, k, v = _qkv(attn, hidden_states)
        text = None
        if encoder_hidden_states is not None:
            text = _qkv(attn, encoder_hidden_states, added=True)
        image, text_out = self.attend(self, q, k, v, text)
        image = attn.to_out[1](attn.to_out[0](_flat(image).to(q.dtype)))
        if text_out is None:
            return image
        text_out = _flat(text_out).to(q.dtype)
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return image, text_out


class SelfProcessor(_Processor):
    """Replaces ``AttnProcessor2_0`` on an image self-attention (PixArt's ``attn1``)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: Any = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        _no_mask(self, attention_mask)
        if encoder_hidden_states is not None:
            raise ValueError(f"{self.layer}: got encoder states; only self-attention runs "
                             "across ranks (cross-attention to text stays local)")
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise ValueError(f"{self.layer}: spatial/group norms and 4-D inputs are not "
                             "supported by the parallel processor")
        residual = hidden_states
        q, k, v = _qkv(attn, hidden_states)
        image, _ = self.attend(self, q, k, v, None)
        out = attn.to_out[1](attn.to_out[0](_flat(image).to(q.dtype)))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class CogVideoXProcessor(_Processor):
    """Replaces ``CogVideoXAttnProcessor2_0`` (joint attention over text + video tokens)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        _no_mask(self, attention_mask)
        t = encoder_hidden_states.size(1)
        q, k, v = _qkv(attn, torch.cat([encoder_hidden_states, hidden_states], dim=1))
        if image_rotary_emb is not None:
            q[:, :, t:] = _rotary(q[:, :, t:], image_rotary_emb, 2)
            if not attn.is_cross_attention:
                k[:, :, t:] = _rotary(k[:, :, t:], image_rotary_emb, 2)
        image, text_out = self.attend(self, q[:, :, t:], k[:, :, t:], v[:, :, t:],
                                      (q[:, :, :t], k[:, :, :t], v[:, :, :t]))
        out = attn.to_out[1](attn.to_out[0](_flat(torch.cat([text_out, image], dim=2))))
        text_out, image = out.split([t, out.size(1) - t], dim=1)
        return image, text_out
