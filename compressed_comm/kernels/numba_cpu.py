"""numba kernels for CPU tensors: the torch reference's math, fused, in parallel.

Same signatures and semantics as :mod:`compressed_comm.kernels.torch_ref` (``numba_<op>``
for ``torch_<op>``): residual, scales, quantisation, packing and -- on the sender -- the
reference update happen in two passes over memory for encoders (one to reduce the scales,
one to quantise) and one pass for decoders. Packed bits and codes are bit-exact with the
reference; reconstructions use the same float32 operations in the same order, so they are
equal to the reference up to the float64 summation order of the binary and int2 scales
and levels. Residuals against a prediction saturate at +-float32 max like the reference's
(a clamp in the loops that form them). A NaN/Inf found by the scale pass ends an encode
before the reference is written; the scale pass sums the unsaturated residual, so a
non-finite sum is either such an input or an overflow, told apart by a second pass over the
input that only runs then.

float16 and bfloat16 have no numba type: their tensors are passed as ``uint16`` (float16)
and ``int16`` (bfloat16) bit patterns, widened and narrowed in registers (LLVM's half
conversions, F16C on x86) or by a shift and round-to-nearest-even (bfloat16), exactly like
torch. Compiled on first use and cached on disk (``cache=True``);
:func:`compressed_comm.warmup` compiles ahead of time.

Threads belong to the caller. Each call runs on as many numba threads as torch uses in the
calling thread at that moment (``torch.get_num_threads()``, which follows ``OMP_NUM_THREADS``
and ``torch.set_num_threads``), capped by numba's pool (``NUMBA_NUM_THREADS``), and gives the
calling thread its own numba thread count back afterwards: one process per rank (torchrun,
one thread each) with a worker per core each would starve the other ranks. numba's pool is
launched once, from a short-lived thread of its own (:func:`_launch_pool`): its OpenMP layer
sets the launching thread's OpenMP thread count to ``NUMBA_NUM_THREADS`` and enables nesting,
and torch reads that thread count as its own, so a launch from the caller's thread made torch
run every later operator on every core (compressed steps under torchrun 5-7x slower than
raw). The caller's threading layer is kept: the workqueue layer aborts the process when
``parallel=True`` kernels run from several Python threads at once, as the simulator's ranks do.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from typing import Callable, TypeVar

import numba
import numpy as np
import torch
from numba import njit, prange, types
from llvmlite import ir
from numba.extending import intrinsic, overload

from .torch_ref import INT2_SPLIT

__all__ = [
    "numba_all_finite", "numba_error_norms", "numba_pack_bits", "numba_unpack_bits", "numba_pack_uint", "numba_unpack_uint",
    "numba_binary_encode", "numba_binary_decode", "numba_int2_encode", "numba_int2_decode", "numba_minmax_encode", "numba_minmax_decode",
    "numba_absmax_encode", "numba_absmax_decode",
]

_FP16_MAX = np.float32(65504.0)
_BF16_MAX = np.float32(3.3895313892515355e38)
_FP32_MAX = np.float32(3.4028234663852886e38)
_NO_CAP = np.float32(np.inf)

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- scalar helpers


@intrinsic
def _u32_as_f32(typingctx, u):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _f16_bits_to_f32(typingctx, h):
    # LLVM's fpext from half: one vcvtph2ps per 8 lanes on x86 with F16C, fcvt on arm64
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_f16_bits(typingctx, f):
    # IEEE round to nearest even, as torch's float -> half
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


def _ld(a, r, j):
    """``a[r, j]`` as float32 (float16 bits as uint16, bfloat16 bits as int16); 0 if a is None."""


# The overloads are not inline="always": numba 0.68 then dropped the stores of a kernel
# whose argument held a conditional expression (silently, in a sign decoder). LLVM
# inlines them anyway, and the loops still vectorise.
@overload(_ld)
def _ld_impl(a, r, j):
    if isinstance(a, types.NoneType):
        return lambda a, r, j: np.float32(0.0)
    if isinstance(a.dtype, types.Float):
        return lambda a, r, j: np.float32(a[r, j])
    if a.dtype == types.uint16:
        return lambda a, r, j: _f16_bits_to_f32(a[r, j])
    if a.dtype == types.int16:
        return lambda a, r, j: _u32_as_f32(np.uint32(np.uint16(a[r, j])) << np.uint32(16))
    return None


@njit(inline="always")
def _saturate(v, big):
    # NaN passes through (both comparisons are false)
    return big if v > big else (-big if v < -big else v)


def _res(x, pred, r, j):
    """The residual ``x[r, j] - pred[r, j]`` as float32, saturated at +-float32 max like
    ``torch_ref.residual``; ``x[r, j]`` itself if pred is None."""


@overload(_res)
def _res_impl(x, pred, r, j):
    if isinstance(pred, types.NoneType):
        return lambda x, pred, r, j: _ld(x, r, j)
    return lambda x, pred, r, j: _saturate(_ld(x, r, j) - _ld(pred, r, j), _FP32_MAX)


def _st(a, r, j, v):
    """``a[r, j] = v`` saturated to the dtype's finite range and rounded to it (no-op if None)."""


