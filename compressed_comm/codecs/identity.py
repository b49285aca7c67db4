"""Identity codec: the raw tensor bytes (lossless)."""

from __future__ import annotations

from typing import Any

import torch

from ..wire import Layout, Section
from .base import Codec

__all__ = ["IdentityCodec"]


class IdentityCodec(Codec):
    """Sends the tensor as is; decoding is bit-exact. Streams never code residuals with it."""

    codec_id = 0
    lossless = True

    def layout(self, n: int, c: int, dtype: torch.dtype) -> Layout:
        return Layout(Section("data", dtype, n * c))

    def encode_into(self, x: torch.Tensor, pred: torch.Tensor | None,
                    ref_out: torch.Tensor | None, body: dict[str, torch.Tensor],
                    state: Any) -> None:
        if pred is not None:
            raise ValueError("identity codec sends the tensor itself; it takes no prediction")
        body["data"].copy_(x.view(-1))
        if ref_out is not None:
            ref_out.copy_(x)

    def decode_into(self, body: dict[str, torch.Tensor], pred: torch.Tensor | None,
                    out: torch.Tensor) -> None:
        if pred is not None:
            raise ValueError("identity codec sends the tensor itself; it takes no prediction")
        out.copy_(body["data"].view(out.shape))
