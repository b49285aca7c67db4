"""numba kernels for CPU tensors: the torch reference's math, fused, in parallel.

Same signatures and semantics as :mod:`compressed_comm.kernels.torch_ref` (``numba_<op>``
for ``torch_<op>``): residual, scales, quantisation, packing and -- on the sender -- the
reference update happen in two passes over memory for encoders (one to reduce the scales,
one to quantise) and one pass for decoders. Packed bits and codes are bit-exact with the
reference; reconstructions use the same float32 operations in the same order, so they are
equal to the reference up to the float64 summation order of the binary codec's scales.

float16 and bfloat16 have no numba type: their tensors are passed as ``uint16`` (float16)
and ``int16`` (bfloat16) bit patterns, decoded with an exact lookup table (float16) or a
shift (bfloat16), and encoded with round-to-nearest-even like torch. Compiled on first use
and cached on disk (``cache=True``).

Unless ``NUMBA_NUM_THREADS`` is set, numba gets as many threads as torch
(``torch.get_num_threads()``, which follows ``OMP_NUM_THREADS``): numba's OpenMP workers
spin between kernels, so one process per rank (torchrun) with a worker per core each
starves the other ranks (a 2-rank tiny FLUX example on 2 cores: 13.3 s instead of 3.0 s).
This only takes effect if numba is first imported here.
"""

from __future__ import annotations

import os

import numpy as np
import torch

os.environ.setdefault("NUMBA_NUM_THREADS", str(torch.get_num_threads()))

import numba  # after the thread count is set
from numba import njit, prange, types
from numba.extending import intrinsic, overload

__all__ = [
    "numba_all_finite", "numba_error_norms", "numba_pack_bits", "numba_unpack_bits", "numba_pack_uint", "numba_unpack_uint",
    "numba_binary_encode", "numba_binary_decode", "numba_minmax_encode", "numba_minmax_decode",
    "numba_absmax_encode", "numba_absmax_decode",
]

_HALF_TO_FLOAT = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
_HALF_TO_FLOAT.flags.writeable = False
_FP16_MAX = np.float32(65504.0)
_BF16_MAX = np.float32(3.3895313892515355e38)
_FP32_MAX = np.float32(3.4028234663852886e38)

# --------------------------------------------------------------------------- scalar helpers


@intrinsic
def _u32_as_f32(typingctx, u):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return types.float32(types.uint32), codegen


@intrinsic
def _f32_as_u32(typingctx, f):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))
    return types.uint32(types.float32), codegen


def _load(v, lut):
    """Element ``v`` (float32, float16 bits as uint16, bfloat16 bits as int16) as float32."""


@overload(_load, inline="always")
def _load_impl(v, lut):
    if isinstance(v, types.Float):
        return lambda v, lut: np.float32(v)
    if v == types.uint16:
        return lambda v, lut: lut[v]
    if v == types.int16:
        return lambda v, lut: _u32_as_f32(np.uint32(np.uint16(v)) << np.uint32(16))
    return None


@njit(inline="always")
def _f32_to_f16_bits(f):
    # the IEEE round-to-nearest-even conversion of c10/FP16 (fp16_ieee_from_fp32_value)
    base = (abs(f) * _u32_as_f32(np.uint32(0x77800000))) * _u32_as_f32(np.uint32(0x08800000))
    w = _f32_as_u32(f)
    shl1_w = np.uint32((w << np.uint32(1)) & np.uint32(0xFFFFFFFF))  # numba widens uint32 sums
    sign = w & np.uint32(0x80000000)
    bias = shl1_w & np.uint32(0xFF000000)
    if bias < np.uint32(0x71000000):
        bias = np.uint32(0x71000000)
    base = _u32_as_f32((bias >> np.uint32(1)) + np.uint32(0x07800000)) + base
    bits = _f32_as_u32(base)
    nonsign = ((bits >> np.uint32(13)) & np.uint32(0x7C00)) + (bits & np.uint32(0x0FFF))
    if shl1_w > np.uint32(0xFF000000):
        nonsign = np.uint32(0x7E00)
    return np.uint16((sign >> np.uint32(16)) | nonsign)


@njit(inline="always")
def _f32_to_bf16_bits(f):
    if f != f:
        return np.int16(0x7FC0)
    u = _f32_as_u32(f)
    rounded = (u + ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)) >> np.uint32(16)
    return np.int16(np.uint16(rounded))


def _store(out, r, j, v):
    """``out[r, j] = v`` saturated to the dtype's finite range and rounded to it."""