@overload(_st)
def _st_impl(a, r, j, v):
    if isinstance(a, types.NoneType):
        return lambda a, r, j, v: None
    if isinstance(a.dtype, types.Float):
        def impl(a, r, j, v):
            a[r, j] = _saturate(v, _FP32_MAX)
        return impl
    if a.dtype == types.uint16:
        def impl(a, r, j, v):
            a[r, j] = _f32_to_f16_bits(_saturate(v, _FP16_MAX))
        return impl
    if a.dtype == types.int16:
        def impl(a, r, j, v):
            a[r, j] = _f32_to_bf16_bits(_saturate(v, _BF16_MAX))
        return impl
    return None


@intrinsic
def _f32_as_u32(typingctx, f):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@njit(inline="always")
def _f32_to_bf16_bits(f):
    # round to nearest even like torch; NaN -> the canonical quiet NaN 0x7FC0
    u = _f32_as_u32(f)
    rounded = (u + ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)) >> np.uint32(16)
    return np.int16(np.uint16(0x7FC0)) if f != f else np.int16(np.uint16(rounded))


_ROUND_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23


@njit(inline="always")
def _rint(v):
    # round half to even for |v| < 2**22 (codes are at most 255), vectorisable unlike rint
    return (v + _ROUND_MAGIC) - _ROUND_MAGIC


#: Row blocks of the row kernels (each thread takes whole blocks and one row buffer per block).
_ROW_BLOCKS = 64


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
def _count_non_finite(x):
    n, c = x.shape
    bad = 0
    for r in prange(n):
        row_bad = 0
        for j in range(c):
            v = _ld(x, r, j)
            row_bad += (v - v) != 0  # NaN and Inf give NaN
        bad += row_bad
    return bad


@njit(cache=True, parallel=True, fastmath={"reassoc"})
def _square_sums(x, ref):
    n, c = x.shape
    err = 0.0
    tot = 0.0
    for r in prange(n):
        e = np.float64(0.0)
        t = np.float64(0.0)
        for j in range(c):
            xv = _ld(x, r, j)
            d = np.float64(xv - _ld(ref, r, j))
            e += d * d
            t += np.float64(xv) * np.float64(xv)
        err += e
        tot += t
    return err, tot


@njit(cache=True, parallel=True, fastmath={"reassoc"})
def _abs_sums(x, pred, rows, parts, cap):
    # |d| capped at `cap` (Inf: the unsaturated residual; float32 max: the saturated one)
    n, c = x.shape
    nb = parts.shape[0]
    per = (n + nb - 1) // nb
    for b in prange(nb):
        for j in range(c):
            parts[b, j] = 0.0
        for r in range(b * per, min(n, (b + 1) * per)):
            s = np.float64(0.0)
            for j in range(c):
                a = abs(_ld(x, r, j) - _ld(pred, r, j))
                a = np.float64(cap if a > cap else a)
                s += a
                parts[b, j] += a
            rows[r] = s


