"""Integer codecs: int8 (symmetric) and int4 (min-max), per-channel scales."""

from __future__ import annotations

from typing import Any

import torch

from ..kernels import packed_nbytes
from ..wire import Layout, Section
from .base import Codec

__all__ = ["IntCodec"]


class IntCodec(Codec):
    """``bits``-bit integer quantisation of the residual with float32 scales per channel.

    * ``int8``: symmetric, ``q = round(d / amax[c] * 127)``; zero stays exactly zero; error
      at most ``amax[c] / 254``.
    * ``int4``: min-max (asymmetric, all 2**bits levels used),
      ``q = round((d - lo[c]) / span[c] * (2**bits - 1))``; error at most
      ``span[c] / (2 * (2**bits - 1))``.

    (``int2`` is a sign codec: :class:`~compressed_comm.codecs.BinaryCodec` with two bits.)
    Per channel (last dim) because K/V outliers sit in channels and ``N`` (tokens) is large,
    so scales cost ``8 * C`` bytes (``4 * C`` for int8). Constant channels are exact.
    """

    _IDS = {8: 2, 4: 3}

    def __init__(self, spec: str, bits: int, kernels: str | None = None) -> None:
        super().__init__(spec, kernels)
        if bits not in self._IDS:
            raise ValueError(f"int codec bits must be 8 or 4; got {bits}")
        self.bits = bits
        self.symmetric = bits == 8

    @property
    def codec_id(self) -> int:  # type: ignore[override]
        return self._IDS[self.bits]

    fused_check = True

    def layout(self, n: int, c: int, dtype: torch.dtype) -> Layout:
        codes = Section("codes", torch.uint8, packed_nbytes(n * c, self.bits))
        if self.symmetric:
            return Layout(Section("amax", torch.float32, c), codes)
        return Layout(Section("lo", torch.float32, c), Section("span", torch.float32, c), codes)

    def encode_into(self, x: torch.Tensor, pred: torch.Tensor | None,
                    ref_out: torch.Tensor | None, body: dict[str, torch.Tensor],
                    state: Any, check: bool = False) -> bool:
        k = self.kernels(x.device)
        if self.symmetric:
            return k.absmax_encode(x, pred, ref_out, body["codes"], body["amax"], self.bits, check)
        return k.minmax_encode(x, pred, ref_out, body["codes"], body["lo"], body["span"],
                               self.bits, check)

    def decode_into(self, body: dict[str, torch.Tensor], pred: torch.Tensor | None,
                    out: torch.Tensor) -> None:
        k = self.kernels(out.device)
        if self.symmetric:
            k.absmax_decode(body["codes"], body["amax"], self.bits, pred, out)
        else:
            k.minmax_decode(body["codes"], body["lo"], body["span"], self.bits, pred, out)