@njit(inline="always")
def _saturate(v, big):
    # NaN passes through (both comparisons are false)
    return big if v > big else (-big if v < -big else v)


@overload(_store)
def _store_impl(out, r, j, v):
    dt = out.dtype
    if isinstance(dt, types.Float):
        def impl(out, r, j, v):
            out[r, j] = _saturate(v, _FP32_MAX)
        return impl
    if dt == types.uint16:
        def impl(out, r, j, v):
            out[r, j] = _f32_to_f16_bits(_saturate(v, _FP16_MAX))
        return impl
    if dt == types.int16:
        def impl(out, r, j, v):
            out[r, j] = _f32_to_bf16_bits(_saturate(v, _BF16_MAX))
        return impl
    return None


_ROUND_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23


@njit(inline="always")
def _rint(v):
    # round half to even for |v| < 2**22 (codes are at most 255), vectorisable unlike rint
    return (v + _ROUND_MAGIC) - _ROUND_MAGIC


def _blocks(n: int) -> int:
    return max(1, min(n, 4 * numba.get_num_threads()))


# --------------------------------------------------------------------------- bit packing


@njit(cache=True, parallel=True)
def _pack_flat(codes, bits, out):
    per = 8 // bits
    m = codes.shape[0]
    for b in prange(out.shape[0]):
        acc = np.uint8(0)
        for k in range(per):
            i = b * per + k
            if i < m:
                acc |= np.uint8(codes[i] << np.uint8(k * bits))
        out[b] = acc


@njit(cache=True, parallel=True)
def _unpack_flat(packed, bits, out):
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    m = out.shape[0]
    for b in prange(packed.shape[0]):
        v = packed[b]
        for k in range(per):
            i = b * per + k
            if i < m:
                out[i] = (v >> np.uint8(k * bits)) & mask


@njit(cache=True, parallel=True)
def _pack_uint(values, width, out):
    # 8 values take exactly `width` bytes: groups of 8 are independent
    m = values.shape[0]
    groups = (m + 7) // 8
    nbytes = out.shape[0]
    for g in prange(groups):
        acc = np.uint64(0)
        nacc = 0
        pos = g * width
        for k in range(8):
            i = g * 8 + k
            v = np.uint64(values[i]) if i < m else np.uint64(0)
            left = width
            while left > 0:
                take = min(left, 32)
                acc |= (v & np.uint64((1 << take) - 1)) << np.uint64(nacc)
                v >>= np.uint64(take)
                nacc += take
                left -= take
                while nacc >= 8:
                    if pos < nbytes:
                        out[pos] = np.uint8(acc & np.uint64(0xFF))
                    pos += 1
                    acc >>= np.uint64(8)
                    nacc -= 8


@njit(cache=True, parallel=True)
def _unpack_uint(packed, width, out):
    m = out.shape[0]
    nbytes = packed.shape[0]
    for i in prange(m):
        bit = i * width
        v = np.int64(0)
        got = 0
        while got < width:
            byte = bit >> 3
            off = bit & 7
            take = min(8 - off, width - got)
            b = np.int64(packed[byte]) if byte < nbytes else np.int64(0)
            v |= ((b >> off) & ((1 << take) - 1)) << got
            got += take
            bit += take
        out[i] = v


# --------------------------------------------------------------------------- reductions


@njit(cache=True, parallel=True)
def _count_non_finite(x, lut):
    n, c = x.shape
    bad = 0
    for r in prange(n):
        row_bad = 0
        for j in range(c):
            v = _load(x[r, j], lut)
            row_bad += (v - v) != 0  # NaN and Inf give NaN
        bad += row_bad
    return bad


@njit(cache=True, parallel=True, fastmath={"reassoc"})
def _square_sums(x, ref, lut):
    n, c = x.shape
    err = 0.0
    tot = 0.0
    for r in prange(n):
        e = 0.0
        t = 0.0
        for j in range(c):
            xv = _load(x[r, j], lut)
            d = np.float64(xv - _load(ref[r, j], lut))
            e += d * d
            t += np.float64(xv) * np.float64(xv)
        err += e
        tot += t
    return err, tot