@njit(cache=True, parallel=True)
def _col_min_max(x, pred, lo_parts, hi_parts):
    n, c = x.shape
    nb = lo_parts.shape[0]
    per = (n + nb - 1) // nb
    for b in prange(nb):
        for j in range(c):
            lo_parts[b, j] = np.inf
            hi_parts[b, j] = -np.inf
        for r in range(b * per, min(n, (b + 1) * per)):
            for j in range(c):
                d = _ld(x, r, j) - _ld(pred, r, j)
                lo = lo_parts[b, j]
                hi = hi_parts[b, j]
                lo_parts[b, j] = d if (d < lo or d != d) else lo
                hi_parts[b, j] = d if (d > hi or d != d) else hi


@njit(cache=True, parallel=True)
def _col_abs_max(x, pred, parts):
    n, c = x.shape
    nb = parts.shape[0]
    per = (n + nb - 1) // nb
    for b in prange(nb):
        for j in range(c):
            parts[b, j] = 0.0
        for r in range(b * per, min(n, (b + 1) * per)):
            for j in range(c):
                a = abs(_ld(x, r, j) - _ld(pred, r, j))
                m = parts[b, j]
                parts[b, j] = a if (a > m or a != a) else m


# --------------------------------------------------------------------------- quantise + pack
#
# Every row kernel quantises one row into a one-code-per-byte buffer in a vectorisable loop,
# storing the reconstruction as it goes, then packs the buffer into `codes[r, :]` (`8 // bits`
# codes per byte) when a row's codes fill whole bytes (C * bits % 8 == 0: the payload itself,
# rows packing in parallel); otherwise `codes` is an (N, C) one-code-per-byte array that the
# caller packs afterwards. Decoders do the same in reverse.


@njit
def _pack_row(buf, codes, r, bits):
    if codes.shape[1] == buf.shape[0]:  # one code per byte
        for j in range(buf.shape[0]):
            codes[r, j] = buf[j]
    else:
        per = 8 // bits
        for jb in range(codes.shape[1]):
            byte = np.uint8(0)
            for k in range(per):
                byte |= buf[jb * per + k] << np.uint8(k * bits)
            codes[r, jb] = byte


@njit
def _unpack_row(codes, r, bits, buf):
    if codes.shape[1] == buf.shape[0]:
        for j in range(buf.shape[0]):
            buf[j] = codes[r, j]
    else:
        per = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        for jb in range(codes.shape[1]):
            byte = codes[r, jb]
            for k in range(per):
                buf[jb * per + k] = (byte >> np.uint8(k * bits)) & mask


@njit(cache=True, parallel=True)
def _binary_rows(x, pred, ref, codes, row, col):
    n, c = x.shape
    nb = min(n, _ROW_BLOCKS)
    per = (n + nb - 1) // nb
    for b in prange(nb):
        buf = np.empty(c, dtype=np.uint8)
        for r in range(b * per, min(n, (b + 1) * per)):
            rv = row[r]
            for j in range(c):
                pv = _ld(pred, r, j)
                pos = _ld(x, r, j) - pv >= 0
                s = rv * col[j]
                buf[j] = np.uint8(pos)
                _st(ref, r, j, pv + (s if pos else -s))
            _pack_row(buf, codes, r, 1)


@njit(cache=True, parallel=True)
def _binary_apply(codes, row, col, pred, out):
    n, c = out.shape
    nb = min(n, _ROW_BLOCKS)
    per = (n + nb - 1) // nb
    for b in prange(nb):
        buf = np.empty(c, dtype=np.uint8)
        for r in range(b * per, min(n, (b + 1) * per)):
            _unpack_row(codes, r, 1, buf)
            rv = row[r]
            for j in range(c):
                s = rv * col[j]
                _st(out, r, j, _ld(pred, r, j) + (s if buf[j] else -s))


