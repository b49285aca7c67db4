"""Closed-loop residual streams: the sender and receiver halves of one flow of activations.

A stream carries one logical tensor (say, layer 7's keys from rank 2) across denoising
steps. At step ``t`` both sides hold the same *reference* ``ref`` (the last
reconstruction). The sender predicts ``p`` from it, sends ``C(x - p)`` and both sides set
``ref = p + decode(C(x - p))`` with the same arithmetic, so the references stay
bit-identical and each step's quantisation error ``x - ref`` is carried into the next
residual (error feedback).

Predictions by ``residual_order``: 0 -> zero (plain compression), 1 -> ``ref``,
2 -> ``ref + decay * (ref - previous ref)``. Warmup steps and keyframes
(:class:`~compressed_comm.Keyframes`) send the tensor itself through the keyframe codec;
the schedule depends only on the step, so both sides know every payload size in advance
(:meth:`payload_nbytes`, from :class:`~compressed_comm.messages.MessageLayout`).

**Candidates** (``codec="auto"``): a stream holds one layout per candidate codec, and each
message goes through the one chosen for it (:meth:`_Stream.choose`); what a switch does to
references, keyframes and warm starts is in :mod:`compressed_comm.auto`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .codecs import Codec, IdentityCodec
from .codecs.base import as_2d, check_finite
from .config import SHARED_FIELDS, CompressionConfig
from .errors import StreamMismatchError, WireFormatError
from .kernels.torch_ref import FP32_MAX
from .messages import MessageLayout
from .wire import (
    FLAG_CONFIG,
    Header,
    check_dtype,
    contiguous_payload,
    expect,
    expect_position,
    pack_fingerprint,
    read_header,
    stream_tag,
    unpack_fingerprint,
    verify_checksum,
)

if TYPE_CHECKING:
    from .autopolicy import CodecMeter

__all__ = ["StreamEncoder", "StreamDecoder", "StreamStats", "StreamKey"]


@dataclass(frozen=True)
class StreamKey:
    """What a stream carries, as its caller named it.

    ``op`` is the operation (``"all_gather"``, ``"ring"``, ``"p2p"``, ``"all_to_all"``; ``""``
    for a stream made directly on a :class:`~compressed_comm.Session`), ``name`` the caller's
    stream name and ``dst`` the destination rank of point-to-point and all-to-all streams.
    The sending rank (the stream's origin) is kept beside the key. ``skip`` patterns match
    :attr:`name`; ``str(key)`` is the full name that stats and errors show
    (``"all_gather:layer7.k"``, ``"p2p:x->1"``).
    """

    op: str
    name: str
    dst: int | None = None

    def __str__(self) -> str:
        full = f"{self.op}:{self.name}" if self.op else self.name
        return full if self.dst is None else f"{full}->{self.dst}"

    @classmethod
    def of(cls, key: str | StreamKey) -> StreamKey:
        """``key`` itself, or the key of a stream a caller named ``key`` directly."""
        return key if isinstance(key, StreamKey) else cls("", key)


@dataclass(frozen=True)
class StreamStats:
    """Traffic and accuracy of one stream so far."""

    #: the full stream name (``str`` of its :class:`~compressed_comm.StreamKey`)
    name: str
    origin: int
    role: str
    codec: str
    steps: int
    raw_bytes: int
    wire_bytes: int
    reference_bytes: int
    #: ``||x - reference|| / ||x||`` of the last message (senders with ``track_error`` only)
    last_rel_error: float | None

    #: operation, caller's name and destination
    key: StreamKey | None = None
    #: with ``codec="auto"``: the last decision and every candidate's estimate (why)
    choice: str | None = None
    #: with ``codec="auto"``: seconds this sender spent shadow-encoding (the quality
    #: budget's check, :mod:`compressed_comm.auto`); 0 for receivers
    shadow_seconds: float = 0.0

    @property
    def ratio(self) -> float:
        """raw bytes / wire bytes (inf before the first message)."""
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else float("inf")


class _Stream:
    """State shared by both roles: the schedule, the references and the statistics."""

    role = "stream"

    def __init__(
        self,
        key: str | StreamKey,
        like: torch.Tensor,
        config: CompressionConfig | None = None,
        *,
        origin: int = 0,
        codec: Codec | None = None,
        session: int = 0,
        namespace: str = "",
        candidates: Sequence[Codec] | None = None,
        meter: CodecMeter | None = None,
    ) -> None:
        config = config or CompressionConfig()
        self.key = StreamKey.of(key)
        self.name = name = str(self.key)
        if not isinstance(like, torch.Tensor):
            raise TypeError(f"stream {name!r}: like must be a tensor, got {type(like).__name__}")
        check_dtype(like.dtype, f"stream {name!r}")
        self.origin = int(origin)
        self.shape = tuple(like.shape)
        self.dtype = like.dtype
        self.device = like.device
        self.tag = stream_tag(namespace + name, self.origin)
        self.session = int(session)
        # what is sent: every message's header and size (the first ends with the sender's
        # config fingerprint, checked by receivers)
        #: with candidates: each one's messages (the first lossy one is :attr:`layout`)
        self.layouts = {c.spec: MessageLayout.of(config, self.shape, self.dtype, codec=c,
                                                 tag=self.tag, session=self.session)
                        for c in candidates or ()}
        lossy = [la for la in self.layouts.values() if not la.codec.lossless]
        self.layout = (lossy or list(self.layouts.values()))[0] if self.layouts else \
            MessageLayout.of(config, self.shape, self.dtype, codec=codec, tag=self.tag,
                             session=self.session)
        if not self.layouts:
            self.layouts = {self.layout.codec.spec: self.layout}
        self.codec = self.layout.codec
        self.schedule = self.layout.schedule
        self._keyframe_codec = self.layout.keyframe_codec
        self.order = self.layout.fields["residual_order"]
        self.meter = meter if candidates else None
        # which candidate each message goes through, once chosen; later ones follow the last
        self._chosen: dict[int, str] = {}
        self._current = next(iter(self.layouts))
        self._max_payload: int | None = None
        self.decision: Any = None
        self.decay = float(config.decay)
        self.warmup_steps = self.schedule.warmup_steps
        self.check_finite = config.check_finite
        self.closed_loop = config.closed_loop
        self._config = config
        self._trailer = pack_fingerprint(config.fingerprint()).to(self.device)
        # state: reference (and the previous one for order 2), codec state, step counter
        self._ref = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        self._prev = torch.zeros_like(self._ref) if self.order == 2 else None
        self._states: dict[str, Any] = {s: la.codec.new_state()
                                        for s, la in self.layouts.items()}
        self._kernels = self.codec.kernels(self.device)
        self._step = 0
        # statistics
        self._raw_bytes = 0
        self._wire_bytes = 0
        self._shadow_seconds = 0.0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, origin={self.origin}, "
                f"shape={self.shape}, dtype={self.dtype}, codec={self.codec.spec!r}, "
                f"order={self.order}, step={self._step})")

    @property
    def _codec_state(self) -> Any:
        """The codec state of :attr:`codec` (e.g. lowrank's warm-start basis)."""
        return self._states[self.codec.spec]

    @property
    def candidates(self) -> tuple[str, ...]:
        """The codecs this stream may send through (one unless ``codec="auto"``)."""
        return tuple(self.layouts)

    def choose(self, spec: str, step: int, decision: Any = None) -> None:
        """Send message ``step`` through candidate ``spec``, unless a candidate was chosen
        for it already (its size may be announced): the first choice stands. Later messages
        follow it until another is chosen."""
        if spec not in self.layouts:
            raise ValueError(f"{self.what}: {spec!r} is not one of its candidates "
                             f"{', '.join(self.layouts)}")
        if step < self._step:
            raise ValueError(f"{self.what}: message {step} is already processed")
        self._current = self._chosen.setdefault(step, spec)
        if decision is not None:
            self.decision = decision

    def chosen(self, step: int) -> str:
        """The candidate message ``step`` goes through."""
        return self._chosen.get(step, self._current)

    def layout_at(self, step: int) -> MessageLayout:
        """The layout of message ``step`` (its chosen candidate's)."""
        return self.layouts[self.chosen(step)]

    @property
    def what(self) -> str:
        return f"stream {self.name!r} (origin {self.origin})"

    @property
    def step(self) -> int:
        """Number of messages this stream has processed (the next message's sequence number)."""
        return self._step

    @property
    def reference(self) -> torch.Tensor:
        """The current reconstruction, shared bit for bit by sender and receivers.

        Updated in place by the next message: clone it to keep it.
        """
        return self._ref

    def is_keyframe(self, step: int) -> bool:
        """Whether message ``step`` sends the whole tensor (through the keyframe codec, or
        raw where raw is chosen)."""
        layout = self.layout_at(step)
        return layout.schedule.is_keyframe(step) or layout.codec.lossless and self.order > 0

    def spread_rows(self, step: int) -> tuple[int, int] | None:
        """Rows ``(lo, hi)`` of the tensor viewed ``(N, C)`` that message ``step`` sends as
        its slice of a spread keyframe (the other rows go as residuals); None if the
        message is not such a slice."""
        return self.layout_at(step).slice_rows(step)

    def header(self, step: int | None = None) -> Header:
        """The header of message ``step`` (default: the next one)."""
        step = self._step if step is None else step
        return self.layout_at(step).header(step)

    def payload_nbytes(self, step: int | None = None) -> int:
        """Size of the payload of message ``step`` (default: the next one)."""
        return self.header(step).payload_nbytes

    def max_payload_nbytes(self) -> int:
        """The largest payload any message of this stream can have (keyframe or not), or
        that a sender of another config sending it raw would (another ``min_bytes``,
        ``skip`` or keyframe codec): a receive buffer of this size takes such a message,
        whose header then names the difference. Fixed for the stream's life: computed once
        (a receive is sized by it every step)."""
        if self._max_payload is None:
            self._max_payload = max(la.max_payload_nbytes(IdentityCodec("identity"))
                                    for la in self.layouts.values())
        return self._max_payload

    @property
    def reference_bytes(self) -> int:
        """Device memory held by this stream's references."""
        total = self._ref.nbytes + (self._prev.nbytes if self._prev is not None else 0)
        return total + sum(getattr(st, "nbytes", 0) for st in self._states.values())

    def stats(self) -> StreamStats:
        auto = len(self.layouts) > 1
        return StreamStats(name=self.name, key=self.key, origin=self.origin, role=self.role,
                           codec=f"auto:{self._current}" if auto else self.codec.spec,
                           steps=self._step, raw_bytes=self._raw_bytes,
                           wire_bytes=self._wire_bytes, reference_bytes=self.reference_bytes,
                           last_rel_error=self._last_error(),
                           choice=None if self.decision is None else self.decision.explain(),
                           shadow_seconds=self._shadow_seconds)

    def _last_error(self) -> float | None:
        return None

    # ------------------------------------------------------------------ the update

    def _begin(self) -> tuple[torch.Tensor | None, torch.Tensor, Codec]:
        """Prediction, output buffer and codec for the next message."""
        layout = self.layout_at(self._step)
        keyframe = self.is_keyframe(self._step)
        codec = layout.codec_at(self._step)
        if self.order == 2:
            target = self._prev
            if not keyframe:
                self._extrapolate(target)
            return (None if keyframe else target), target, codec
        if keyframe or self.order == 0:
            return None, self._ref, codec
        return self._ref, self._ref, codec

    def _extrapolate(self, out: torch.Tensor) -> None:
        """``out <- ref + decay * (ref - prev)`` (order 2's prediction; ``out`` may be
        ``prev``), saturated so that finite references never extrapolate to Inf (or NaN for
        decay 0)."""
        ref = self._ref.float()
        delta = (ref - self._prev.float()).clamp_(-FP32_MAX, FP32_MAX)
        big = torch.finfo(self.dtype).max
        out.copy_(delta.mul_(self.decay).add_(ref).clamp_(-big, big))

    def prediction(self) -> torch.Tensor | None:
        """A new tensor holding the prediction of the next residual message (None for
        order 0, which compresses the tensor itself); the stream is untouched."""
        if self.order == 0:
            return None
        if self.order == 1:
            return self._ref.clone()
        out = torch.empty_like(self._ref)
        self._extrapolate(out)
        return out

    def _finish(self) -> None:
        self._chosen.pop(self._step, None)
        if self.order == 2:
            self._ref, self._prev = self._prev, self._ref
            if self._step == 0:
                self._prev.copy_(self._ref)  # no history yet: the last delta is zero
        self._step += 1
        self._raw_bytes += self._ref.nbytes


class StreamEncoder(_Stream):
    """The sending half of a residual stream.

    ``StreamEncoder(name, like, config, origin=rank)``: ``like`` fixes shape, dtype and
    device. Every :meth:`encode` returns the next payload and updates :attr:`reference` to
    what the receivers will reconstruct.
    """

    role = "encoder"

    def __init__(self, key: str | StreamKey, like: torch.Tensor,
                 config: CompressionConfig | None = None, *, origin: int = 0,
                 codec: Codec | None = None, session: int = 0, namespace: str = "",
                 candidates: Sequence[Codec] | None = None,
                 meter: CodecMeter | None = None) -> None:
        super().__init__(key, like, config, origin=origin, codec=codec, session=session,
                         namespace=namespace, candidates=candidates, meter=meter)
        self.track_error = (config or CompressionConfig()).track_error
        self._err: torch.Tensor | None = None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Compress the next value of this stream into a payload.

        NaN/Inf in ``x`` raise :class:`~compressed_comm.NonFiniteError` here, before the
        stream changes (``check_finite``, found in the pass that computes the codec's scales).
        """
        x = self._check_input(x)
        what = f"{self.what}: input at step {self._step}"
        check = what if self.check_finite else None
        rows = self.spread_rows(self._step)
        # checked up front where the stream changes before the codec's own pass would find
        # a NaN: order 2 predicts in place, and a spread keyframe's slices go one by one
        if check is not None and (self.order == 2 or rows is not None):
            check_finite(x, what, self._kernels)
            check = None
        if self.meter is not None and self.meter.due():
            self.meter.probe(self, x)
        if (self.meter is not None and self._step >= self.warmup_steps
                and self.meter.shadow_due()):  # references hold history: residuals to check
            if check is not None:  # before the shadow codecs see it
                check_finite(x, what, self._kernels)
                check = None
            start = time.perf_counter()
            self.meter.shadow(self, x)
            self._shadow_seconds += time.perf_counter() - start
        header = self.header()
        layout = self.layout_at(self._step)
        pred, target, codec = self._begin()
        start = time.perf_counter()
        if rows is not None:
            payload = layout.emit_spread(
                x, header, self._step, rows, pred, target,
                self._trailer if self._step == 0 else None)
        else:
            state = self._states[codec.spec] if codec is layout.codec else None
            payload = codec.emit(as_2d(x), self.shape, None if pred is None else as_2d(pred),
                                 as_2d(target), header, state, check=check,
                                 trailer=self._trailer if self._step == 0 else None)
            if self.meter is not None:
                self.meter.codec_time(codec.spec, "encode", time.perf_counter() - start,
                                      x.nbytes)
        if self.track_error:
            self._err = self._kernels.error_norms(x, target)
        if not self.closed_loop:
            target.copy_(x)
        self._wire_bytes += payload.numel()
        self._finish()
        return payload

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.what}: encode expects a tensor, got {type(x).__name__}")
        if tuple(x.shape) != self.shape or x.dtype != self.dtype or x.device != self.device:
            raise StreamMismatchError(
                f"{self.what} was created for shape {self.shape}, dtype {self.dtype} on "
                f"{self.device}; got shape {tuple(x.shape)}, dtype {x.dtype} on {x.device}"
            )
        return x.detach()

    def _last_error(self) -> float | None:
        return None if self._err is None else float(self._err)


class StreamDecoder(_Stream):
    """The receiving half of a residual stream.

    ``StreamDecoder(name, like, config, origin=sender_rank)`` with the same name, origin,
    shape, dtype and config as the sender's :class:`StreamEncoder`. Every :meth:`decode`
    takes the next payload (in order) and returns the updated :attr:`reference`.
    """

    role = "decoder"
    _broken: str | None = None
    _announced = 0

    @property
    def expected(self) -> int:
        """The step of the next message no receive is posted for yet (:meth:`announce`):
        messages in flight, not yet decoded, count."""
        return max(self._step, self._announced)

    def announce(self) -> None:
        """A receive of message :attr:`expected` is posted (to be decoded later)."""
        self._announced = self.expected + 1

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        """Apply the next payload; returns :attr:`reference` (updated in place)."""
        if isinstance(payload, torch.Tensor) and payload.device != self.device:
            raise StreamMismatchError(
                f"{self.what}: payload is on {payload.device}; the stream lives on {self.device}"
            )
        try:
            header = read_header(payload)
        except WireFormatError as e:
            raise WireFormatError(f"{self.what}: {e}") from None
        payload = contiguous_payload(payload)
        expected = self.header()
        expect_position(header, expected, self.what)
        verify_checksum(payload, header, self.what)  # before any field of the body is read
        differ: list[str] = []
        if (header.flags & expected.flags & FLAG_CONFIG
                and header.body_nbytes >= self._trailer.numel()):
            differ = self._config.differences(unpack_fingerprint(payload, len(SHARED_FIELDS)))
        expect(header, expected, self.what, differ)
        if self._broken is not None:
            raise WireFormatError(f"{self.what}: {self._broken}; start a new session")
        rows = self.spread_rows(self._step)
        layout = self.layout_at(self._step)
        parts = None if rows is None else layout.split_spread(
            payload, header, self._step, rows, self.what)
        pred, target, codec = self._begin()
        start = time.perf_counter()
        try:
            if parts is None:
                codec.absorb(payload, header, pred, target)
                if self.meter is not None:
                    self.meter.codec_time(codec.spec, "decode", time.perf_counter() - start,
                                          target.nbytes)
            else:
                layout.absorb_spread(parts, pred, target)
        except WireFormatError as e:  # a body the codec rejects (e.g. a corrupt top-k index)
            if self.order == 2 or parts is not None:  # the reference is already changed
                self._broken = f"out of step with its sender since step {self._step} ({e})"
            raise WireFormatError(f"{self.what}: {e}") from None
        self._wire_bytes += payload.numel()
        self._finish()
        return self._ref