@njit(cache=True, parallel=True, fastmath={"reassoc"})
def _abs_sums(x, pred, lut, rows, parts):
    n, c = x.shape
    nb = parts.shape[0]
    per = (n + nb - 1) // nb
    for b in prange(nb):
        for j in range(c):
            parts[b, j] = 0.0
        for r in range(b * per, min(n, (b + 1) * per)):
            s = 0.0
            for j in range(c):
                a = np.float64(abs(_load(x[r, j], lut) - _load(pred[r, j], lut)))
                s += a
                parts[b, j] += a
            rows[r] = s


@njit(cache=True, parallel=True)
def _col_min_max(x, pred, lut, lo_parts, hi_parts):
    n, c = x.shape
    nb = lo_parts.shape[0]
    per = (n + nb - 1) // nb
    for b in prange(nb):
        for j in range(c):
            lo_parts[b, j] = np.inf
            hi_parts[b, j] = -np.inf
        for r in range(b * per, min(n, (b + 1) * per)):
            for j in range(c):
                d = _load(x[r, j], lut) - _load(pred[r, j], lut)
                if d < lo_parts[b, j] or d != d:
                    lo_parts[b, j] = d
                if d > hi_parts[b, j] or d != d:
                    hi_parts[b, j] = d


@njit(cache=True, parallel=True)
def _col_abs_max(x, pred, lut, parts):
    n, c = x.shape
    nb = parts.shape[0]
    per = (n + nb - 1) // nb
    for b in prange(nb):
        for j in range(c):
            parts[b, j] = 0.0
        for r in range(b * per, min(n, (b + 1) * per)):
            for j in range(c):
                a = abs(_load(x[r, j], lut) - _load(pred[r, j], lut))
                if a > parts[b, j] or a != a:
                    parts[b, j] = a


# --------------------------------------------------------------------------- quantise + pack
#
# The row kernels write codes of `bits` bits into `codes[r, :]`, `8 // bits` per byte: when a
# row's codes fill whole bytes (C * bits % 8 == 0) that is the packed payload itself, rows
# packing in parallel; otherwise the caller passes bits=8 (one code per byte) and packs the
# flattened codes afterwards.


@njit(cache=True, parallel=True)
def _binary_rows(x, pred, ref, codes, bits, row, col, lut):
    n, c = x.shape
    per = 8 // bits
    for r in prange(n):
        rv = row[r]
        for jb in range(codes.shape[1]):
            byte = np.uint8(0)
            for k in range(per):
                j = jb * per + k
                pv = _load(pred[r, j], lut)
                pos = _load(x[r, j], lut) - pv >= 0
                byte |= np.uint8(pos) << np.uint8(k)
                s = rv * col[j]
                _store(ref, r, j, pv + (s if pos else -s))
            codes[r, jb] = byte


@njit(cache=True, parallel=True)
def _binary_apply(codes, bits, row, col, pred, out, lut):
    n, c = out.shape
    per = 8 // bits
    for r in prange(n):
        rv = row[r]
        for jb in range(codes.shape[1]):
            byte = codes[r, jb]
            for k in range(per):
                j = jb * per + k
                s = rv * col[j]
                pos = (byte >> np.uint8(k)) & np.uint8(1)
                _store(out, r, j, _load(pred[r, j], lut) + (s if pos else -s))


@njit(cache=True, parallel=True)
def _minmax_rows(x, pred, ref, codes, bits, lo, span, qmax, lut):
    n, c = x.shape
    per = 8 // bits
    for r in prange(n):
        q_row = np.empty(c, dtype=np.uint8)
        for j in range(c):  # quantise the row (vectorises), then pack it
            pv = _load(pred[r, j], lut)
            d = _load(x[r, j], lut) - pv
            sp = span[j]
            q = np.float32(0.0)
            if sp > 0:
                q = _rint((d - lo[j]) / sp * qmax)
                if q < 0:
                    q = np.float32(0.0)
                elif q > qmax:
                    q = qmax
            q_row[j] = np.uint8(q)
            _store(ref, r, j, pv + (lo[j] + (q / qmax) * sp))
        for jb in range(codes.shape[1]):
            byte = np.uint8(0)
            for k in range(per):
                byte |= q_row[jb * per + k] << np.uint8(k * bits)
            codes[r, jb] = byte


@njit(cache=True, parallel=True)
def _minmax_apply(codes, bits, lo, span, qmax, pred, out, lut):
    n, c = out.shape
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    for r in prange(n):
        for jb in range(codes.shape[1]):
            byte = codes[r, jb]
            for k in range(per):
                j = jb * per + k
                q = np.float32((byte >> np.uint8(k * bits)) & mask)
                _store(out, r, j, _load(pred[r, j], lut) + (lo[j] + (q / qmax) * span[j]))


