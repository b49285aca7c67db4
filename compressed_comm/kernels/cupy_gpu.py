"""CuPy kernels for CUDA tensors: fused CUDA C (``cuda/residual_codecs.cu``), held to the reference.

The source is compiled once per process at first use (``cupy.RawModule``, which also
caches the binary on disk), with ``-fmad=false`` so that no multiply-add is contracted
where the reference rounds twice. Kernels run on torch's current CUDA stream
(``cupy.cuda.ExternalStream``) and see torch tensors through DLPack, without copies.
CuPy is imported only here, and only when a CUDA tensor is compressed; :func:`probe`
tells the dispatcher whether this can work at all.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import torch

from .torch_ref import INT2_SPLIT, torch_all_finite

__all__ = ["probe", "source", "CUPY_KERNELS", "TILE", "OPTIONS", "KernelCompileError"]

TILE = 32          # rows per reduction tile (the TILE of the CUDA source)
THREADS = 256
OPTIONS = ("-std=c++17", "-fmad=false")
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def source() -> str:
    """The CUDA C source of the kernels."""
    return resources.files(__package__).joinpath("cuda/residual_codecs.cu").read_text()


def probe() -> str | None:
    """Why the CuPy kernels cannot run here (None if they can)."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install compressed_comm[gpu])"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA device"
    except Exception as e:  # noqa: BLE001 - a missing driver raises CUDARuntimeError
        return f"CuPy cannot reach the CUDA driver ({type(e).__name__}: {e})"
    return None


class KernelCompileError(RuntimeError):
    """The CUDA source failed to compile; the message names the kernel and quotes NVRTC."""


@functools.cache
def _module() -> Any:
    import cupy
    try:
        module = cupy.RawModule(code=source(), options=OPTIONS)
        module.compile()
    except Exception as e:  # noqa: BLE001 - CompileException and friends
        raise KernelCompileError(f"compiling compressed_comm/kernels/cuda/residual_codecs.cu failed:"
                            f"\n{e}") from e
    return module


def _kernel(name: str, dtype: torch.dtype | None = None) -> Any:
    full = name if dtype is None else f"{name}_{_SUFFIX[dtype]}"
    try:
        return _module().get_function(full)
    except KernelCompileError:
        raise
    except Exception as e:  # noqa: BLE001
        raise KernelCompileError(f"kernel {full}: {e}") from e


def _arr(t: torch.Tensor) -> Any:
    """A CuPy view of a contiguous CUDA tensor (bfloat16 as int16 bits)."""
    import cupy
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return cupy.from_dlpack(t.detach())


def _launch(name: str, dtype: torch.dtype | None, grid: int, block: int, *args: Any) -> None:
    import numpy as np
    cast = [_arr(a) if isinstance(a, torch.Tensor) else
            (np.int64(a) if isinstance(a, int) and not isinstance(a, bool) else a) for a in args]
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    with _device(device.index), _stream(device.index,
                                        torch.cuda.current_stream(device).cuda_stream):
        _kernel(name, dtype)((max(grid, 1),), (block,), tuple(cast))


@functools.lru_cache(maxsize=None)
def _device(index: int) -> Any:
    """CuPy's handle of CUDA device ``index`` (one per device, not per launch)."""
    import cupy
    return cupy.cuda.Device(index)


@functools.lru_cache(maxsize=64)
def _stream(index: int, handle: int) -> Any:
    """CuPy's view of the torch stream ``handle`` on device ``index``."""
    import cupy
    return cupy.cuda.ExternalStream(handle, index)


def _int(v: int) -> Any:
    import numpy as np
    return np.int32(v)


def _grid(items: int) -> int:
    return (items + THREADS - 1) // THREADS


def _pred_ref(x: torch.Tensor, pred: torch.Tensor | None, ref: torch.Tensor | None
              ) -> tuple[torch.Tensor, Any, torch.Tensor, Any]:
    return (pred if pred is not None else x, _int(pred is not None),
            ref if ref is not None else x, _int(ref is not None))


def _unchecked(x: torch.Tensor, check: bool) -> bool:
    """Whether to go on encoding: False if ``check`` and ``x`` holds NaN/Inf (a host sync)."""
    return not check or torch_all_finite(x)


def _abs_scales(x: torch.Tensor, p: torch.Tensor, has_p: Any, row: torch.Tensor,
                col: torch.Tensor) -> None:
    """binary's ``row`` and ``col`` scales of the residual (two launches)."""
    n, c = x.shape
    tiles = (n + TILE - 1) // TILE
    rows = torch.empty(n, dtype=torch.float64, device=x.device)
    partials = torch.empty(max(tiles, 1), c, dtype=torch.float64, device=x.device)
    _launch("abs_sums", x.dtype, tiles, THREADS, x, p, has_p, n, c, rows, partials)
    _launch("binary_scales_finish", None, 1, 1024, rows, partials, n, c, tiles, row, col)


