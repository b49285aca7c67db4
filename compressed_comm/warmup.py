"""Compile every kernel a deployment will use before its first request."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from .codecs import get_codec
from .config import CompressionConfig
from .session import Session
from .wire import SUPPORTED_DTYPES

__all__ = ["warmup", "WarmupResult", "DEFAULT_WARMUP_CODECS"]

#: What :func:`warmup` compiles when no codecs are named: the quantising codecs with kernels.
DEFAULT_WARMUP_CODECS: tuple[str, ...] = ("binary", "int2", "int4", "int8")

# Row widths whose codes fill whole bytes per row (8) and do not (12): two packing paths.
_WIDTHS = (8, 12)


@dataclass(frozen=True)
class WarmupResult:
    """How long warming one codec for one dtype took (compiling, or loading from the cache)."""

    codec: str
    dtype: torch.dtype
    kernels: str
    seconds: float


def warmup(
    dtypes: Sequence[torch.dtype] = SUPPORTED_DTYPES,
    codecs: Sequence[str] = DEFAULT_WARMUP_CODECS,
    device: torch.device | str = "cpu",
    *,
    kernels: str | None = None,
) -> list[WarmupResult]:
    """Run every kernel variant that ``codecs`` use on ``device`` for each of ``dtypes``.

    numba kernels are compiled into numba's on-disk cache (next to the package; later
    processes load them in well under a second) and CUDA modules are built, so the first
    request of a server pays nothing. Each codec is driven through closed-loop streams of
    residual orders 0, 1 and 2 and through the stateless ``encode``/``decode``, on small
    tensors. Returns one :class:`WarmupResult` per (codec, dtype).
    """
    device = torch.device(device)
    results = []
    for spec in codecs:
        get_codec(spec)  # a bad spec fails before any work
        for dtype in dtypes:
            t0 = time.perf_counter()
            for c in _WIDTHS:
                x = torch.linspace(-1.0, 1.0, 4 * c, device=device).view(4, c).to(dtype)
                codec = get_codec(spec, kernels=kernels)
                codec.decode(codec.encode(x))
                for order in (0, 1, 2):
                    config = CompressionConfig(codec=spec, residual_order=order, warmup_steps=1,
                                               kernels=kernels, track_error=True)
                    sender, receiver = Session(config, rank=0), Session(config, rank=1)
                    for step in range(3):
                        xs = x * (1.0 + 0.1 * step)
                        payload = sender.encoder("warmup", xs).encode(xs)
                        receiver.decoder("warmup", 0, xs).decode(payload)
            name = get_codec(spec, kernels=kernels).kernels(device).name
            results.append(WarmupResult(spec, dtype, name, time.perf_counter() - t0))
    return results
