"""Low-rank codec: the residual as ``U diag(s) V^T`` by randomised subspace iteration."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels import packed_nbytes
from ..kernels.torch_ref import FP32_MAX
from ..wire import Layout, Section
from .base import Codec

__all__ = ["LowRankCodec", "LowRankState"]

#: Seed of the Gaussian test matrix; every rank draws the same one.
SEED = 20250717
#: Power iterations of a cold start (no basis from a previous message).
POWER_ITERATIONS = 2
#: A warm start iterates on ``r + max(OVERSAMPLING, r // 2)`` vectors and keeps them all for
#: the next message: in a residual stream the error fed back from one step lies largely
#: outside the ``r`` directions just sent, so a warm start from those ``r`` alone does worse
#: than a cold start; the extra directions make it as good or better on drifting data.
OVERSAMPLING = 8
FACTOR_BITS = 4
#: Elements per row block of the full-size passes: on CPU a block of float32 temporaries
#: stays in cache; elsewhere blocks only cap the temporary memory.
_CPU_BLOCK_ELEMS = 1 << 19
_DEVICE_BLOCK_ELEMS = 1 << 24


@dataclass
class LowRankState:
    """Encoder-side state of one stream.

    ``basis`` (C x k) holds the right singular vectors of the last message's projected
    residual (``k = r`` after a cold start, the warm-start width ``w`` after a warm one)
    and ``shape`` the ``(N, C)`` they belong to. ``test_matrix`` (C x w) is the seeded
    Gaussian: its first ``r`` columns start the stream, the others widen the first basis.
    """

    basis: torch.Tensor | None = None
    shape: tuple[int, int] | None = None
    test_matrix: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Memory held: the basis and the test matrix."""
        return sum(t.nbytes for t in (self.basis, self.test_matrix) if t is not None)


