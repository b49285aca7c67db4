"""Low-rank codec: the residual as ``U diag(s) V^T`` by randomised subspace iteration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..kernels import packed_nbytes
from ..kernels.torch_ref import residual, write_reconstruction
from ..wire import Layout, Section
from .base import Codec

__all__ = ["LowRankCodec", "LowRankState"]

#: Seed of the Gaussian test matrix; every rank draws the same one.
SEED = 20250717
POWER_ITERATIONS = 2
FACTOR_BITS = 4


@dataclass
class LowRankState:
    """Encoder-side state of one stream: the last right basis, for warm starts."""

    basis: torch.Tensor | None = None


class LowRankCodec(Codec):
    """Rank-``R`` approximation ``dhat = U diag(s) V^T`` of the ``(N, C)`` residual.

    Randomised subspace iteration (Halko et al.) with a fixed-seed Gaussian test matrix and
    2 power iterations, then an SVD of the small projected matrix, so ``U`` (N x r) and
    ``V`` (C x r) have orthonormal columns and ``s`` (r) carries the magnitudes;
    ``r = min(R, N, C)``.

    * ``lowrank:R`` stores ``U`` and ``V`` as float16 (entries are bounded by 1) and ``s``
      as float32: ``2 * r * (N + C) + 4 * r`` bytes.
    * ``lowrankq:R`` stores ``U`` and ``V`` as int4 with per-column min-max float32 scales:
      ``r * (N + C) / 2 + 20 * r`` bytes.
    * ``warm_start`` (spec suffix ``:warm``) starts each step's iteration from the previous
      step's right basis instead of the random matrix (encoder-side state only; decoding is
      unaffected).

    Only the sender runs the iteration; the receiver just multiplies the factors, so the
    result need not be reproducible across devices for references to stay identical.
    """

    def __init__(self, spec: str, rank: int, *, quantized: bool = False,
                 warm_start: bool = False, kernels: str | None = None) -> None:
        super().__init__(spec, kernels)
        if rank < 1:
            raise ValueError(f"{spec}: rank must be a positive integer, got {rank}")
        self.rank = rank
        self.quantized = quantized
        self.warm_start = warm_start

    @property
    def codec_id(self) -> int:  # type: ignore[override]
        return 7 if self.quantized else 6

    def _r(self, n: int, c: int) -> int:
        return min(self.rank, n, c)

    def param(self, n: int, c: int) -> int:
        return self.rank

    def new_state(self) -> Any:
        return LowRankState() if self.warm_start else None

    def layout(self, n: int, c: int, dtype: torch.dtype) -> Layout:
        r = self._r(n, c)
        if not self.quantized:
            return Layout(Section("s", torch.float32, r), Section("u", torch.float16, n * r),
                          Section("v", torch.float16, c * r))
        return Layout(
            Section("s", torch.float32, r),
            Section("u_lo", torch.float32, r), Section("u_span", torch.float32, r),
            Section("v_lo", torch.float32, r), Section("v_span", torch.float32, r),
            Section("u", torch.uint8, packed_nbytes(n * r, FACTOR_BITS)),
            Section("v", torch.uint8, packed_nbytes(c * r, FACTOR_BITS)),
        )

    def _test_matrix(self, c: int, r: int, device: torch.device, state: Any) -> torch.Tensor:
        if state is not None and state.basis is not None and state.basis.shape == (c, r):
            return state.basis
        gen = torch.Generator(device="cpu").manual_seed(SEED)
        return torch.randn(c, r, generator=gen).to(device)

    def encode_into(self, x: torch.Tensor, pred: torch.Tensor | None,
                    ref_out: torch.Tensor | None, body: dict[str, torch.Tensor],
                    state: Any) -> None:
        d = residual(x, pred)
        n, c = d.shape
        r = self._r(n, c)
        try:
            q, _ = torch.linalg.qr(d @ self._test_matrix(c, r, d.device, state))
            for _ in range(POWER_ITERATIONS):
                z, _ = torch.linalg.qr(d.T @ q)
                q, _ = torch.linalg.qr(d @ z)
            ub, s, vh = torch.linalg.svd(q.T @ d, full_matrices=False)
            u, v = q @ ub, vh.T.contiguous()
        except torch.linalg.LinAlgError:
            # only non-finite input (passed with check_finite=False) gets here: send NaN
            u = torch.zeros(n, r, device=d.device)
            v = torch.zeros(c, r, device=d.device)
            s = torch.full((r,), float("nan"), device=d.device)
        if state is not None:
            state.basis = v
        body["s"].copy_(s)
        if not self.quantized:
            body["u"].copy_(u.reshape(-1))
            body["v"].copy_(v.reshape(-1))
        else:
            k = self.kernels(d.device)
            k.minmax_encode(u, None, None, body["u"], body["u_lo"], body["u_span"], FACTOR_BITS)
            k.minmax_encode(v, None, None, body["v"], body["v_lo"], body["v_span"], FACTOR_BITS)
        if ref_out is not None:
            self.decode_into(body, pred, ref_out)

    def decode_into(self, body: dict[str, torch.Tensor], pred: torch.Tensor | None,
                    out: torch.Tensor) -> None:
        n, c = out.shape
        r = self._r(n, c)
        if not self.quantized:
            u = body["u"].view(n, r).float()
            v = body["v"].view(c, r).float()
        else:
            k = self.kernels(out.device)
            u = torch.empty(n, r, dtype=torch.float32, device=out.device)
            v = torch.empty(c, r, dtype=torch.float32, device=out.device)
            k.minmax_decode(body["u"], body["u_lo"], body["u_span"], FACTOR_BITS, None, u)
            k.minmax_decode(body["v"], body["v_lo"], body["v_span"], FACTOR_BITS, None, v)
        write_reconstruction(out, pred, (u * body["s"]) @ v.T)
