"""Closed-loop residual streams: the sender and receiver halves of one flow of activations.

A stream carries one logical tensor (say, layer 7's keys from rank 2) across denoising
steps. At step ``t`` both sides hold the same *reference* ``ref`` (the last
reconstruction). The sender predicts ``p`` from it, sends ``C(x - p)`` and both sides set
``ref = p + decode(C(x - p))`` with the same arithmetic, so the references stay
bit-identical and each step's quantisation error ``x - ref`` is carried into the next
residual (error feedback).

Predictions by ``residual_order``: 0 -> zero (plain compression), 1 -> ``ref``,
2 -> ``ref + decay * (ref - previous ref)``. Steps ``t < warmup_steps`` and, if
``keyframe_period > 0``, steps with ``t % keyframe_period == 0`` are keyframes: the tensor
itself, through the keyframe codec (lossless by default). With ``keyframe_spread = K > 1``
a periodic keyframe is sent in ``K`` row slices instead: step ``t`` with ``t %
keyframe_period = j < K`` sends slice ``j`` of the rows as a keyframe and the other rows
as residuals. The schedule depends only on ``t``, so both sides know every payload size
in advance (:meth:`payload_nbytes`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .codecs import Codec, IdentityCodec, get_codec
from .codecs.base import _nc, as_2d, check_finite
from .config import CompressionConfig
from .kernels.torch_ref import FP32_MAX
from .errors import StaleMessageError, StreamMismatchError, StreamOrderError, WireFormatError
from .config import SHARED_FIELDS
from .wire import (ALIGN, CONFIG_FIELDS, FLAG_CHECKSUM, FLAG_CONFIG, FLAG_KEYFRAME, FLAG_SPREAD,
                   Header, check_dtype, contiguous_payload, pack_fingerprint, read_header,
                   stream_tag, unpack_fingerprint, verify_checksum)

__all__ = ["StreamEncoder", "StreamDecoder", "StreamStats"]


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

    #: operation, caller's name and destination (:class:`~compressed_comm.StreamKey`)
    key: Any = None

    @property
    def ratio(self) -> float:
        """raw bytes / wire bytes (inf before the first message)."""
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else float("inf")


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class _Stream:
    """State shared by both roles: the schedule, the references and the statistics."""

    role = "stream"

    def __init__(
        self,
        name: str,
        like: torch.Tensor,
        config: CompressionConfig | None = None,
        *,
        origin: int = 0,
        codec: Codec | None = None,
        session: int = 0,
        namespace: str = "",
    ) -> None:
        config = config or CompressionConfig()
        if not isinstance(like, torch.Tensor):
            raise TypeError(f"stream {name!r}: like must be a tensor, got {type(like).__name__}")
        check_dtype(like.dtype, f"stream {name!r}")
        # identity (a Session also sets .key, the StreamKey the name was made from)
        self.name = name
        self.key: Any = None
        self.origin = int(origin)
        self.shape = tuple(like.shape)
        self.dtype = like.dtype
        self.device = like.device
        self.tag = stream_tag(namespace + name, self.origin)
        self.session = int(session)
        # what is sent
        self.codec = codec if codec is not None else get_codec(config.codec, kernels=config.kernels)
        self.order = 0 if self.codec.lossless else config.residual_order
        self.decay = float(config.decay)
        self.warmup_steps = 0 if self.codec.lossless else config.warmup_steps
        self.keyframe_period = 0 if self.codec.lossless else config.keyframe_period
        self.keyframe_spread = 1 if self.codec.lossless else config.keyframe_spread
        self.check_finite = config.check_finite
        self.closed_loop = config.closed_loop
        self.checksum = config.checksum
        # the first message ends with the sender's config fingerprint, checked by receivers
        self._config = config
        self._trailer = pack_fingerprint(config.fingerprint()).to(self.device)
        self._keyframe_codec: Codec = (
            IdentityCodec("identity") if self.codec.lossless or config.keyframe_codec == "identity"
            else get_codec(config.keyframe_codec, kernels=config.kernels))
        # state: reference (and the previous one for order 2), codec state, step counter
        self._ref = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        self._prev = torch.zeros_like(self._ref) if self.order == 2 else None
        self._codec_state: Any = self.codec.new_state()
        self._kernels = self.codec.kernels(self.device)
        self._step = 0
        # statistics
        self._raw_bytes = 0
        self._wire_bytes = 0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, origin={self.origin}, "
                f"shape={self.shape}, dtype={self.dtype}, codec={self.codec.spec!r}, "
                f"order={self.order}, step={self._step})")

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
        """Whether message ``step`` sends the whole tensor through the keyframe codec."""
        if step < self.warmup_steps:
            return True
        return (self.keyframe_period > 0 and self.keyframe_spread == 1
                and step % self.keyframe_period == 0)

    def spread_rows(self, step: int) -> tuple[int, int] | None:
        """Rows ``(lo, hi)`` of the tensor viewed ``(N, C)`` that message ``step`` sends as
        its slice of a spread keyframe (the other rows go as residuals); None if the
        message is not such a slice."""
        k = self.keyframe_spread
        j = step % self.keyframe_period if k > 1 else k
        if j >= k or step - j < self.warmup_steps:  # not in a keyframe after the warmup
            return None
        n = _nc(self.shape)[0]
        return j * n // k, (j + 1) * n // k

    def _fields(self, step: int, flags: int) -> dict[str, Any]:
        return dict(seq=step & 0xFFFFFFFF, tag=self.tag, flags=flags,
                    session=self.session & 0xFFFFFFFF, residual_order=self.order,
                    closed_loop=self.closed_loop, warmup_steps=self.warmup_steps,
                    keyframe_period=self.keyframe_period,
                    decay=self.decay if self.order == 2 else 0.0)

    def _parts(self, step: int, lo: int, hi: int) -> list[tuple[int, int, Codec, Header]]:
        """The row blocks of a spread keyframe's message: ``(start, end, codec, header)``
        of the rows before the slice, the slice (keyframe codec) and the rows after."""
        n, c = _nc(self.shape)
        blocks = ((0, lo, self.codec, 0), (lo, hi, self._keyframe_codec, FLAG_KEYFRAME),
                  (hi, n, self.codec, 0))
        return [(a, b, codec, codec.header((b - a, c), self.dtype, **self._fields(step, flags)))
                for a, b, codec, flags in blocks if b > a]

    def header(self, step: int | None = None) -> Header:
        """The header of message ``step`` (default: the next one)."""
        step = self._step if step is None else step
        flags = (FLAG_CHECKSUM if self.checksum else 0) | (FLAG_CONFIG if step == 0 else 0)
        trailer = self._trailer.numel() if step == 0 else 0
        rows = self.spread_rows(step)
        if rows is not None:
            body = sum(_aligned(h.payload_nbytes) for *_, h in self._parts(step, *rows))
            outer = self.codec.header(self.shape, self.dtype,
                                      **self._fields(step, FLAG_SPREAD | flags))
            return dataclasses.replace(outer, body_nbytes=body + trailer)
        keyframe = self.is_keyframe(step)
        codec = self._keyframe_codec if keyframe else self.codec
        header = codec.header(self.shape, self.dtype,
                              **self._fields(step, (FLAG_KEYFRAME if keyframe else 0) | flags))
        return dataclasses.replace(header, body_nbytes=header.body_nbytes + trailer) \
            if trailer else header

    def payload_nbytes(self, step: int | None = None) -> int:
        """Size of the payload of message ``step`` (default: the next one)."""
        return self.header(step).payload_nbytes

    def max_payload_nbytes(self) -> int:
        """The largest payload any message of this stream can have (keyframe or not), or
        that a sender of another config sending it raw would (another ``min_bytes``,
        ``skip`` or keyframe codec): a receive buffer of this size takes such a message,
        whose header then names the difference."""
        raw = IdentityCodec("identity").payload_nbytes(self.shape, self.dtype)
        sizes = [c.payload_nbytes(self.shape, self.dtype)
                 for c in (self.codec, self._keyframe_codec)]
        sizes += [self.payload_nbytes(0), raw + self._trailer.numel()]
        if self.keyframe_spread > 1:  # every slice of the first spread keyframe
            first = -(-self.warmup_steps // self.keyframe_period) * self.keyframe_period
            sizes += [self.payload_nbytes(first + j) for j in range(self.keyframe_spread)]
        return max(sizes)

    @property
    def reference_bytes(self) -> int:
        """Device memory held by this stream's references."""
        total = self._ref.nbytes + (self._prev.nbytes if self._prev is not None else 0)
        return total + getattr(self._codec_state, "nbytes", 0)  # a codec's own state

    def stats(self) -> StreamStats:
        return StreamStats(name=self.name, key=self.key, origin=self.origin, role=self.role,
                           codec=self.codec.spec, steps=self._step, raw_bytes=self._raw_bytes,
                           wire_bytes=self._wire_bytes, reference_bytes=self.reference_bytes,
                           last_rel_error=self._last_error())

    def _last_error(self) -> float | None:
        return None

    # ------------------------------------------------------------------ the update

    def _begin(self) -> tuple[torch.Tensor | None, torch.Tensor, Codec]:
        """Prediction, output buffer and codec for the next message."""
        keyframe = self.is_keyframe(self._step)
        codec = self._keyframe_codec if keyframe else self.codec
        if self.order == 2:
            target = self._prev
            if not keyframe:
                # prev <- ref + decay * (ref - prev), elementwise in place, saturated so that
                # finite references never extrapolate to Inf (or NaN for decay 0)
                ref = self._ref.float()
                delta = (ref - target.float()).clamp_(-FP32_MAX, FP32_MAX)
                big = torch.finfo(self.dtype).max
                target.copy_(delta.mul_(self.decay).add_(ref).clamp_(-big, big))
            return (None if keyframe else target), target, codec
        if keyframe or self.order == 0:
            return None, self._ref, codec
        return self._ref, self._ref, codec

    def _finish(self) -> None:
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

    def __init__(self, name: str, like: torch.Tensor, config: CompressionConfig | None = None,
                 *, origin: int = 0, codec: Codec | None = None, session: int = 0,
                 namespace: str = "") -> None:
        super().__init__(name, like, config, origin=origin, codec=codec, session=session,
                         namespace=namespace)
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
        header = self.header()
        pred, target, codec = self._begin()
        if rows is not None:
            payload = self._emit_spread(x, header, rows, pred, target)
        else:
            state = self._codec_state if codec is self.codec else None
            payload = codec.emit(as_2d(x), self.shape, None if pred is None else as_2d(pred),
                                 as_2d(target), header, state, check=check,
                                 trailer=self._trailer if self._step == 0 else None)
        if self.track_error:
            self._err = self._kernels.error_norms(x, target)
        if not self.closed_loop:
            target.copy_(x)
        self._wire_bytes += payload.numel()
        self._finish()
        return payload

    def _emit_spread(self, x: torch.Tensor, header: Header, rows: tuple[int, int],
                     pred: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
        """The payload of a spread keyframe's slice: one sub-payload per row block."""
        n, c = _nc(self.shape)
        x2, t2 = as_2d(x), target.view(n, c)
        p2 = None if pred is None else pred.view(n, c)
        payload = torch.zeros(header.payload_nbytes, dtype=torch.uint8, device=x.device)
        header.write(payload)
        offset = header.nbytes
        for a, b, codec, sub in self._parts(self._step, *rows):
            part = codec.emit(x2[a:b], (b - a, c), None if sub.keyframe or p2 is None
                              else p2[a:b], t2[a:b], sub)
            payload[offset:offset + part.numel()] = part
            offset += _aligned(part.numel())
        if self._step == 0:
            payload[payload.numel() - self._trailer.numel():].copy_(self._trailer)
        header.seal(payload)
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
        if header.tag != expected.tag:
            raise WireFormatError(
                f"{self.what}: payload belongs to another stream (tag {header.tag:#010x}, "
                f"expected {expected.tag:#010x})"
            )
        if header.session != expected.session:
            raise StaleMessageError(
                f"{self.what}: payload belongs to session {header.session}, this is session "
                f"{expected.session} (a message of an earlier or later request; discarded)"
            )
        if header.seq != expected.seq:
            kind = "missed" if header.seq > expected.seq else "repeated or stale"
            raise StreamOrderError(
                f"{self.what}: expected the payload of step {expected.seq}, got step "
                f"{header.seq} (a {kind} message)"
            )
        verify_checksum(payload, header, self.what)  # before any field of the body is read
        bad = header.mismatches(expected)
        config = [b for b in bad if b.split("=")[0] in CONFIG_FIELDS]
        if (header.flags ^ expected.flags) & FLAG_SPREAD:
            config.append(f"keyframe_spread (step {expected.seq} is "
                          f"{'' if expected.flags & FLAG_SPREAD else 'not '}a slice of a "
                          "spread keyframe here)")
        if (header.flags & expected.flags & FLAG_CONFIG
                and header.body_nbytes >= self._trailer.numel()):
            differ = self._config.differences(unpack_fingerprint(payload, len(SHARED_FIELDS)))
            if differ:  # named by the sender's fingerprint, with the values the header shows
                related = set(differ) | ({"codec_id", "param"} if {
                    "codec", "keyframe_codec", "min_bytes", "skip"} & set(differ) else set()) | (
                    {"flags"} if {"checksum", "keyframe_spread"} & set(differ) else set())
                shown = [b for b in bad if b.split("=")[0] in related]
                raise WireFormatError(
                    f"{self.what}: the sender's CompressionConfig differs from this rank's in "
                    f"{', '.join(differ)}" + (f" ({', '.join(shown)})" if shown else "")
                    + "; every rank must use the same config")
        if config:
            raise WireFormatError(
                f"{self.what}: the sender's CompressionConfig differs from this rank's: "
                f"{', '.join(config)}; every rank must use the same config"
            )
        if bad:
            raise WireFormatError(f"{self.what}: payload does not match the stream: {', '.join(bad)}")
        if self._broken is not None:
            raise WireFormatError(f"{self.what}: {self._broken}; start a new session")
        rows = self.spread_rows(self._step)
        parts = None if rows is None else self._spread_parts(payload, header, rows)
        pred, target, codec = self._begin()
        try:
            if parts is None:
                codec.absorb(payload, header, pred, target)
            else:
                self._absorb_spread(parts, pred, target)
        except WireFormatError as e:  # a body the codec rejects (e.g. a corrupt top-k index)
            if self.order == 2 or parts is not None:  # the reference is already changed
                self._broken = f"out of step with its sender since step {self._step} ({e})"
            raise WireFormatError(f"{self.what}: {e}") from None
        self._wire_bytes += payload.numel()
        self._finish()
        return self._ref

    def _spread_parts(self, payload: torch.Tensor, header: Header, rows: tuple[int, int]
                      ) -> list[tuple[int, int, Codec, Header, torch.Tensor]]:
        """The validated sub-payloads of a spread keyframe's slice (before any is applied)."""
        parts, offset = [], header.nbytes
        for a, b, codec, sub in self._parts(self._step, *rows):
            part = payload[offset:offset + sub.payload_nbytes]
            try:
                bad = read_header(part).mismatches(sub)
            except WireFormatError as e:
                bad = [str(e)]
            if bad:
                raise WireFormatError(f"{self.what}: rows {a}:{b} of the spread keyframe at step "
                                      f"{self._step}: {', '.join(bad)}")
            parts.append((a, b, codec, sub, part))
            offset += _aligned(sub.payload_nbytes)
        return parts

    def _absorb_spread(self, parts: list[tuple[int, int, Codec, Header, torch.Tensor]],
                       pred: torch.Tensor | None, target: torch.Tensor) -> None:
        n, c = _nc(self.shape)
        t2 = target.view(n, c)
        p2 = None if pred is None else pred.view(n, c)
        for a, b, codec, sub, part in parts:
            codec.absorb(part, sub, None if sub.keyframe or p2 is None else p2[a:b], t2[a:b])