@njit(cache=True, parallel=True, fastmath={"reassoc"})
def _int2_rows(x, pred, ref, codes, row, col, small, big, split):
    n, c = x.shape
    nb = min(n, _ROW_BLOCKS)
    per = (n + nb - 1) // nb
    for b in prange(nb):
        buf = np.empty(c, dtype=np.uint8)
        for r in range(b * per, min(n, (b + 1) * per)):
            rv = row[r]
            num_s = np.float64(0.0)
            den_s = np.float64(0.0)
            num_b = np.float64(0.0)
            den_b = np.float64(0.0)
            for j in range(c):  # split the row and sum each group's least-squares terms
                d = _res(x, pred, r, j)
                a = abs(d)
                cj = col[j]
                large = a >= (rv * cj) * split
                ac = np.float64(a * cj)
                c2 = np.float64(cj * cj)
                num_b += ac if large else 0.0
                den_b += c2 if large else 0.0
                num_s += 0.0 if large else ac
                den_s += 0.0 if large else c2
                buf[j] = np.uint8(d >= 0) | (np.uint8(large) << np.uint8(1))
            ls = _saturate(np.float32(num_s / den_s), _FP32_MAX) if den_s > 0 else rv
            lb = _saturate(np.float32(num_b / den_b), _FP32_MAX) if den_b > 0 else rv
            small[r] = ls
            big[r] = lb
            for j in range(c):  # the row is in cache: reconstruct it
                q = buf[j]
                m = (lb if q & np.uint8(2) else ls) * col[j]
                pv = _ld(pred, r, j)
                _st(ref, r, j, pv + (m if q & np.uint8(1) else -m))
            _pack_row(buf, codes, r, 2)


@njit(cache=True, parallel=True)
def _int2_apply(codes, small, big, col, pred, out):
    n, c = out.shape
    nb = min(n, _ROW_BLOCKS)
    per = (n + nb - 1) // nb
    for b in prange(nb):
        buf = np.empty(c, dtype=np.uint8)
        for r in range(b * per, min(n, (b + 1) * per)):
            _unpack_row(codes, r, 2, buf)
            ls = small[r]
            lb = big[r]
            for j in range(c):
                q = buf[j]
                m = (lb if q & np.uint8(2) else ls) * col[j]
                _st(out, r, j, _ld(pred, r, j) + (m if q & np.uint8(1) else -m))


@njit(cache=True, parallel=True)
def _minmax_rows(x, pred, ref, codes, bits, lo, inv, step, qmax):
    n, c = x.shape
    nb = min(n, _ROW_BLOCKS)
    per = (n + nb - 1) // nb
    for b in prange(nb):
        buf = np.empty(c, dtype=np.uint8)
        for r in range(b * per, min(n, (b + 1) * per)):
            for j in range(c):
                pv = _ld(pred, r, j)
                q = _rint((_res(x, pred, r, j) - lo[j]) * inv[j])
                q = min(max(q, np.float32(0.0)), qmax)
                buf[j] = np.uint8(q)
                _st(ref, r, j, pv + (lo[j] + q * step[j]))
            _pack_row(buf, codes, r, bits)


@njit(cache=True, parallel=True)
def _minmax_apply(codes, bits, lo, step, pred, out):
    n, c = out.shape
    nb = min(n, _ROW_BLOCKS)
    per = (n + nb - 1) // nb
    for b in prange(nb):
        buf = np.empty(c, dtype=np.uint8)
        for r in range(b * per, min(n, (b + 1) * per)):
            _unpack_row(codes, r, bits, buf)
            for j in range(c):
                _st(out, r, j, _ld(pred, r, j) + (lo[j] + np.float32(buf[j]) * step[j]))


@njit(cache=True, parallel=True)
def _absmax_rows(x, pred, ref, codes, amax, qmax):
    n, c = x.shape
    for r in prange(n):
        for j in range(c):
            pv = _ld(pred, r, j)
            d = _res(x, pred, r, j)
            am = amax[j]
            safe = am if am > 0 else np.float32(1.0)
            q = min(max(_rint(d / safe * qmax), -qmax), qmax)
            codes[r, j] = np.uint8(q + qmax)
            _st(ref, r, j, pv + (q / qmax) * am)


@njit(cache=True, parallel=True)
def _absmax_apply(codes, amax, qmax, pred, out):
    n, c = out.shape
    for r in prange(n):
        for j in range(c):
            q = np.float32(codes[r, j]) - qmax
            _st(out, r, j, _ld(pred, r, j) + (q / qmax) * amax[j])


# --------------------------------------------------------------------------- torch <-> numpy


