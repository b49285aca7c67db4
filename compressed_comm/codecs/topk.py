"""Top-k codec: the largest-magnitude fraction of the residual, with bit-packed indices."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch

from ..kernels import packed_nbytes
from ..kernels.torch_ref import residual, write_reconstruction
from ..wire import Layout, Section
from .base import Codec

__all__ = ["TopKCodec"]


class TopKCodec(Codec):
    """Keeps the ``k = ceil(F * N * C)`` residual entries of largest magnitude.

    Indices into the flattened tensor are sorted and packed with
    ``ceil(log2(N * C))`` bits each; values are stored in the input dtype. Everything else
    decodes to zero. Ties at the k-th magnitude are broken by ``torch.topk`` on the sender.
    """

    codec_id = 8

    def __init__(self, spec: str, fraction: float, kernels: str | None = None) -> None:
        super().__init__(spec, kernels)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"{spec}: top-k fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self._exact = Fraction(repr(float(fraction)))  # 0.07 is 7/100, not 0.0700000000000000067

    def _k(self, numel: int) -> int:
        return 0 if numel == 0 else min(numel, max(1, math.ceil(self._exact * numel)))

    @staticmethod
    def _width(numel: int) -> int:
        return max(1, (numel - 1).bit_length())

    def param(self, n: int, c: int) -> int:
        return self._k(n * c)

    def layout(self, n: int, c: int, dtype: torch.dtype) -> Layout:
        k = self._k(n * c)
        return Layout(Section("val", dtype, k),
                      Section("idx", torch.uint8, packed_nbytes(k, self._width(n * c))))

    def encode_into(self, x: torch.Tensor, pred: torch.Tensor | None,
                    ref_out: torch.Tensor | None, body: dict[str, torch.Tensor],
                    state: Any) -> None:
        d = residual(x, pred).view(-1)
        k = body["val"].numel()
        idx = d.abs().topk(k, sorted=False).indices.sort().values
        body["val"].copy_(d[idx])
        self.kernels(x.device).pack_uint(idx, self._width(d.numel()), body["idx"])
        if ref_out is not None:
            self.decode_into(body, pred, ref_out)

    def decode_into(self, body: dict[str, torch.Tensor], pred: torch.Tensor | None,
                    out: torch.Tensor) -> None:
        numel = out.numel()
        val = body["val"]
        idx = self.kernels(out.device).unpack_uint(body["idx"], self._width(numel), val.numel())
        dhat = torch.zeros(numel, dtype=torch.float32, device=out.device)
        dhat[idx] = val.float()
        write_reconstruction(out, pred, dhat.view(out.shape))
