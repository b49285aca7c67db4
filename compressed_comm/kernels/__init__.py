"""Kernel dispatch: one set of functions per implementation, chosen by device and name.

Codecs never call an implementation directly; they ask :func:`get_kernels` for a
:class:`Kernels` bundle and call its members, whose signatures and semantics are those of
the torch reference in :mod:`compressed_comm.kernels.torch_ref`. Fast implementations
(numba on CPU, CuPy on GPU) plug in here without touching the codecs.

The implementation is picked, in order, by the ``impl`` argument (from
``CompressionConfig.kernels``), the ``COMPRESSED_COMM_KERNELS`` environment variable, or
``"auto"`` (the best implementation available for the tensor's device).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import torch_ref
from .torch_ref import packed_nbytes

__all__ = ["Kernels", "KERNELS_ENV", "IMPLEMENTATIONS", "get_kernels", "packed_nbytes"]

KERNELS_ENV = "COMPRESSED_COMM_KERNELS"
IMPLEMENTATIONS: tuple[str, ...] = ("torch",)


@dataclass(frozen=True)
class Kernels:
    """The hot-path functions of one implementation (see ``torch_ref`` for semantics)."""

    name: str
    pack_bits: Callable[..., None]
    unpack_bits: Callable[..., torch.Tensor]
    pack_uint: Callable[..., None]
    unpack_uint: Callable[..., torch.Tensor]
    binary_encode: Callable[..., None]
    binary_decode: Callable[..., None]
    minmax_encode: Callable[..., None]
    minmax_decode: Callable[..., None]
    absmax_encode: Callable[..., None]
    absmax_decode: Callable[..., None]


TORCH_KERNELS = Kernels(
    name="torch",
    pack_bits=torch_ref.torch_pack_bits,
    unpack_bits=torch_ref.torch_unpack_bits,
    pack_uint=torch_ref.torch_pack_uint,
    unpack_uint=torch_ref.torch_unpack_uint,
    binary_encode=torch_ref.torch_binary_encode,
    binary_decode=torch_ref.torch_binary_decode,
    minmax_encode=torch_ref.torch_minmax_encode,
    minmax_decode=torch_ref.torch_minmax_decode,
    absmax_encode=torch_ref.torch_absmax_encode,
    absmax_decode=torch_ref.torch_absmax_decode,
)


def resolve_impl(impl: str | None = None) -> str:
    """The implementation name to use: ``impl``, else ``$COMPRESSED_COMM_KERNELS``, else auto."""
    name = impl if impl is not None else os.environ.get(KERNELS_ENV, "auto")
    name = name.strip().lower()
    if name not in ("auto", *IMPLEMENTATIONS):
        source = "kernels" if impl is not None else f"${KERNELS_ENV}"
        raise ValueError(
            f"unknown kernel implementation {name!r} (from {source}); expected one of "
            f"auto, {', '.join(IMPLEMENTATIONS)}"
        )
    return name


def get_kernels(device: torch.device | str, impl: str | None = None) -> Kernels:
    """The kernels to run on ``device``: ``impl`` if given, else the environment, else auto."""
    resolve_impl(impl)
    # Only the torch reference exists so far; it runs on every device.
    return TORCH_KERNELS
