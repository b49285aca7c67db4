"""Binary codec: one sign bit per element times a rank-1 magnitude (the seed's default)."""

from __future__ import annotations

from typing import Any

import torch

from ..kernels import packed_nbytes
from ..wire import Layout, Section
from .base import Codec

__all__ = ["BinaryCodec"]


class BinaryCodec(Codec):
    """``dhat[n, c] = sign(d[n, c]) * row[n] * col[c]``, zero mapping to ``+``.

    ``row[n] * col[c] = rowmean|d|[n] * colmean|d|[c] / mean|d|`` is the rank-1 estimate of
    ``|d|``; ``row`` and ``col`` are float32 (``4 * (N + C)`` bytes), accumulated in float64.
    About 1 bit per element: 15.7x smaller than float16 at (4096, 3072).
    """

    codec_id = 5
    fused_check = True

    def layout(self, n: int, c: int, dtype: torch.dtype) -> Layout:
        return Layout(Section("row", torch.float32, n), Section("col", torch.float32, c),
                      Section("bits", torch.uint8, packed_nbytes(n * c, 1)))

    def encode_into(self, x: torch.Tensor, pred: torch.Tensor | None,
                    ref_out: torch.Tensor | None, body: dict[str, torch.Tensor],
                    state: Any, check: bool = False) -> bool:
        return self.kernels(x.device).binary_encode(x, pred, ref_out, body["bits"], body["row"],
                                                    body["col"], check)

    def decode_into(self, body: dict[str, torch.Tensor], pred: torch.Tensor | None,
                    out: torch.Tensor) -> None:
        self.kernels(out.device).binary_decode(body["bits"], body["row"], body["col"], pred, out)
