"""CompressionConfig: every knob of residual compression in one frozen dataclass."""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .auto import check_budget, is_auto, parse_auto
from .codecs import get_codec
from .kernels import resolve_impl
from .keyframes import KEYFRAME_CODECS, Keyframes

__all__ = ["CompressionConfig", "Keyframes", "KEYFRAME_CODECS", "SHARED_FIELDS",
           "differing_fields"]


def _shared(default: Any = None, **kwargs: Any) -> Any:
    """A field every rank of a group must set alike (it shapes what goes on the wire)."""
    if "default_factory" in kwargs:
        return field(metadata={"shared": True}, **kwargs)
    return field(default=default, metadata={"shared": True}, **kwargs)


@dataclass(frozen=True)
class CompressionConfig:
    """How activations are compressed, by concern: the algorithm (1-4, 6-8), keyframes (5),
    safety (9, 12, 13) and the implementation (10, 11). Tuning guide:

    1. ``codec`` -- a spec for :func:`compressed_comm.get_codec`. ``"binary"`` (1 bit per
       element, ~16x vs fp16) is the default; ``"int2"``/``"int4"`` trade bytes for accuracy;
       ``"lowrank:R"`` is smallest when residuals are low-rank. ``"auto"`` (or a candidate
       list, ``"auto:raw,int4,int2,binary,lowrank:8"``) lets each stream pick, at every
       step, the candidate that is fastest on the measured link and device (raw always
       among them; :mod:`compressed_comm.auto`); a group needs ``handshake=True`` for it.
    2. ``residual_order`` -- 0 compresses the tensor itself, 1 (default) the change since the
       last reconstruction, 2 the change against a linear extrapolation
       ``ref + decay * (ref - previous ref)``.
    3. ``decay`` -- damping of the extrapolated step for order 2, in ``[0, 1]``.
    4. ``warmup_steps`` -- the first steps of each stream are sent in full (lossless), so
       references start exact; 1 is enough for order 1, use 2 or more for order 2.
    5. ``keyframes`` -- a :class:`~compressed_comm.Keyframes`: how warmup steps and keyframes
       are sent (``codec``: ``"identity"``, lossless, by default; ``"int8"``/``"fp8"``
       halve the bytes), whether a periodic keyframe resets accumulated error (``period``)
       and whether it is spread over several steps as row slices (``spread``).
    6. ``min_bytes`` -- tensors smaller than this are always sent raw; compression of tiny
       messages costs more in kernel launches than it saves in bytes.
    7. ``skip`` -- ``fnmatch`` patterns of stream names that are always sent raw.
    8. ``closed_loop`` -- True (default): the sender keeps the receiver's reconstruction, so
       quantisation error is fed back into the next residual. False is open loop (the sender
       keeps the true tensor, receivers drift): for ablations only.
    9. ``check_finite`` -- raise :class:`~compressed_comm.NonFiniteError` on NaN/Inf inputs
       (default). If False, NaN (and Inf sent without a prediction) propagates into both
       references identically and persists until the next keyframe; an Inf against a
       prediction saturates like any overflow. Finite inputs never give non-finite
       references: residuals and predictions saturate at the float32 maximum. The check
       rides on the pass that computes the codec's scales (binary, int2/4/8 with order 0
       or 1; a separate pass otherwise) and raises from ``encode`` before the stream
       changes. On CUDA it synchronises with the host.
    10. ``kernels`` -- pin the kernel implementation (``"torch"``, ...); None follows
        ``$COMPRESSED_COMM_KERNELS``, else the best available.
    11. ``track_error`` -- senders record the relative L2 error of each reconstruction
        in :attr:`StreamStats.last_rel_error` (one extra pass over the tensor per message;
        off by default, and then ``last_rel_error`` is None).
    12. ``checksum`` -- every payload carries a CRC-32 of its body, checked on decode: a
        corrupted payload raises :class:`~compressed_comm.WireFormatError` instead of
        entering the reference. Off by default: NCCL and TCP already protect the bytes in
        transit; the CRC costs a pass over the payload on each side (a host copy on CUDA).
        The header (codec, stream, session, step, config) is always checked.

    13. ``handshake`` -- the control plane (:mod:`compressed_comm.group.plane`): at every
        ``step()`` the ranks agree on the step's collectives in one small exchange on a
        channel of its own, and later steps' collectives that repeat them go at once; the
        first step, new streams and changed shapes get a size handshake. Ranks that
        disagree (a missed ``step()``, another config) all raise the same
        :class:`~compressed_comm.WireFormatError`, a rank that fails makes every peer raise
        :class:`~compressed_comm.PeerFailedError` at once, and ``new_session()`` recovers,
        instead of hanging or crashing the backend. Costs one small exchange per step (on
        CUDA, a host synchronisation); off, ranks must be known to issue the same calls.
    14. ``max_rel_error`` -- with ``codec="auto"``: the quality budget, the largest relative
        L2 error ``||x - reconstruction|| / ||x||`` of one message a candidate may leave
        (as measured by shadow encoding every few steps; :mod:`compressed_comm.auto`).
        None (default): "at least as accurate as binary". Raw is always admitted, and the
        only one until the candidates are first measured.

    Whether the drop-in process group also compresses reductions is its own switch
    (:func:`~compressed_comm.wrap_process_group`'s ``reduce``), not a config field.
    ``keyframe_codec``, ``keyframe_period``, ``keyframe_spread`` and ``reduce`` are still
    accepted, with a :class:`DeprecationWarning`, for one release.

    All ranks of a group must use the same settings for 1-8, 12 and 14
    (:data:`SHARED_FIELDS`): the first message of every
    stream and every size handshake carry a fingerprint of them, and a rank whose config
    differs raises :class:`~compressed_comm.WireFormatError` naming the fields.
    """

    codec: str = _shared("binary")
    residual_order: int = _shared(1)
    decay: float = _shared(0.5)
    warmup_steps: int = _shared(1)
    keyframes: Keyframes = _shared(default_factory=Keyframes)
    min_bytes: int = _shared(0)
    skip: tuple[str, ...] = _shared(default_factory=tuple)
    closed_loop: bool = _shared(True)
    check_finite: bool = True
    kernels: str | None = None
    track_error: bool = False
    checksum: bool = _shared(False)
    handshake: bool = True
    #: ``CompressionConfig(reduce=...)``, deprecated: the drop-in group's own switch now
    legacy_reduce: bool = field(default=False, repr=False)
    max_rel_error: float | None = _shared(None)

    def __post_init__(self) -> None:
        if is_auto(self.codec):
            parse_auto(self.codec)  # raises ValueError naming what is wrong
        elif self.max_rel_error is not None:
            raise ValueError(f"max_rel_error is the quality budget of codec='auto'; got "
                             f"codec={self.codec!r} (use codec='auto' or leave "
                             f"max_rel_error=None)")
        else:
            get_codec(self.codec)  # raises ValueError naming the valid specs
        if not isinstance(self.keyframes, Keyframes):
            raise ValueError(f"keyframes must be a Keyframes; got {self.keyframes!r}")
        if self.residual_order not in (0, 1, 2):
            raise ValueError(f"residual_order must be 0, 1 or 2; got {self.residual_order!r}")
        if not 0.0 <= float(self.decay) <= 1.0:
            raise ValueError(f"decay must be in [0, 1]; got {self.decay!r}")
        for name in ("warmup_steps", "min_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
        check_budget(self.max_rel_error)
        if isinstance(self.skip, str):
            raise ValueError(f"skip must be a sequence of name patterns, not the string "
                             f"{self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.kernels is not None:
            resolve_impl(self.kernels)

    @property
    def auto(self) -> bool:
        """Whether :attr:`codec` is an auto spec (each stream picks its codec per step)."""
        return is_auto(self.codec)

    @property
    def candidates(self) -> tuple[str, ...]:
        """The codecs a stream may send through: the auto spec's candidates (raw first), or
        :attr:`codec` alone."""
        return parse_auto(self.codec) if self.auto else (get_codec(self.codec).spec,)

    def skips(self, stream_name: str) -> bool:
        """Whether ``stream_name`` matches one of the :attr:`skip` patterns."""
        return any(fnmatch.fnmatchcase(stream_name, pat) for pat in self.skip)

    def __getattr__(self, name: str) -> Any:
        if name in _MOVED:
            warnings.warn(f"CompressionConfig.{name} is deprecated; use {_MOVED[name][1]}",
                          DeprecationWarning, stacklevel=2)
            if name == "reduce":
                return self.legacy_reduce
            return getattr(self.keyframes, _MOVED[name][0])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def fingerprint(self) -> tuple[int, ...]:
        """A CRC-32 of each of :data:`SHARED_FIELDS`, in that order: what ranks compare to
        name the fields on which their configs differ (``decay`` counts only for
        ``residual_order=2``, the only order that uses it)."""
        return tuple(zlib.crc32(repr(_value(self, name) if name != "decay"
                                     or self.residual_order == 2 else None).encode())
                     for name in SHARED_FIELDS)

    def differences(self, fingerprint: Sequence[int]) -> list[str]:
        """The :data:`SHARED_FIELDS` whose CRC in ``fingerprint`` differs from this config's."""
        return differing_fields([self.fingerprint(), fingerprint])


def differing_fields(fingerprints: Sequence[Sequence[int]]) -> list[str]:
    """The :data:`SHARED_FIELDS` on which the configs of ``fingerprints`` (one per rank, see
    :meth:`CompressionConfig.fingerprint`) differ; ``decay`` only where the residual orders
    agree (it counts for order 2 alone, so it differs whenever the orders do)."""
    differ = [name for i, name in enumerate(SHARED_FIELDS)
              if len({tuple(f)[i] for f in fingerprints}) > 1]
    return [n for n in differ if n != "decay" or "residual_order" not in differ]


#: deprecated argument -> (where it went, what to write instead)
_MOVED = {"keyframe_codec": ("codec", "keyframes=Keyframes(codec=...)"),
          "keyframe_period": ("period", "keyframes=Keyframes(period=...)"),
          "keyframe_spread": ("spread", "keyframes=Keyframes(spread=...)"),
          "reduce": ("legacy_reduce", "wrap_process_group(reduce=...) or "
                     "enable_compression(reduce=...)")}
_dataclass_init = CompressionConfig.__init__


def _init(self: CompressionConfig, *args: Any, **kwargs: Any) -> None:
    moved = {name: kwargs.pop(name) for name in _MOVED if name in kwargs}
    for name in moved:
        warnings.warn(f"CompressionConfig({name}=...) is deprecated; use {_MOVED[name][1]}",
                      DeprecationWarning, stacklevel=2)
    if "reduce" in moved:
        kwargs["legacy_reduce"] = bool(moved.pop("reduce"))
    if moved:  # validated by Keyframes, which names the argument
        kwargs["keyframes"] = dataclasses.replace(
            kwargs.get("keyframes", Keyframes()),
            **{_MOVED[name][0]: value for name, value in moved.items()})
    _dataclass_init(self, *args, **kwargs)


_init.__doc__ = _dataclass_init.__doc__
_init.__signature__ = __import__("inspect").signature(_dataclass_init)  # type: ignore[attr-defined]
CompressionConfig.__init__ = _init  # type: ignore[method-assign]

def _value(config: CompressionConfig, name: str) -> Any:
    """The value of the (possibly dotted: ``keyframes.codec``) field ``name``."""
    value: Any = config
    for part in name.split("."):
        value = getattr(value, part)
    return value


#: The :class:`CompressionConfig` fields every rank of a group must share, in the order of
#: :meth:`CompressionConfig.fingerprint` (:class:`Keyframes`' fields one by one).
SHARED_FIELDS: tuple[str, ...] = tuple(
    name for f in fields(CompressionConfig) if f.metadata.get("shared")
    for name in ([f"keyframes.{k.name}" for k in fields(Keyframes)] if f.name == "keyframes"
                 else [f.name]))