class LowRankCodec(Codec):
    """Rank-``R`` approximation ``dhat = U diag(s) V^T`` of the ``(N, C)`` residual.

    ``U`` (N x r) and ``V`` (C x r) have orthonormal columns and ``s`` (r) carries the
    magnitudes; ``r = min(R, N, C)``. They are the leading singular triplets of ``Q^T d``,
    ``Q`` an orthonormal basis from randomised subspace iteration (Halko et al.):

    * without encoder state (:meth:`Codec.encode`) and on a stream's first message (or the
      first after a shape change): ``Q = orth((d d^T)^2 d Omega)``, ``Omega`` a fixed-seed
      Gaussian ``(C, r)`` test matrix, so the payload depends only on the input;
    * on later messages of a stream: ``Q = orth(d W)`` with ``W`` the right singular vectors
      kept from the previous message -- the ``r`` sent plus ``max(8, r // 2)`` more, at
      most ``min(N, C)`` in all -- so a slowly changing residual keeps converging across
      steps at two products with the residual per message.

    * ``lowrank:R`` stores ``U`` and ``V`` as float16 (entries are bounded by 1) and ``s``
      as float32: ``2 * r * (N + C) + 4 * r`` bytes.
    * ``lowrankq:R`` stores ``U`` and ``V`` as int4 with per-column min-max float32 scales:
      ``r * (N + C) / 2 + 20 * r`` bytes.

    Only the sender runs the iteration; the receiver multiplies the factors it was sent,
    and the sender computes its reference from the same written factors with the same
    function, so the iteration need not be reproducible across devices for references to
    stay identical. Non-finite input (with ``check_finite=False``) is sent as NaN.

    Extreme finite input stays finite: a residual against a prediction that overflows
    float32 saturates at +-float32 max (as in every codec), an iteration that overflows is
    redone on the residual scaled by a power of two, and ``s`` is capped at
    ``float32 max / (2 r)`` so that no partial sum of ``U diag(s) V^T`` overflows.
    """

    #: The largest rank: the rank is a 32-bit header field (and no tensor has more).
    MAX_RANK = 2**31 - 1

    def __init__(self, spec: str, rank: int, *, quantized: bool = False,
                 kernels: str | None = None) -> None:
        super().__init__(spec, kernels)
        if rank < 1:
            raise ValueError(f"{spec}: rank must be a positive integer, got {rank}")
        if rank > self.MAX_RANK:
            raise ValueError(f"{spec}: rank {rank} is too large for the header's 32-bit rank "
                             f"field; expected 1 .. 2**31-1 ({self.MAX_RANK})")
        self.rank = rank
        self.quantized = quantized

    @property
    def codec_id(self) -> int:  # type: ignore[override]
        return 7 if self.quantized else 6

    def _r(self, n: int, c: int) -> int:
        return min(self.rank, n, c)

    def param(self, n: int, c: int) -> int:
        return self.rank

    def new_state(self) -> LowRankState:
        return LowRankState()

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

    # ------------------------------------------------------------------ encoding

    def _width(self, n: int, c: int) -> int:
        """Columns of a warm start: ``r`` plus the oversampling, at most ``min(n, c)``."""
        r = self._r(n, c)
        return min(r + max(OVERSAMPLING, r // 2), n, c)

    def _test_matrix(self, n: int, c: int, device: torch.device,
                     state: LowRankState | None) -> torch.Tensor:
        """The seeded Gaussian test matrix, ``(c, r)`` without state and ``(c, w)`` with it
        (``w`` the warm-start width; the first ``r`` columns are the same either way), drawn
        from its own generator once per stream."""
        r, w = self._r(n, c), self._width(n, c)
        if state is None:
            w = r
        elif state.test_matrix is not None and state.test_matrix.shape == (c, w) \
                and state.test_matrix.device == device:
            return state.test_matrix
        gen = torch.Generator(device="cpu").manual_seed(SEED)
        omega = torch.randn(c, r, generator=gen)
        if w > r:
            omega = torch.cat([omega, torch.randn(c, w - r, generator=gen)], 1)
        omega = omega.to(device)
        if state is not None:
            state.test_matrix = omega
        return omega

    def encode_into(self, x: torch.Tensor, pred: torch.Tensor | None,
                    ref_out: torch.Tensor | None, body: dict[str, torch.Tensor],
                    state: LowRankState | None) -> None:
        n, c = x.shape
        r = self._r(n, c)
        res = _Residual(x, pred)
        basis = None if state is None or state.shape != (n, c) else state.basis
        warm = basis is not None and basis.device == x.device
        if basis is None or not warm:
            start = self._test_matrix(n, c, x.device, state)[:, :r]
        else:
            start, kept = basis, basis.shape[1]
            if kept < self._width(n, c):  # the message before was a cold start: widen it
                start = torch.cat([start, self._test_matrix(n, c, x.device, state)[:, kept:]], 1)
        found = _factorise(res, start, warm)
        if found is None:  # float32 overflow in the iteration, or NaN/Inf input
            scale = res.rescale()
            if scale is not None:
                res = _Residual(x, pred, scale)
                found = _factorise(res, start, warm)
        if found is None:
            # only non-finite input (passed with check_finite=False) gets here: send NaN
            u = torch.zeros(n, r, device=x.device)
            v = torch.zeros(c, r, device=x.device)
            s = torch.full((r,), float("nan"), device=x.device)
            if state is not None:
                state.basis = state.shape = None  # the next message starts cold
        else:
            q, ub, s, vh = found
            u, v = q @ ub[:, :r], vh[:r].T.contiguous()
            # undo the scaling; cap s so that the reconstruction's sums stay finite
            s = (s[:r].double() / res.scale).clamp_(max=FP32_MAX / (2 * r)).float()
            if state is not None:
                state.basis, state.shape = vh.T.contiguous(), (n, c)
        body["s"].copy_(s)
        if not self.quantized:
            body["u"].copy_(u.reshape(-1))
            body["v"].copy_(v.reshape(-1))
        else:
            kern = self.kernels(x.device)
            kern.minmax_encode(u, None, None, body["u"], body["u_lo"], body["u_span"],
                               FACTOR_BITS)
            kern.minmax_encode(v, None, None, body["v"], body["v_lo"], body["v_span"],
                               FACTOR_BITS)
        if ref_out is not None:
            self.decode_into(body, pred, ref_out)

    # ------------------------------------------------------------------ decoding

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
        _reconstruct(out, pred, u * body["s"], v.T.contiguous())


# --------------------------------------------------------------------------- helpers


def _block_rows(n: int, c: int, device: torch.device) -> int:
    """Rows per block of the full-size passes; a function of shape and device type only,
    so that sender and receiver reconstruct with the same sequence of operations."""
    elems = _CPU_BLOCK_ELEMS if device.type == "cpu" else _DEVICE_BLOCK_ELEMS
    rows = max(16, (elems // max(c, 1)) // 16 * 16)  # keeps factor row slices aligned
    return min(rows, n)


def _factorise(res: _Residual, start: torch.Tensor, warm: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(Q, Ub, s, Vh)`` with ``Q^T d = Ub diag(s) Vh``, ``Q`` from a warm start at the basis
    ``start`` or a cold one from the test matrix ``start``; None if ``s`` is not finite."""
    try:
        if warm:
            q, b = _warm_projection(res, start)
        else:
            q = _orth(res.times(start.T.contiguous()).T)
            for _ in range(POWER_ITERATIONS):
                z = _orth(res.transposed_times(q.T.contiguous()).T)
                q = _orth(res.times(z.T.contiguous()).T)
            b = res.transposed_times(q.T.contiguous())
        ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    except torch.linalg.LinAlgError:
        return None
    return (q, ub, s, vh) if bool(torch.isfinite(s).all()) else None


def _orth(a: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (thin QR) of the columns of the tall matrix ``a``."""
    return torch.linalg.qr(a)[0]


#: Largest condition number of ``d @ W`` for which ``Q^T d`` is formed from the same pass
#: over ``d`` as ``d @ W`` (its rounding error grows with the condition number).
_ONE_PASS_COND = 1e3


def _warm_projection(res: _Residual, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q = orth(d @ w)`` and ``Q^T d``.

    With ``d @ w = Q R``, ``Q^T d = R^-T (d @ w)^T d``, so one pass over ``d`` gives both
    products; a second pass computes ``Q^T d`` directly when ``R`` is ill-conditioned.
    """
    yt, g = res.times_and_gram(w.T.contiguous())
    q, rr = torch.linalg.qr(yt.T)
    sv = torch.linalg.svdvals(rr)
    if bool(sv[-1] * _ONE_PASS_COND > sv[0]):  # also False for zero or NaN
        return q, torch.linalg.solve_triangular(rr.T, g, upper=False)
    return q, res.transposed_times(q.T.contiguous())


class _Residual:
    """``d = float32(x) - float32(pred)`` as an operator, formed one row block at a time in
    a reused float32 buffer (on CPU small enough to stay in cache), once per product.

    With a ``scale`` other than 1 (a power of two, see :meth:`rescale`) the operator is
    ``scale * d``, ``d`` saturated at +-float32 max as in ``torch_ref.residual``."""

    def __init__(self, x: torch.Tensor, pred: torch.Tensor | None, scale: float = 1.0) -> None:
        self.x, self.pred, self.scale = x, pred, scale
        n, c = x.shape
        self.rows = _block_rows(n, c, x.device)
        self.buf = torch.empty(self.rows, c, dtype=torch.float32, device=x.device)
        self.tmp = (torch.empty_like(self.buf)
                    if pred is not None and pred.dtype != torch.float32 else None)

    def blocks(self):
        """``(i, j, d[i:j])`` over the row blocks of ``d``."""
        x, pred = self.x, self.pred
        n = x.shape[0]
        for i in range(0, n, self.rows):
            j = min(i + self.rows, n)
            if x.dtype == torch.float32 and pred is None and self.scale == 1.0:
                yield i, j, x[i:j]
                continue
            d = self.buf[: j - i]
            if pred is not None and x.dtype == torch.float32 and pred.dtype == torch.float32:
                torch.sub(x[i:j], pred[i:j], out=d)
            else:
                d.copy_(x[i:j])  # an exact conversion, then one float32 subtraction
                if pred is not None:
                    if self.tmp is None:
                        d.sub_(pred[i:j])
                    else:
                        t = self.tmp[: j - i]
                        t.copy_(pred[i:j])
                        d.sub_(t)
            if self.scale != 1.0:
                if pred is not None:
                    d.clamp_(-FP32_MAX, FP32_MAX)
                d.mul_(self.scale)
            yield i, j, d

    def rescale(self) -> float | None:
        """The power of two that brings the largest ``|d|`` (saturated) into ``[2**19, 2**20)``
        (no product of the iteration can overflow there, and the scale is a normal float32),
        or None if ``d`` holds NaN or Inf of its own (NaN/Inf input). One more pass."""
        top = torch.zeros((), dtype=torch.float32, device=self.x.device)
        for _, _, d in self.blocks():
            top = torch.maximum(top, d.abs().amax())  # NaN propagates
        if self.pred is not None:
            top = top.clamp(max=FP32_MAX)
        top = float(top)
        if not math.isfinite(top):
            return None
        return 2.0 ** (20 - math.frexp(top)[1]) if top > 0 else 1.0

    def times(self, wt: torch.Tensor) -> torch.Tensor:
        """``(d @ wt.T).T`` as an ``(r, N)`` tensor, for ``wt`` of shape ``(r, C)``."""
        yt = torch.empty(wt.shape[0], self.x.shape[0], dtype=torch.float32, device=wt.device)
        for i, j, d in self.blocks():
            torch.mm(wt, d.T, out=yt[:, i:j])
        return yt

    def times_and_gram(self, wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``yt = (d @ wt.T).T`` (``(r, N)``) and ``yt @ d`` (``(r, C)``) in one pass."""
        r, (n, c) = wt.shape[0], self.x.shape
        yt = torch.empty(r, n, dtype=torch.float32, device=wt.device)
        g = torch.zeros(r, c, dtype=torch.float32, device=wt.device)
        for i, j, d in self.blocks():
            torch.mm(wt, d.T, out=yt[:, i:j])
            g.addmm_(yt[:, i:j], d)
        return yt, g

    def transposed_times(self, qt: torch.Tensor) -> torch.Tensor:
        """``qt @ d`` as an ``(r, C)`` tensor, for ``qt`` of shape ``(r, N)``."""
        b = torch.zeros(qt.shape[0], self.x.shape[1], dtype=torch.float32, device=qt.device)
        for i, j, d in self.blocks():
            b.addmm_(qt[:, i:j], d)
        return b


def _reconstruct(out: torch.Tensor, pred: torch.Tensor | None, us: torch.Tensor,
                 vt: torch.Tensor) -> None:
    """``out = float32(pred) + us @ vt`` (``us @ vt`` for a zero prediction), saturated to
    the largest finite value of ``out.dtype`` and rounded to it; NaN stays NaN.

    What :func:`compressed_comm.kernels.torch_ref.write_reconstruction` computes, one row
    block at a time with the prediction added inside the product (``addmm``); ``out`` may
    alias ``pred``. Both sides of a stream reconstruct with this function.
    """
    n, c = out.shape
    big = torch.finfo(out.dtype).max
    rows = _block_rows(n, c, out.device)
    buf = torch.empty(rows, c, dtype=torch.float32, device=out.device)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        b = buf[: j - i]
        if pred is None:
            torch.mm(us[i:j], vt, out=b)
        else:
            b.copy_(pred[i:j])
            b.addmm_(us[i:j], vt)
        out[i:j].copy_(b.clamp_(-big, big))
