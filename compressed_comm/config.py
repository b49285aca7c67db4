"""CompressionConfig: every knob of residual compression in one frozen dataclass."""

from __future__ import annotations

import fnmatch
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .codecs import get_codec
from .kernels import resolve_impl

__all__ = ["CompressionConfig", "KEYFRAME_CODECS", "SHARED_FIELDS", "differing_fields"]


def _shared(default: Any = None, **kwargs: Any) -> Any:
    """A field every rank of a group must set alike (it shapes what goes on the wire)."""
    if "default_factory" in kwargs:
        return field(metadata={"shared": True}, **kwargs)
    return field(default=default, metadata={"shared": True}, **kwargs)

#: Codecs a keyframe may use: stateless ones that send the tensor itself.
KEYFRAME_CODECS = ("identity", "fp8", "int8", "int4", "int2", "binary")


@dataclass(frozen=True)
class CompressionConfig:
    """How activations are compressed. Tuning guide:

    1. ``codec`` -- a spec for :func:`compressed_comm.get_codec`. ``"binary"`` (1 bit per
       element, ~16x vs fp16) is the default; ``"int2"``/``"int4"`` trade bytes for accuracy;
       ``"lowrank:R"`` is smallest when residuals are low-rank.
    2. ``residual_order`` -- 0 compresses the tensor itself, 1 (default) the change since the
       last reconstruction, 2 the change against a linear extrapolation
       ``ref + decay * (ref - previous ref)``.
    3. ``decay`` -- damping of the extrapolated step for order 2, in ``[0, 1]``.
    4. ``warmup_steps`` -- the first steps of each stream are sent in full (lossless), so
       references start exact; 1 is enough for order 1, use 2 or more for order 2.
    5. ``keyframe_period`` -- if > 0, every ``keyframe_period``-th step is also sent in full,
       resetting accumulated error (and recovering from any NaN that was let through).
       ``keyframe_codec`` -- how warmup steps and keyframes are sent: ``"identity"``
       (default, lossless) or a stateless lossy codec (``"int8"``, ``"fp8"`` halve the
       bytes, ``"int4"`` quarters them; also ``"int2"``, ``"binary"``). Both sides take
       the decoded keyframe as their reference, so what it loses is the next residual's to
       correct. ``keyframe_spread`` -- if > 1, each periodic keyframe is sent in that many
       slices over as many consecutive steps: step ``t`` with ``t % keyframe_period = j <
       keyframe_spread`` sends slice ``j`` of the rows through ``keyframe_codec`` and the
       other rows as residuals, so no single step pays the whole tensor (warmup steps stay
       whole). At most ``keyframe_period``.
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
       references: residuals and predictions saturate at the float32 maximum. The check rides on the pass that computes the codec's scales
       (binary, int2/4/8 with order 0 or 1; a separate pass otherwise) and raises from
       ``encode`` before the stream changes. On CUDA it synchronises with the host.
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

    14. ``reduce`` -- the drop-in process group (:func:`~compressed_comm.wrap_process_group`)
        also compresses ``all_reduce``, ``all_reduce_coalesced`` and
        ``reduce_scatter_tensor`` of float tensors with SUM or AVG (a compressed
        reduce-scatter, then an all-gather: every rank gets the same bits). Off by default:
        code often relies on an all-reduce being exact. The explicit
        :meth:`~compressed_comm.CompressedGroup.all_reduce` needs no switch.

    All ranks of a group must use the same settings for 1-8 (keyframe_codec and
    keyframe_spread included) and 12 (:data:`SHARED_FIELDS`): the first message of every
    stream and every size handshake carry a fingerprint of them, and a rank whose config
    differs raises :class:`~compressed_comm.WireFormatError` naming the fields.
    """

    codec: str = _shared("binary")
    residual_order: int = _shared(1)
    decay: float = _shared(0.5)
    warmup_steps: int = _shared(1)
    keyframe_period: int = _shared(0)
    keyframe_codec: str = _shared("identity")
    keyframe_spread: int = _shared(1)
    min_bytes: int = _shared(0)
    skip: tuple[str, ...] = _shared(default_factory=tuple)
    closed_loop: bool = _shared(True)
    check_finite: bool = True
    kernels: str | None = None
    track_error: bool = False
    checksum: bool = _shared(False)
    handshake: bool = True
    reduce: bool = False

    def __post_init__(self) -> None:
        get_codec(self.codec)  # raises ValueError naming the valid specs
        if get_codec(self.keyframe_codec).spec not in KEYFRAME_CODECS:
            raise ValueError(
                f"keyframe_codec must be one of {', '.join(KEYFRAME_CODECS)} (a keyframe sends "
                f"the tensor itself, with no state); got {self.keyframe_codec!r}")
        if self.residual_order not in (0, 1, 2):
            raise ValueError(f"residual_order must be 0, 1 or 2; got {self.residual_order!r}")
        if not 0.0 <= float(self.decay) <= 1.0:
            raise ValueError(f"decay must be in [0, 1]; got {self.decay!r}")
        for name in ("warmup_steps", "keyframe_period", "min_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
        spread = self.keyframe_spread
        if not isinstance(spread, int) or isinstance(spread, bool) or spread < 1:
            raise ValueError(f"keyframe_spread must be a positive integer; got {spread!r}")
        if spread > 1 and not spread <= self.keyframe_period:
            raise ValueError(f"keyframe_spread={spread} needs keyframe_period >= {spread} (the "
                             f"slices of one keyframe go out before the next); got "
                             f"keyframe_period={self.keyframe_period}")
        if isinstance(self.skip, str):
            raise ValueError(f"skip must be a sequence of name patterns, not the string {self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.kernels is not None:
            resolve_impl(self.kernels)

    def skips(self, stream_name: str) -> bool:
        """Whether ``stream_name`` matches one of the :attr:`skip` patterns."""
        return any(fnmatch.fnmatchcase(stream_name, pat) for pat in self.skip)

    def fingerprint(self) -> tuple[int, ...]:
        """A CRC-32 of each of :data:`SHARED_FIELDS`, in that order: what ranks compare to
        name the fields on which their configs differ (``decay`` counts only for
        ``residual_order=2``, the only order that uses it)."""
        return tuple(zlib.crc32(repr(getattr(self, name) if name != "decay"
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


#: The :class:`CompressionConfig` fields every rank of a group must share, in the order of
#: :meth:`CompressionConfig.fingerprint`.
SHARED_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(CompressionConfig)
                                       if f.metadata.get("shared"))
