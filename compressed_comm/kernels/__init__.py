"""Kernel dispatch: one set of functions per implementation, chosen by device and name.

Codecs never call an implementation directly; they ask :func:`get_kernels` for a
:class:`Kernels` bundle and call its members, whose signatures and semantics are those of
the torch reference in :mod:`compressed_comm.kernels.torch_ref`:

* ``torch`` -- the reference (the specification; any device);
* ``numba`` -- fused CPU kernels (:mod:`compressed_comm.kernels.numba_cpu`);
* ``cupy`` -- fused CUDA kernels (:mod:`compressed_comm.kernels.cupy_gpu`).

The implementation is picked, in order, by the ``impl`` argument (from
``CompressionConfig.kernels``), the ``COMPRESSED_COMM_KERNELS`` environment variable, or
``"auto"``: numba for CPU tensors, CuPy for CUDA tensors when CuPy and a driver are present
(otherwise the torch reference, with one log line).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from . import torch_ref
from .torch_ref import packed_nbytes

__all__ = ["Kernels", "KERNELS_ENV", "IMPLEMENTATIONS", "MEMBERS", "get_kernels", "bundle",
           "packed_nbytes", "available_implementations"]

logger = logging.getLogger(__name__)

KERNELS_ENV = "COMPRESSED_COMM_KERNELS"
IMPLEMENTATIONS: tuple[str, ...] = ("torch", "numba", "cupy")


@dataclass(frozen=True)
class Kernels:
    """The hot-path functions of one implementation (see ``torch_ref`` for semantics)."""

    name: str
    all_finite: Callable[[torch.Tensor], bool]
    error_norms: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    pack_bits: Callable[..., None]
    unpack_bits: Callable[..., torch.Tensor]
    pack_uint: Callable[..., None]
    unpack_uint: Callable[..., torch.Tensor]
    binary_encode: Callable[..., bool]
    binary_decode: Callable[..., None]
    int2_encode: Callable[..., bool]
    int2_decode: Callable[..., None]
    minmax_encode: Callable[..., bool]
    minmax_decode: Callable[..., None]
    absmax_encode: Callable[..., bool]
    absmax_decode: Callable[..., None]


#: the members of a :class:`Kernels` bundle, each ``<impl>_<member>`` in its module
MEMBERS: tuple[str, ...] = tuple(f for f in Kernels.__dataclass_fields__ if f != "name")

TORCH_KERNELS = Kernels(name="torch", **{m: getattr(torch_ref, f"torch_{m}") for m in MEMBERS})


def bundle(name: str, module: ModuleType, errors: tuple[type[BaseException], ...]) -> Kernels:
    """The bundle of implementation ``name``: each member is ``module``'s ``<name>_<member>``
    where it has one, else the torch reference's; a member that raises one of ``errors``
    (it cannot compile) falls back to the reference with one log line (:func:`with_fallback`)."""
    members = {m: getattr(module, f"{name}_{m}", getattr(TORCH_KERNELS, m)) for m in MEMBERS}
    return with_fallback(Kernels(name=name, **members), TORCH_KERNELS, errors)


def with_fallback(fast: Kernels, reference: Kernels, errors: tuple[type[BaseException], ...]
                  ) -> Kernels:
    """``fast`` with each kernel replaced by ``reference``'s after it first raises one of
    ``errors`` (a kernel that cannot compile): one log line names the kernel and the error,
    and that kernel of this bundle runs the reference from then on. Bit-identical results
    between the implementations (tested) keep streams in lock-step across the switch."""
    def guard(field: str) -> Callable[..., object]:
        chosen: list[Callable[..., object]] = [getattr(fast, field)]

        def call(*args: object, **kwargs: object) -> object:
            try:
                return chosen[0](*args, **kwargs)
            except errors as e:
                if chosen[0] is getattr(reference, field):
                    raise
                logger.warning("compressed_comm: %s kernel %s cannot compile or run (%s: %s); "
                               "using the %s reference for it", fast.name, field,
                               type(e).__name__, str(e).splitlines()[0] if str(e) else "",
                               reference.name)
                chosen[0] = getattr(reference, field)
                return chosen[0](*args, **kwargs)
        call.__name__ = call.__qualname__ = f"{fast.name}_{field}"
        return call
    return Kernels(name=fast.name, **{m: guard(m) for m in MEMBERS})  # type: ignore[arg-type]


def resolve_impl(impl: str | None = None) -> str:
    """The implementation name to use: ``impl``, else ``$COMPRESSED_COMM_KERNELS`` (unset or
    empty: auto), else auto."""
    if impl is not None:
        return _resolve(impl, True)
    return _resolve(os.environ.get(KERNELS_ENV, ""), False)


@functools.lru_cache(maxsize=64)
def _resolve(given: str, from_argument: bool) -> str:
    impl = given if from_argument else None
    name = given.strip().lower() or "auto"  # an empty variable means auto too
    if name not in ("auto", *IMPLEMENTATIONS):
        source = "kernels" if impl is not None else f"${KERNELS_ENV}"
        raise ValueError(
            f"unknown kernel implementation {name!r} (from {source}); expected one of "
            f"auto, {', '.join(IMPLEMENTATIONS)}"
        )
    return name


@functools.cache
def _cupy_unavailable() -> str | None:
    """Why the CuPy kernels cannot run here (None if they can); probed once per process."""
    try:
        from .cupy_gpu import probe
    except ImportError as e:  # pragma: no cover - import of our own module
        return str(e)
    reason = probe()
    if reason is not None:
        logger.info("compressed_comm: CuPy kernels unavailable (%s); CUDA tensors use the torch "
                    "reference kernels", reason)
    return reason


def available_implementations(device: torch.device | str) -> tuple[str, ...]:
    """The implementations that can run on ``device`` here."""
    device = torch.device(device)
    if device.type == "cpu":
        return ("torch", "numba")
    if device.type == "cuda" and _cupy_unavailable() is None:
        return ("torch", "cupy")
    return ("torch",)


@functools.cache
def _fallback(name: str, device_type: str, reason: str) -> None:
    logger.warning("compressed_comm: %s kernels cannot run on %s tensors (%s); using the torch "
                   "reference kernels", name, device_type, reason)


def get_kernels(device: torch.device | str, impl: str | None = None) -> Kernels:
    """The kernels to run on ``device``: ``impl`` if given, else the environment, else auto.

    An implementation that cannot run on ``device`` (numba on CUDA, CuPy on CPU or without a
    CUDA driver) falls back to the torch reference with one log line.
    """
    name = resolve_impl(impl)
    device = torch.device(device)
    if name == "auto":
        name = "numba" if device.type == "cpu" else "cupy"
    if name == "numba":
        if device.type == "cpu":
            return importlib.import_module(".numba_cpu", __name__).NUMBA_KERNELS
        _fallback(name, device.type, "numba kernels take CPU tensors")
    elif name == "cupy":
        reason = "CuPy kernels take CUDA tensors" if device.type != "cuda" else _cupy_unavailable()
        if reason is None:
            return importlib.import_module(".cupy_gpu", __name__).CUPY_KERNELS
        if impl is not None or os.environ.get(KERNELS_ENV):
            _fallback(name, device.type, reason)
    return TORCH_KERNELS
