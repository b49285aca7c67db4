"""Torch reference kernels: the specification every fast path is tested against.

Conventions shared by all kernels (and by any fast implementation):

* ``x``, ``pred`` and ``out``/``ref_out`` are contiguous 2-D ``(N, C)`` tensors of one
  floating dtype (float16, bfloat16 or float32); ``pred is None`` means a zero prediction.
* The residual is ``d = float32(x) - float32(pred)``, saturated to +-``FP32_MAX`` where the
  subtraction overflows (:func:`residual`): finite inputs always give a finite residual
  (``1.7e38 - (-1.7e38)`` is ``FP32_MAX``, not Inf); NaN stays NaN. Without a prediction
  ``d = float32(x)``, which cannot overflow. Encoders that take ``check`` return False,
  having written nothing, if ``x`` holds NaN or Inf. Encoders write their sections into
  preallocated tensors (views into the payload body), then -- if ``ref_out`` is given --
  write the reconstruction ``float32(pred) + dhat``, saturated to the finite range of
  ``ref_out.dtype`` and rounded to it (:func:`write_reconstruction`), computed
  from the *written* sections exactly as the decoder computes it, so that sender and
  receiver references are bit-identical.
* ``ref_out`` may alias ``pred`` (in-place reference update).
* Packed codes are little-endian within a byte: with ``bits``-bit codes, element ``i`` of
  the flattened ``(N, C)`` array occupies bits ``[(i % p) * bits, (i % p + 1) * bits)`` of
  byte ``i // p``, ``p = 8 // bits``; the last byte is zero-padded. Example (bits=2):
  codes ``[1, 2, 3, 0, 1]`` pack to bytes ``[0x39, 0x01]``.
"""

from __future__ import annotations

import torch

__all__ = [
    "torch_all_finite",
    "torch_error_norms",
    "torch_pack_bits",
    "torch_unpack_bits",
    "torch_pack_uint",
    "torch_unpack_uint",
    "torch_binary_encode",
    "torch_binary_decode",
    "torch_int2_encode",
    "torch_int2_decode",
    "torch_minmax_encode",
    "torch_minmax_decode",
    "torch_absmax_encode",
    "torch_absmax_decode",
]


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed to pack ``numel`` codes of ``bits`` bits each."""
    return (numel * bits + 7) // 8


# --------------------------------------------------------------------------- bit packing


def torch_pack_bits(codes: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Pack 1-D uint8 ``codes`` (each < 2**bits, bits in 1, 2, 4, 8) into ``out``."""
    if bits == 8:
        out.copy_(codes)
        return
    per = 8 // bits
    m = codes.numel()
    nbytes = out.numel()
    padded = torch.zeros(nbytes * per, dtype=torch.uint8, device=codes.device)
    padded[:m] = codes
    grid = padded.view(nbytes, per)
    acc = grid[:, 0].clone()
    for j in range(1, per):
        acc |= grid[:, j] << (j * bits)
    out.copy_(acc)


def torch_unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`torch_pack_bits`: the first ``numel`` codes as 1-D uint8."""
    if bits == 8:
        return packed[:numel]
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[:, None] >> shifts) & mask
    return codes.reshape(-1)[:numel]


def torch_pack_uint(values: torch.Tensor, width: int, out: torch.Tensor) -> None:
    """Pack 1-D non-negative int64 ``values`` (each < 2**width) as ``width``-bit fields.

    Field ``i`` occupies bits ``[i * width, (i + 1) * width)`` of the little-endian bit
    stream in ``out`` (``packed_nbytes(len(values), width)`` bytes).
    """
    shifts = torch.arange(width, dtype=torch.int64, device=values.device)
    bitplane = ((values[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)
    torch_pack_bits(bitplane, 1, out)


def torch_unpack_uint(packed: torch.Tensor, width: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`torch_pack_uint`: ``numel`` int64 values."""
    bitplane = torch_unpack_bits(packed, 1, numel * width).view(numel, width).to(torch.int64)
    shifts = torch.arange(width, dtype=torch.int64, device=packed.device)
    return (bitplane << shifts).sum(1)