def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime whose settings numba's OpenMP layer changes: the first one in the
    process's global symbol scope (torch's, which the dynamic linker binds numba's calls to),
    else the one numba's layer links; None where neither can be found."""
    candidates: list[str | None] = [None]
    try:
        from numba.np.ufunc import omppool
        candidates.append(omppool.__file__)
    except ImportError:
        pass
    for name in candidates:
        try:
            lib = ctypes.CDLL(name)
            lib.omp_get_max_active_levels, lib.omp_set_max_active_levels  # noqa: B018
            return lib
        except (OSError, AttributeError):
            continue
    return None


def _launch_pool() -> None:
    """Start numba's thread pool (idempotent) without changing the caller's threads.

    numba's OpenMP layer calls ``omp_set_num_threads(NUMBA_NUM_THREADS)`` and
    ``omp_set_nested(1)`` in the thread that launches it. The thread count is per thread, so a
    short-lived thread launches the pool; the nesting level is process-wide in some runtimes,
    so it is read before and put back after. Should the caller's thread count change anyway
    (another runtime), it is put back too, with a warning."""
    runtime = _openmp_runtime()
    levels = runtime.omp_get_max_active_levels() if runtime is not None else None
    threads = torch.get_num_threads()
    launcher = threading.Thread(target=numba.get_num_threads, name="compressed_comm-numba-launch")
    launcher.start()
    launcher.join()
    if runtime is not None and runtime.omp_get_max_active_levels() != levels:
        runtime.omp_set_max_active_levels(levels)
    if torch.get_num_threads() != threads:
        logger.warning("compressed_comm: launching numba's %s thread pool changed this thread's "
                       "torch thread count from %d to %d; set back", numba.threading_layer(),
                       threads, torch.get_num_threads())
        torch.set_num_threads(threads)


_F = TypeVar("_F", bound=Callable[..., object])


def _in_caller_threads(kernel: _F) -> _F:
    """``kernel`` run on as many numba threads as torch uses in the calling thread now (within
    numba's pool); the calling thread's numba thread count is put back afterwards."""
    @functools.wraps(kernel)
    def call(*args: object, **kwargs: object) -> object:
        before = numba.get_num_threads()
        want = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        if want == before:
            return kernel(*args, **kwargs)
        numba.set_num_threads(want)
        try:
            return kernel(*args, **kwargs)
        finally:
            numba.set_num_threads(before)
    return call  # type: ignore[return-value]


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    """A zero-copy numpy view (float16 as uint16 bits, bfloat16 as int16 bits); None stays."""
    if t is None:
        return None
    if t.dtype == torch.float16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def _as2(t: torch.Tensor) -> np.ndarray:
    a = _np(t)
    return a.reshape(-1, a.shape[-1]) if a.ndim >= 2 else a.reshape(1, -1)


def _parts(n: int, c: int, fill: float = 0.0) -> np.ndarray:
    return np.full((_blocks(n), c), fill, dtype=np.float64)


