"""Codec registry: ``get_codec(spec)`` turns a spec string into a :class:`Codec`.

=============  ====  =========================================================  ===========
spec           id    what is sent                                               bits/elem
=============  ====  =========================================================  ===========
identity       0     the tensor itself (lossless)                               16 (fp16)
fp8            1     e4m3 with a per-channel scale                              8
int8           2     symmetric per-channel                                      8
int4           3     min-max per-channel                                        4
int2           4     sign + magnitude bit, least-squares levels per row         2
binary         5     sign bits times a rank-1 magnitude                         1
lowrank:R      6     ``U diag(s) V^T`` of rank R, float16 factors               tiny
lowrankq:R     7     as lowrank, factors int4                                   tinier
topk:F         8     the fraction F of largest-magnitude entries + indices     varies
=============  ====  =========================================================  ===========

Within a stream, ``lowrank:R`` and ``lowrankq:R`` start each step's subspace iteration from
the previous step's basis (sender side only; the wire format does not depend on it).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Mapping

from .base import Codec
from .binary import BinaryCodec
from .fp8 import Fp8Codec
from .identity import IdentityCodec
from .int2 import Int2Codec
from .intk import IntCodec
from .lowrank import LowRankCodec
from .topk import TopKCodec

__all__ = [
    "Codec",
    "get_codec",
    "available_codecs",
    "IdentityCodec",
    "Fp8Codec",
    "IntCodec",
    "Int2Codec",
    "BinaryCodec",
    "LowRankCodec",
    "TopKCodec",
]


def _no_arg(name: str, args: list[str]) -> None:
    if args:
        raise ValueError(f"codec {name!r} takes no parameter; got {':'.join([name, *args])!r}")


def _lowrank(quantized: bool) -> Callable[[str, list[str], str | None], Codec]:
    def build(spec: str, args: list[str], kernels: str | None) -> Codec:
        name = "lowrankq" if quantized else "lowrank"
        if len(args) == 2 and args[1] == "warm":
            raise ValueError(f"codec spec {spec!r}: warm start is always on; use "
                             f"{name}:{args[0]}")
        if len(args) != 1:
            raise ValueError(f"codec spec {spec!r}: expected {name}:R, R an integer in "
                             f"1 .. 2**31-1")
        try:
            rank = int(args[0])
        except ValueError:
            raise ValueError(f"codec spec {spec!r}: rank {args[0]!r} is not an integer") from None
        return LowRankCodec(spec, rank, quantized=quantized, kernels=kernels)
    return build


def _topk(spec: str, args: list[str], kernels: str | None) -> Codec:
    if len(args) != 1:
        raise ValueError(f"codec spec {spec!r}: expected topk:F, F a fraction in (0, 1]")
    try:
        fraction = float(args[0])
    except ValueError:
        raise ValueError(f"codec spec {spec!r}: fraction {args[0]!r} is not a number") from None
    return TopKCodec(spec, fraction, kernels=kernels)


def _simple(factory: Callable[[str, str | None], Codec], name: str):
    def build(spec: str, args: list[str], kernels: str | None) -> Codec:
        _no_arg(name, args)
        return factory(spec, kernels)
    return build


_BUILDERS: Mapping[str, Callable[[str, list[str], str | None], Codec]] = MappingProxyType({
    "identity": _simple(lambda s, k: IdentityCodec(s, k), "identity"),
    "fp8": _simple(lambda s, k: Fp8Codec(s, k), "fp8"),
    "int8": _simple(lambda s, k: IntCodec(s, 8, k), "int8"),
    "int4": _simple(lambda s, k: IntCodec(s, 4, k), "int4"),
    "int2": _simple(lambda s, k: Int2Codec(s, k), "int2"),
    "binary": _simple(lambda s, k: BinaryCodec(s, k), "binary"),
    "lowrank": _lowrank(quantized=False),
    "lowrankq": _lowrank(quantized=True),
    "topk": _topk,
})

_SPEC_FORMS = ("identity", "fp8", "int8", "int4", "int2", "binary", "lowrank:R", "lowrankq:R",
               "topk:F")


def available_codecs() -> tuple[str, ...]:
    """The accepted spec forms (R: an integer rank in 1 .. 2**31-1, F: a fraction in
    (0, 1])."""
    return _SPEC_FORMS


def get_codec(spec: str, *, kernels: str | None = None) -> Codec:
    """The codec for ``spec`` (e.g. ``"binary"``, ``"lowrank:8"``, ``"topk:0.01"``).

    ``kernels`` pins the kernel implementation (see :mod:`compressed_comm.kernels`).
    Raises ``ValueError`` naming the valid forms for an unknown or malformed spec.
    """
    if not isinstance(spec, str):
        raise TypeError(f"codec spec must be a string like 'binary'; got {type(spec).__name__}")
    name, *args = spec.strip().lower().split(":")
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown codec {spec!r}; expected one of {', '.join(_SPEC_FORMS)}")
    return builder(spec.strip().lower(), args, kernels)