# --------------------------------------------------------------------------- helpers


#: The largest finite float32: residuals saturate here instead of overflowing to Inf.
FP32_MAX = torch.finfo(torch.float32).max


def residual(x: torch.Tensor, pred: torch.Tensor | None) -> torch.Tensor:
    """``float32(x) - float32(pred)`` saturated to +-``FP32_MAX`` (NaN stays NaN), or
    ``float32(x)`` for a zero prediction (not a copy if ``x`` is float32)."""
    if pred is None:
        return x.float()
    return _difference(x, pred).clamp_(-FP32_MAX, FP32_MAX)


def _difference(x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """``float32(x) - float32(pred)``, unsaturated, in a new tensor."""
    return x.to(torch.float32, copy=True).sub_(pred)


def write_reconstruction(out: torch.Tensor, pred: torch.Tensor | None, dhat: torch.Tensor) -> None:
    """``out = float32(pred) + dhat`` (``dhat`` for a zero prediction), saturated to the
    largest finite value of ``out.dtype`` and rounded to it.

    Saturation keeps references finite when a rank-1 or low-rank magnitude estimate
    overshoots near the top of the float16 range; NaN stays NaN. ``dhat`` is a float32
    temporary owned by the caller; it is overwritten.
    """
    big = torch.finfo(out.dtype).max
    if pred is not None:
        dhat.add_(pred)
    out.copy_(dhat.clamp_(-big, big))


# --------------------------------------------------------------------------- statistics


def torch_all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` holds no NaN and no Inf (synchronises on CUDA)."""
    return bool(torch.isfinite(x).all())


def torch_error_norms(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``||x - ref||_2 / ||x||_2`` as a 0-d float32 tensor (``||x||`` floored at the
    smallest normal float32), without synchronising."""
    xf = x.float()
    tiny = torch.finfo(torch.float32).tiny
    return torch.linalg.vector_norm(xf - ref.float()) / torch.linalg.vector_norm(xf).clamp_min(tiny)


# --------------------------------------------------------------------------- binary and int2

#: int2 splits each row's residuals at ``|d| = INT2_SPLIT * row[n] * col[c]``: the decision
#: threshold of the optimal 2-bit quantiser of a Gaussian in units of ``E|d|``.
INT2_SPLIT = 1.2302517


def _abs_scales(d: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> None:
    """``row = mean_c |d|`` and ``col = mean_n |d| / mean |d|`` (float64 sums, float32 out)."""
    n, c = d.shape
    a = d.abs()
    row_sum = a.sum(1, dtype=torch.float64)
    col_sum = a.sum(0, dtype=torch.float64)
    mean = row_sum.sum() / max(n * c, 1)
    row.copy_(row_sum / max(c, 1))
    col.copy_(torch.where(mean > 0, (col_sum / max(n, 1)) / mean, torch.zeros_like(col_sum)))


def _finite_residual(x: torch.Tensor, pred: torch.Tensor | None, check: bool
                     ) -> torch.Tensor | None:
    """The residual (:func:`residual`), or None if ``check`` and ``x`` holds NaN or Inf.

    With ``check`` a finite unsaturated difference needs no clamp; only a non-finite one
    (NaN/Inf input, or an overflow) costs a second look, at ``x``."""
    if not check or pred is None:
        return None if check and not bool(torch.isfinite(x).all()) else residual(x, pred)
    d = _difference(x, pred)
    if bool(torch.isfinite(d).all()):
        return d
    return d.clamp_(-FP32_MAX, FP32_MAX) if bool(torch.isfinite(x).all()) else None


def torch_binary_encode(
    x: torch.Tensor,
    pred: torch.Tensor | None,
    ref_out: torch.Tensor | None,
    bits: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    check: bool = False,
) -> bool:
    """1-bit sign code with a rank-1 magnitude: ``dhat[n, c] = sign(d) * row[n] * col[c]``.

    ``row[n] = mean_c |d[n, c]|`` and ``col[c] = mean_n |d[n, c]| / mean |d|`` (0 if
    ``d == 0``), both float32, accumulated in float64 so that constant inputs are exact.
    Zero maps to ``+``. With ``check``, NaN or Inf in ``x`` returns False before anything
    is written; otherwise returns True.
    """
    d = _finite_residual(x, pred, check)
    if d is None:
        return False
    _abs_scales(d, row, col)
    torch_pack_bits((d >= 0).to(torch.uint8).view(-1), 1, bits)
    if ref_out is not None:
        torch_binary_decode(bits, row, col, pred, ref_out)
    return True


def torch_binary_decode(
    bits: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    pred: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Write ``pred + sign * row[n] * col[c]`` into ``out``."""
    n, c = out.shape
    positive = torch_unpack_bits(bits, 1, n * c).view(n, c).bool()
    scale = row[:, None] * col[None, :]
    write_reconstruction(out, pred, torch.where(positive, scale, -scale))


def torch_int2_encode(
    x: torch.Tensor,
    pred: torch.Tensor | None,
    ref_out: torch.Tensor | None,
    codes: torch.Tensor,
    small: torch.Tensor,
    big: torch.Tensor,
    col: torch.Tensor,
    check: bool = False,
) -> bool:
    """2-bit code: the sign and one magnitude bit, ``dhat[n, c] = sign(d) * lv[n] * col[c]``.

    ``row`` and ``col`` are binary's (:func:`torch_binary_encode`). Bit 1 of a code marks
    ``|d| >= INT2_SPLIT * row[n] * col[c]``; in each row the two groups get the
    least-squares levels ``lv = sum |d| * col / sum col**2`` over the group (float64 sums
    of float32 products, float32 ``small[n]`` and ``big[n]`` saturated at ``FP32_MAX``;
    ``row[n]`` for an empty group). Binary's
    ``lv = row[n]`` is one choice of levels, so int2's squared error is at most binary's
    in every row; constant tensors are exact. Code = sign bit (zero maps to ``+``) |
    magnitude bit << 1. With ``check``, NaN or Inf in ``x`` returns False before anything
    is written.
    """
    d = _finite_residual(x, pred, check)
    if d is None:
        return False
    n, c = d.shape
    row = torch.empty(n, dtype=torch.float32, device=d.device)
    _abs_scales(d, row, col)
    a = d.abs()
    large = a >= (row[:, None] * col[None, :]) * torch.tensor(INT2_SPLIT, device=d.device)
    ad, c2 = (a * col).double(), (col * col).double().expand(n, c)
    for levels, group in ((small, ~large), (big, large)):
        num = torch.where(group, ad, 0.0).sum(1)
        den = torch.where(group, c2, 0.0).sum(1)
        safe = torch.where(den > 0, den, torch.ones_like(den))
        levels.copy_(torch.where(den > 0, num / safe, row.double())).clamp_max_(FP32_MAX)
    q = (d >= 0).to(torch.uint8) | (large.to(torch.uint8) << 1)
    torch_pack_bits(q.view(-1), 2, codes)
    if ref_out is not None:
        torch_int2_decode(codes, small, big, col, pred, ref_out)
    return True


def torch_int2_decode(
    codes: torch.Tensor,
    small: torch.Tensor,
    big: torch.Tensor,
    col: torch.Tensor,
    pred: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Write ``pred + sign * (small or big)[n] * col[c]`` into ``out``."""
    n, c = out.shape
    q = torch_unpack_bits(codes, 2, n * c).view(n, c)
    mag = torch.where((q & 2) != 0, big[:, None], small[:, None]) * col[None, :]
    write_reconstruction(out, pred, torch.where((q & 1) != 0, mag, -mag))


# --------------------------------------------------------------------------- min-max int-k


def torch_minmax_encode(
    x: torch.Tensor,
    pred: torch.Tensor | None,
    ref_out: torch.Tensor | None,
    codes: torch.Tensor,
    lo: torch.Tensor,
    span: torch.Tensor,
    bits: int,
    check: bool = False,
) -> bool:
    """Asymmetric per-channel ``bits``-bit quantisation of the residual.

    Per channel ``c``: ``lo = min_n d``, ``span = max_n d - lo`` (float32, saturated at
    ``FP32_MAX``: ``max - lo`` of a saturated residual can overflow), code
    ``q = round((d - lo) * (qmax / span))`` (half to even; ``qmax = 2**bits - 1``), and
    ``dhat = lo + q * (span / qmax)``, the two per-channel factors rounded to float32 once
    (multiplications in the per-element loops, no divisions). A constant channel has
    ``span = 0`` and is reproduced exactly. Error bound:
    ``|d - dhat| <= span / (2 * (2**bits - 1))`` plus rounding (for an unsaturated span).
    With ``check``, NaN or Inf in ``x`` returns False before anything is written.
    """
    d = _finite_residual(x, pred, check)
    if d is None:
        return False
    qmax = (1 << bits) - 1
    if d.shape[0] == 0:
        lo.zero_()
        span.zero_()
    else:
        lo.copy_(d.amin(0))
        span.copy_(d.amax(0) - lo).clamp_max_(FP32_MAX)
    inv, _ = _minmax_factors(span, qmax)
    q = ((d - lo) * inv).round()
    torch_pack_bits(q.clamp_(0, qmax).to(torch.uint8).view(-1), bits, codes)
    if ref_out is not None:
        torch_minmax_decode(codes, lo, span, bits, pred, ref_out)
    return True


def torch_minmax_decode(
    codes: torch.Tensor,
    lo: torch.Tensor,
    span: torch.Tensor,
    bits: int,
    pred: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Write ``pred + lo[c] + q * (span[c] / qmax)`` into ``out``."""
    n, c = out.shape
    qmax = (1 << bits) - 1
    q = torch_unpack_bits(codes, bits, n * c).view(n, c).float()
    _, step = _minmax_factors(span, qmax)
    write_reconstruction(out, pred, lo + q * step)


def _minmax_factors(span: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel ``qmax / span`` (0 where ``span`` is 0) and ``span / qmax``, each one
    correctly rounded float32 division (tensor by tensor: torch turns a scalar numerator
    into a reciprocal and a product, which rounds differently)."""
    q = torch.full_like(span, qmax)
    inv = torch.where(span > 0, q / torch.where(span > 0, span, torch.ones_like(span)),
                      torch.zeros_like(span))
    return inv, span / q


# --------------------------------------------------------------------------- abs-max int-k


def torch_absmax_encode(
    x: torch.Tensor,
    pred: torch.Tensor | None,
    ref_out: torch.Tensor | None,
    codes: torch.Tensor,
    amax: torch.Tensor,
    bits: int,
    check: bool = False,
) -> bool:
    """Symmetric per-channel ``bits``-bit quantisation of the residual.

    Per channel ``c``: ``amax = max_n |d|`` (float32), ``q = round(d / amax * qmax)`` with
    ``qmax = 2**(bits-1) - 1`` (half to even) stored as ``q + qmax``, and
    ``dhat = (q / qmax) * amax``. Zero maps to zero exactly. Error bound:
    ``|d - dhat| <= amax / (2 * qmax)`` plus rounding. With ``check``, NaN or Inf in ``x``
    returns False before anything is written.
    """
    d = _finite_residual(x, pred, check)
    if d is None:
        return False
    qmax = (1 << (bits - 1)) - 1
    if d.shape[0] == 0:
        amax.zero_()
    else:
        amax.copy_(d.abs().amax(0))
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    q = (d / safe * qmax).round_().clamp_(-qmax, qmax) + qmax
    torch_pack_bits(q.to(torch.uint8).view(-1), bits, codes)
    if ref_out is not None:
        torch_absmax_decode(codes, amax, bits, pred, ref_out)
    return True


def torch_absmax_decode(
    codes: torch.Tensor,
    amax: torch.Tensor,
    bits: int,
    pred: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Write ``pred + ((code - qmax) / qmax) * amax[c]`` into ``out``."""
    n, c = out.shape
    qmax = (1 << (bits - 1)) - 1
    q = torch_unpack_bits(codes, bits, n * c).view(n, c).float() - qmax
    write_reconstruction(out, pred, (q / qmax) * amax)