def _row_codes(packed: torch.Tensor, n: int, c: int, bits: int) -> tuple[np.ndarray, bool]:
    """Where the row kernels write ``bits``-bit codes: the payload itself viewed (n, bytes per
    row) if rows fill whole bytes, else a one-code-per-byte (n, c) temporary (then packed)."""
    if (c * bits) % 8 == 0:
        return packed.numpy().reshape(n, c * bits // 8), True
    return np.empty((n, c), dtype=np.uint8), False


def _unpacked_rows(packed: torch.Tensor, n: int, c: int, bits: int) -> np.ndarray:
    if (c * bits) % 8 == 0:
        return packed.numpy().reshape(n, c * bits // 8)
    codes = np.empty(n * c, dtype=np.uint8)
    _unpack_flat(packed.numpy(), bits, codes)
    return codes.reshape(n, c)


# --------------------------------------------------------------------------- public kernels


@_in_caller_threads
def numba_all_finite(x: torch.Tensor) -> bool:
    return x.numel() == 0 or _count_non_finite(_as2(x.detach().contiguous())) == 0


@_in_caller_threads
def numba_error_norms(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32)
    err, tot = _square_sums(_as2(x.detach().contiguous()), _as2(ref.contiguous()))
    tiny = float(np.finfo(np.float32).tiny)
    return torch.tensor(np.sqrt(err) / max(np.sqrt(tot), tiny), dtype=torch.float32)


@_in_caller_threads
def numba_pack_bits(codes: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    if bits == 8:
        out.copy_(codes)
        return
    _pack_flat(codes.numpy(), bits, out.numpy())


@_in_caller_threads
def numba_unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    if bits == 8:
        return packed[:numel]
    out = np.empty(numel, dtype=np.uint8)
    _unpack_flat(packed.numpy(), bits, out)
    return torch.from_numpy(out)


@_in_caller_threads
def numba_pack_uint(values: torch.Tensor, width: int, out: torch.Tensor) -> None:
    _pack_uint(values.contiguous().numpy(), width, out.numpy())


@_in_caller_threads
def numba_unpack_uint(packed: torch.Tensor, width: int, numel: int) -> torch.Tensor:
    out = np.empty(numel, dtype=np.int64)
    _unpack_uint(packed.numpy(), width, out)
    return torch.from_numpy(out)


def _rejects(xn, check: bool) -> bool:
    """Whether ``check`` is set and ``x`` holds NaN or Inf: asked only once a scale pass over
    the unsaturated residual came out non-finite (NaN/Inf input, or a float32 overflow)."""
    return check and _count_non_finite(xn) > 0


def _saturated(a: np.ndarray) -> np.ndarray:
    """``a`` clamped to +-float32 max (NaN stays NaN)."""
    return np.clip(a, -_FP32_MAX, _FP32_MAX)


def _abs_scales(xn, pn, row: np.ndarray, col: np.ndarray, check: bool) -> bool:
    """binary's ``row`` and ``col`` (False, writing nothing, if ``check`` finds NaN/Inf)."""
    n, c = xn.shape
    rows = np.empty(n, dtype=np.float64)
    parts = _parts(n, c)
    _abs_sums(xn, pn, rows, parts, _NO_CAP)
    total = rows.sum()
    if not np.isfinite(total):
        if _rejects(xn, check):
            return False
        if pn is not None:  # sum the saturated residual again
            _abs_sums(xn, pn, rows, parts, _FP32_MAX)
            total = rows.sum()
    mean = total / max(n * c, 1)
    with np.errstate(invalid="ignore", divide="ignore"):  # non-finite input passed unchecked
        row[:] = rows / max(c, 1)
        col[:] = (parts.sum(axis=0) / max(n, 1)) / mean if mean > 0 else 0.0
    return True


def _emit_rows(kernel, xn, pn, rn, codes: torch.Tensor, bits: int, *rest) -> None:
    """``kernel(x, pred, ref, codes, *rest)`` writing ``bits``-bit codes into ``codes``,
    packed afterwards if rows do not fill whole bytes."""
    n, c = xn.shape
    rows_out, packed = _row_codes(codes, n, c, bits)
    kernel(xn, pn, rn, rows_out, *rest)
    if not packed:
        _pack_flat(rows_out.reshape(-1), bits, codes.numpy())


@_in_caller_threads
def numba_binary_encode(x, pred, ref_out, bits, row, col, check: bool = False) -> bool:
    xn, pn = _np(x), _np(pred)
    if not _abs_scales(xn, pn, row.numpy(), col.numpy(), check):
        return False
    _emit_rows(_binary_rows, xn, pn, _np(ref_out), bits, 1, row.numpy(), col.numpy())
    return True


@_in_caller_threads
def numba_binary_decode(bits, row, col, pred, out) -> None:
    on = _np(out)
    _binary_apply(_unpacked_rows(bits, *on.shape, 1), row.numpy(), col.numpy(), _np(pred), on)


@_in_caller_threads
def numba_int2_encode(x, pred, ref_out, codes, small, big, col, check: bool = False) -> bool:
    xn, pn = _np(x), _np(pred)
    row = np.empty(xn.shape[0], dtype=np.float32)
    if not _abs_scales(xn, pn, row, col.numpy(), check):
        return False
    _emit_rows(_int2_rows, xn, pn, _np(ref_out), codes, 2, row, col.numpy(), small.numpy(),
               big.numpy(), np.float32(INT2_SPLIT))
    return True


@_in_caller_threads
def numba_int2_decode(codes, small, big, col, pred, out) -> None:
    on = _np(out)
    _int2_apply(_unpacked_rows(codes, *on.shape, 2), small.numpy(), big.numpy(), col.numpy(),
                _np(pred), on)


@_in_caller_threads
def numba_minmax_encode(x, pred, ref_out, codes, lo, span, bits: int,
                        check: bool = False) -> bool:
    xn, pn = _np(x), _np(pred)
    n, c = xn.shape
    if n == 0:
        lo.zero_()
        span.zero_()
    else:
        lo_parts, hi_parts = _parts(n, c, np.inf), _parts(n, c, -np.inf)
        _col_min_max(xn, pn, lo_parts, hi_parts)
        lo_n = np.minimum.reduce(lo_parts, axis=0).astype(np.float32)
        hi_n = np.maximum.reduce(hi_parts, axis=0).astype(np.float32)
        if not (np.isfinite(lo_n).all() and np.isfinite(hi_n).all()):
            if _rejects(xn, check):
                return False
            if pn is not None:  # the extremes of the saturated residual
                lo_n, hi_n = _saturated(lo_n), _saturated(hi_n)
        lo.numpy()[:] = lo_n
        with np.errstate(invalid="ignore", over="ignore"):
            span.numpy()[:] = np.minimum(hi_n - lo_n, _FP32_MAX)
    qmax = np.float32((1 << bits) - 1)
    inv, step = _minmax_factors(span.numpy(), qmax)
    _emit_rows(_minmax_rows, xn, pn, _np(ref_out), codes, bits, bits, lo.numpy(), inv, step,
               qmax)
    return True


def _minmax_factors(span: np.ndarray, qmax: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Per channel ``qmax / span`` (0 where ``span`` is 0) and ``span / qmax``, float32."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(span > 0, qmax / np.where(span > 0, span, np.float32(1)), np.float32(0))
    return inv.astype(np.float32), (span / qmax).astype(np.float32)


@_in_caller_threads
def numba_minmax_decode(codes, lo, span, bits: int, pred, out) -> None:
    on = _np(out)
    _, step = _minmax_factors(span.numpy(), np.float32((1 << bits) - 1))
    _minmax_apply(_unpacked_rows(codes, *on.shape, bits), bits, lo.numpy(), step, _np(pred), on)


@_in_caller_threads
def numba_absmax_encode(x, pred, ref_out, codes, amax, bits: int, check: bool = False) -> bool:
    if bits != 8:
        raise ValueError(f"numba absmax kernels take 8-bit codes, got {bits}")
    xn, pn = _np(x), _np(pred)
    n, c = xn.shape
    if n == 0:
        amax.zero_()
    else:
        parts = _parts(n, c)
        _col_abs_max(xn, pn, parts)
        amax_n = np.maximum.reduce(parts, axis=0).astype(np.float32)
        if not np.isfinite(amax_n).all():
            if _rejects(xn, check):
                return False
            if pn is not None:
                amax_n = _saturated(amax_n)
        amax.numpy()[:] = amax_n
    _absmax_rows(xn, pn, _np(ref_out), codes.numpy().reshape(n, c), amax.numpy(),
                 np.float32(127))
    return True


@_in_caller_threads
def numba_absmax_decode(codes, amax, bits: int, pred, out) -> None:
    if bits != 8:
        raise ValueError(f"numba absmax kernels take 8-bit codes, got {bits}")
    on = _np(out)
    _absmax_apply(codes.numpy().reshape(on.shape), amax.numpy(), np.float32(127), _np(pred), on)


def numba_kernels():
    """The :class:`~compressed_comm.kernels.Kernels` bundle of this module; a kernel that
    numba cannot compile falls back to the torch reference with one log line."""
    import sys

    from numba.core.errors import NumbaError

    from . import bundle
    return bundle("numba", sys.modules[__name__], (NumbaError,))


_launch_pool()  # at import: the import lock keeps it from racing with itself
NUMBA_KERNELS = numba_kernels()