def cupy_binary_encode(x, pred, ref_out, bits, row, col, check: bool = False) -> bool:
    if not _unchecked(x, check):
        return False
    n, c = x.shape
    p, has_p, r, has_r = _pred_ref(x, pred, ref_out)
    _abs_scales(x, p, has_p, row, col)
    _launch("binary_pack", x.dtype, _grid((n * c + 7) // 8), THREADS, x, p, has_p, r, has_r,
            bits, row, col, n, c)
    return True


def cupy_binary_decode(bits, row, col, pred, out) -> None:
    n, c = out.shape
    p, has_p = (pred if pred is not None else out), _int(pred is not None)
    _launch("binary_apply", out.dtype, _grid((n * c + 7) // 8), THREADS, bits, row, col, p,
            has_p, out, n, c)


def cupy_int2_encode(x, pred, ref_out, codes, small, big, col, check: bool = False) -> bool:
    import numpy as np
    if not _unchecked(x, check):
        return False
    n, c = x.shape
    row = torch.empty(n, dtype=torch.float32, device=x.device)
    p, has_p, r, has_r = _pred_ref(x, pred, ref_out)
    split = np.float32(INT2_SPLIT)
    _abs_scales(x, p, has_p, row, col)
    _launch("int2_levels", x.dtype, n, THREADS, x, p, has_p, row, col, split, n, c, small, big)
    _launch("int2_pack", x.dtype, _grid((n * c + 3) // 4), THREADS, x, p, has_p, r, has_r,
            codes, row, col, small, big, split, n, c)
    return True


def cupy_int2_decode(codes, small, big, col, pred, out) -> None:
    n, c = out.shape
    p, has_p = (pred if pred is not None else out), _int(pred is not None)
    _launch("int2_apply", out.dtype, _grid((n * c + 3) // 4), THREADS, codes, small, big, col,
            p, has_p, out, n, c)


def cupy_minmax_encode(x, pred, ref_out, codes, lo, span, bits: int,
                       check: bool = False) -> bool:
    if not _unchecked(x, check):
        return False
    n, c = x.shape
    tiles = (n + TILE - 1) // TILE
    lo_parts = torch.empty(max(tiles, 1), c, device=x.device)
    hi_parts = torch.empty_like(lo_parts)
    p, has_p, r, has_r = _pred_ref(x, pred, ref_out)
    if n == 0:
        lo.zero_()
        span.zero_()
    else:
        _launch("col_min_max", x.dtype, tiles, THREADS, x, p, has_p, n, c, lo_parts, hi_parts)
        _launch("min_max_finish", None, _grid(c), THREADS, lo_parts, hi_parts, c, tiles, lo,
                span)
    per = 8 // bits
    _launch("minmax_pack", x.dtype, _grid((n * c + per - 1) // per), THREADS, x, p, has_p, r,
            has_r, codes, lo, span, _int(bits), n, c)
    return True


def cupy_minmax_decode(codes, lo, span, bits: int, pred, out) -> None:
    n, c = out.shape
    per = 8 // bits
    p, has_p = (pred if pred is not None else out), _int(pred is not None)
    _launch("minmax_apply", out.dtype, _grid((n * c + per - 1) // per), THREADS, codes, lo,
            span, _int(bits), p, has_p, out, n, c)


def cupy_absmax_encode(x, pred, ref_out, codes, amax, bits: int, check: bool = False) -> bool:
    if not _unchecked(x, check):
        return False
    if bits != 8:
        raise ValueError(f"CuPy absmax kernels take 8-bit codes, got {bits}")
    n, c = x.shape
    tiles = (n + TILE - 1) // TILE
    parts = torch.empty(max(tiles, 1), c, device=x.device)
    p, has_p, r, has_r = _pred_ref(x, pred, ref_out)
    if n == 0:
        amax.zero_()
    else:
        _launch("col_abs_max", x.dtype, tiles, THREADS, x, p, has_p, n, c, parts)
        _launch("abs_max_finish", None, _grid(c), THREADS, parts, c, tiles, amax)
    _launch("absmax_pack", x.dtype, _grid(n * c), THREADS, x, p, has_p, r, has_r, codes, amax,
            n, c)
    return True


def cupy_absmax_decode(codes, amax, bits: int, pred, out) -> None:
    if bits != 8:
        raise ValueError(f"CuPy absmax kernels take 8-bit codes, got {bits}")
    n, c = out.shape
    p, has_p = (pred if pred is not None else out), _int(pred is not None)
    _launch("absmax_apply", out.dtype, _grid(n * c), THREADS, codes, amax, p, has_p, out, n, c)


def _cupy_kernels() -> Any:
    import sys

    from . import bundle
    # statistics, bit packing and top-k indices run as the torch reference's ops (one pass
    # each, on the GPU); a kernel that cannot compile falls back to the reference
    return bundle("cupy", sys.modules[__name__], (KernelCompileError,))


CUPY_KERNELS = _cupy_kernels()