@njit(cache=True, parallel=True)
def _absmax_rows(x, pred, ref, codes, amax, qmax, lut):
    n, c = x.shape
    for r in prange(n):
        for j in range(c):
            pv = _load(pred[r, j], lut)
            d = _load(x[r, j], lut) - pv
            am = amax[j]
            safe = am if am > 0 else np.float32(1.0)
            q = _rint(d / safe * qmax)
            if q < -qmax:
                q = -qmax
            elif q > qmax:
                q = qmax
            codes[r, j] = np.uint8(q + qmax)
            _store(ref, r, j, pv + (q / qmax) * am)


@njit(cache=True, parallel=True)
def _absmax_apply(codes, amax, qmax, pred, out, lut):
    n, c = out.shape
    for r in prange(n):
        for j in range(c):
            q = np.float32(codes[r, j]) - qmax
            _store(out, r, j, _load(pred[r, j], lut) + (q / qmax) * amax[j])


# --------------------------------------------------------------------------- torch <-> numpy


def _np(t: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view: float16 as uint16 bits, bfloat16 as int16 bits."""
    if t.dtype == torch.float16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def _operands(x: torch.Tensor, pred: torch.Tensor | None, ref_out: torch.Tensor | None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, pred (zeros if None) and ref (a scratch array if None) as numpy arrays."""
    xn = _np(x)
    pn = _np(pred) if pred is not None else np.zeros_like(xn)
    rn = _np(ref_out) if ref_out is not None else np.empty_like(xn)
    return xn, pn, rn


def _parts(n: int, c: int, fill: float = 0.0) -> np.ndarray:
    return np.full((_blocks(n), c), fill, dtype=np.float64)


def _row_codes(packed: torch.Tensor, n: int, c: int, bits: int) -> tuple[np.ndarray, int, bool]:
    """Where the row kernels write ``bits``-bit codes: the payload itself viewed (n, bytes per
    row) if rows fill whole bytes, else a one-code-per-byte temporary (then packed)."""
    if (c * bits) % 8 == 0:
        return packed.numpy().reshape(n, c * bits // 8), bits, True
    return np.empty((n, c), dtype=np.uint8), 8, False


def _unpacked_rows(packed: torch.Tensor, n: int, c: int, bits: int) -> tuple[np.ndarray, int]:
    if (c * bits) % 8 == 0:
        return packed.numpy().reshape(n, c * bits // 8), bits
    codes = np.empty(n * c, dtype=np.uint8)
    _unpack_flat(packed.numpy(), bits, codes)
    return codes.reshape(n, c), 8


def _pred_out(pred: torch.Tensor | None, out: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    on = _np(out)
    return (_np(pred) if pred is not None else np.zeros_like(on)), on


# --------------------------------------------------------------------------- public kernels


def _as2(t: torch.Tensor) -> np.ndarray:
    a = _np(t)
    return a.reshape(-1, a.shape[-1]) if a.ndim >= 2 else a.reshape(1, -1)


def numba_all_finite(x: torch.Tensor) -> bool:
    return x.numel() == 0 or _count_non_finite(_as2(x.contiguous()), _HALF_TO_FLOAT) == 0


def numba_error_norms(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32)
    err, tot = _square_sums(_as2(x.contiguous()), _as2(ref.contiguous()), _HALF_TO_FLOAT)
    tiny = float(np.finfo(np.float32).tiny)
    return torch.tensor(np.sqrt(err) / max(np.sqrt(tot), tiny), dtype=torch.float32)


def numba_pack_bits(codes: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    if bits == 8:
        out.copy_(codes)
        return
    _pack_flat(codes.numpy(), bits, out.numpy())


def numba_unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    if bits == 8:
        return packed[:numel]
    out = np.empty(numel, dtype=np.uint8)
    _unpack_flat(packed.numpy(), bits, out)
    return torch.from_numpy(out)


def numba_pack_uint(values: torch.Tensor, width: int, out: torch.Tensor) -> None:
    _pack_uint(values.contiguous().numpy(), width, out.numpy())


def numba_unpack_uint(packed: torch.Tensor, width: int, numel: int) -> torch.Tensor:
    out = np.empty(numel, dtype=np.int64)
    _unpack_uint(packed.numpy(), width, out)
    return torch.from_numpy(out)


def numba_binary_encode(x, pred, ref_out, bits, row, col) -> None:
    xn, pn, rn = _operands(x, pred, ref_out)
    n, c = xn.shape
    rows = np.empty(n, dtype=np.float64)
    parts = _parts(n, c)
    _abs_sums(xn, pn, _HALF_TO_FLOAT, rows, parts)
    cols = parts.sum(axis=0)
    mean = rows.sum() / max(n * c, 1)
    with np.errstate(invalid="ignore", divide="ignore"):  # non-finite input passed unchecked
        row.copy_(torch.from_numpy(rows / max(c, 1)))
        col.copy_(torch.from_numpy((cols / max(n, 1)) / mean if mean > 0 else np.zeros(c)))
    codes, width, packed = _row_codes(bits, n, c, 1)
    _binary_rows(xn, pn, rn, codes, width, row.numpy(), col.numpy(), _HALF_TO_FLOAT)
    if not packed:
        _pack_flat(codes.reshape(-1), 1, bits.numpy())


def numba_binary_decode(bits, row, col, pred, out) -> None:
    pn, on = _pred_out(pred, out)
    codes, width = _unpacked_rows(bits, *on.shape, 1)
    _binary_apply(codes, width, row.numpy(), col.numpy(), pn, on, _HALF_TO_FLOAT)


def numba_minmax_encode(x, pred, ref_out, codes, lo, span, bits: int) -> None:
    xn, pn, rn = _operands(x, pred, ref_out)
    n, c = xn.shape
    if n == 0:
        lo.zero_()
        span.zero_()
    else:
        lo_parts, hi_parts = _parts(n, c, np.inf), _parts(n, c, -np.inf)
        _col_min_max(xn, pn, _HALF_TO_FLOAT, lo_parts, hi_parts)
        lo.copy_(torch.from_numpy(np.minimum.reduce(lo_parts, axis=0).astype(np.float32)))
        hi = torch.from_numpy(np.maximum.reduce(hi_parts, axis=0).astype(np.float32))
        span.copy_(hi - lo)
    rows, width, packed = _row_codes(codes, n, c, bits)
    _minmax_rows(xn, pn, rn, rows, width, lo.numpy(), span.numpy(),
                 np.float32((1 << bits) - 1), _HALF_TO_FLOAT)
    if not packed:
        _pack_flat(rows.reshape(-1), bits, codes.numpy())


def numba_minmax_decode(codes, lo, span, bits: int, pred, out) -> None:
    pn, on = _pred_out(pred, out)
    rows, width = _unpacked_rows(codes, *on.shape, bits)
    _minmax_apply(rows, width, lo.numpy(), span.numpy(), np.float32((1 << bits) - 1), pn, on,
                  _HALF_TO_FLOAT)


def numba_absmax_encode(x, pred, ref_out, codes, amax, bits: int) -> None:
    if bits != 8:
        raise ValueError(f"numba absmax kernels take 8-bit codes, got {bits}")
    xn, pn, rn = _operands(x, pred, ref_out)
    n, c = xn.shape
    if n == 0:
        amax.zero_()
    else:
        parts = _parts(n, c)
        _col_abs_max(xn, pn, _HALF_TO_FLOAT, parts)
        amax.copy_(torch.from_numpy(np.maximum.reduce(parts, axis=0).astype(np.float32)))
    _absmax_rows(xn, pn, rn, codes.numpy().reshape(n, c), amax.numpy(), np.float32(127),
                 _HALF_TO_FLOAT)


def numba_absmax_decode(codes, amax, bits: int, pred, out) -> None:
    if bits != 8:
        raise ValueError(f"numba absmax kernels take 8-bit codes, got {bits}")
    pn, on = _pred_out(pred, out)
    _absmax_apply(codes.numpy().reshape(on.shape), amax.numpy(), np.float32(127), pn, on,
                  _HALF_TO_FLOAT)

def numba_kernels():
    """The :class:`~compressed_comm.kernels.Kernels` bundle of this module."""
    from . import Kernels
    return Kernels(
        name="numba", all_finite=numba_all_finite, error_norms=numba_error_norms,
        pack_bits=numba_pack_bits, unpack_bits=numba_unpack_bits,
        pack_uint=numba_pack_uint, unpack_uint=numba_unpack_uint,
        binary_encode=numba_binary_encode, binary_decode=numba_binary_decode,
        minmax_encode=numba_minmax_encode, minmax_decode=numba_minmax_decode,
        absmax_encode=numba_absmax_encode, absmax_decode=numba_absmax_decode)


NUMBA_KERNELS = numba_kernels()
