"""Top-k codec: the largest-magnitude fraction of the residual, with bit-packed indices."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch

from ..errors import WireFormatError
from ..kernels import packed_nbytes
from ..kernels.torch_ref import residual, write_reconstruction
from ..wire import Layout, Section
from .base import Codec

__all__ = ["TopKCodec"]


class TopKCodec(Codec):
    """Keeps the ``k = ceil(F * N * C)`` residual entries of largest magnitude.

    Indices into the flattened tensor are sorted and packed with
    ``ceil(log2(N * C))`` bits each; values are stored in the input dtype, saturated to its
    finite range. Everything else decodes to zero. Ties at the k-th magnitude are broken by
    ``torch.topk`` on the sender. ``k`` is a 32-bit header field, so ``k`` may be at most
    ``2**32 - 1``; a payload whose indices are out of range or not strictly increasing
    raises :class:`~compressed_comm.WireFormatError` on decode.
    """

    codec_id = 8
    #: The largest ``k`` the header's 32-bit parameter field holds.
    MAX_K = 2**32 - 1

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
        k = self._k(n * c)
        if k > self.MAX_K:
            raise ValueError(
                f"{self.spec}: a tensor of {n * c} elements ({n} x {c}) keeps k = {k} entries, "
                f"more than the header's 32-bit k field holds (at most {self.MAX_K}); use a "
                f"smaller fraction or split the tensor"
            )
        return k

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
        big = torch.finfo(body["val"].dtype).max  # float32's max is Inf in bfloat16
        body["val"].copy_(d[idx].clamp_(-big, big))
        self.kernels(x.device).pack_uint(idx, self._width(d.numel()), body["idx"])
        if ref_out is not None:
            self.decode_into(body, pred, ref_out)

    def decode_into(self, body: dict[str, torch.Tensor], pred: torch.Tensor | None,
                    out: torch.Tensor) -> None:
        numel = out.numel()
        val = body["val"]
        idx = self.kernels(out.device).unpack_uint(body["idx"], self._width(numel), val.numel())
        # sorted and distinct, so in range if the last one is (one check; syncs on CUDA)
        if bool((idx[-1] >= numel) | (idx[1:] <= idx[:-1]).any()):
            raise self._bad_indices(idx, numel)
        dhat = torch.zeros(numel, dtype=torch.float32, device=out.device)
        dhat[idx] = val.float()
        write_reconstruction(out, pred, dhat.view(out.shape))

    def _bad_indices(self, idx: torch.Tensor, numel: int) -> WireFormatError:
        """The error for a payload whose unpacked indices ``idx`` are not strictly increasing
        within ``[0, numel)``: it names the first bad one."""
        high = (idx >= numel).nonzero()
        if high.numel():
            i = int(high[0])
            what = f"index {int(idx[i])} at position {i} is out of range"
        else:
            i = int((idx[1:] <= idx[:-1]).nonzero()[0]) + 1
            what = (f"index {int(idx[i])} at position {i} does not exceed the one before it "
                    f"({int(idx[i - 1])})")
        return WireFormatError(
            f"{self.spec}: corrupt payload: {what}; expected {idx.numel()} strictly increasing "
            f"indices in 0 .. {numel - 1}"
        )
