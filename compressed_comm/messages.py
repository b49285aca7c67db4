"""What each message of a stream is on the wire: its header and size from the step alone,
and the framing of a spread keyframe's slice.

A slice of a spread keyframe (flag bit 2) carries, as its body, complete payloads of the row
blocks before the slice (residuals), of the slice (the keyframe codec) and of the rows after
it (residuals), each 8-byte aligned. :class:`MessageLayout` is pure: the stream uses it to
write and check headers, the what-if to size messages without a stream.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .codecs import Codec, IdentityCodec, get_codec
from .codecs.base import _nc, as_2d
from .config import CompressionConfig
from .errors import WireFormatError
from .keyframes import KeyframeSchedule
from .wire import (ALIGN, FLAG_CHECKSUM, FLAG_CONFIG, FLAG_KEYFRAME, FLAG_SPREAD, Header,
                   pack_fingerprint, read_header)

__all__ = ["MessageLayout", "Part"]


def aligned(n: int) -> int:
    """``n`` rounded up to the wire's alignment."""
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Part:
    """One row block ``rows[0]:rows[1]`` of a spread keyframe's message."""

    lo: int
    hi: int
    codec: Codec
    header: Header


@dataclass(frozen=True)
class MessageLayout:
    """Headers and sizes of a stream's messages.

    ``fields`` are the header fields every message of the stream shares (tag, session,
    residual order, ...); ``trailer_nbytes`` the config fingerprint the first message ends
    with; ``checksum`` whether bodies carry a CRC-32.
    """

    codec: Codec
    keyframe_codec: Codec
    schedule: KeyframeSchedule
    shape: tuple[int, ...]
    dtype: torch.dtype
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    trailer_nbytes: int = 0
    checksum: bool = False

    @classmethod
    def of(cls, config: CompressionConfig, shape: tuple[int, ...], dtype: torch.dtype, *,
           codec: Codec | None = None, tag: int = 0, session: int = 0) -> MessageLayout:
        """The messages of a stream of ``config`` carrying ``shape`` and ``dtype`` tensors
        through ``codec`` (default: ``config.codec``; a lossless codec sends no keyframes
        and no residuals), named by ``tag`` in ``session``."""
        if codec is None and config.auto:
            raise ValueError(f"codec={config.codec!r} has a layout per candidate: pass codec= "
                             f"one of {', '.join(config.candidates)}")
        codec = codec if codec is not None else get_codec(config.codec, kernels=config.kernels)
        keyframes = config.keyframes
        lossless = codec.lossless
        schedule = KeyframeSchedule() if lossless else KeyframeSchedule(
            config.warmup_steps, keyframes.period, keyframes.spread)
        order = 0 if lossless else config.residual_order
        return cls(
            codec,
            IdentityCodec("identity") if lossless or keyframes.codec == "identity"
            else get_codec(keyframes.codec, kernels=config.kernels),
            schedule, tuple(shape), dtype,
            fields=dict(tag=tag, session=session & 0xFFFFFFFF, residual_order=order,
                        closed_loop=config.closed_loop, warmup_steps=schedule.warmup_steps,
                        keyframe_period=schedule.period,
                        decay=float(config.decay) if order == 2 else 0.0),
            trailer_nbytes=pack_fingerprint(config.fingerprint()).numel(),
            checksum=config.checksum)

    def codec_at(self, step: int) -> Codec:
        """The codec of message ``step`` (a spread slice's outer codec is the stream's)."""
        return self.keyframe_codec if self.schedule.is_keyframe(step) else self.codec

    def slice_rows(self, step: int) -> tuple[int, int] | None:
        """Rows of the tensor viewed ``(N, C)`` that message ``step`` sends as a spread
        keyframe's slice; None if it is not one."""
        return self.schedule.slice_rows(step, _nc(self.shape)[0])

    def _header(self, codec: Codec, shape: tuple[int, ...], step: int, flags: int) -> Header:
        return codec.header(shape, self.dtype, seq=step & 0xFFFFFFFF, flags=flags, **self.fields)

    def parts(self, step: int, rows: tuple[int, int]) -> list[Part]:
        """The row blocks of the spread keyframe's slice ``rows`` at ``step``."""
        n, c = _nc(self.shape)
        lo, hi = rows
        blocks = ((0, lo, self.codec, 0), (lo, hi, self.keyframe_codec, FLAG_KEYFRAME),
                  (hi, n, self.codec, 0))
        return [Part(a, b, codec, self._header(codec, (b - a, c), step, flags))
                for a, b, codec, flags in blocks if b > a]

    def header(self, step: int) -> Header:
        """The header of message ``step``."""
        flags = (FLAG_CHECKSUM if self.checksum else 0) | (FLAG_CONFIG if step == 0 else 0)
        trailer = self.trailer_nbytes if step == 0 else 0
        rows = self.slice_rows(step)
        if rows is not None:
            body = sum(aligned(p.header.payload_nbytes) for p in self.parts(step, rows))
            outer = self._header(self.codec, self.shape, step, FLAG_SPREAD | flags)
            return dataclasses.replace(outer, body_nbytes=body + trailer)
        keyframe = self.schedule.is_keyframe(step)
        header = self._header(self.codec_at(step), self.shape, step,
                              (FLAG_KEYFRAME if keyframe else 0) | flags)
        return dataclasses.replace(header, body_nbytes=header.body_nbytes + trailer) \
            if trailer else header

    def payload_nbytes(self, step: int) -> int:
        """Size of the payload of message ``step``."""
        return self.header(step).payload_nbytes

    def max_payload_nbytes(self, raw: Codec) -> int:
        """The largest payload any message can have, or that a sender of another config
        sending the stream through ``raw`` would."""
        sizes = [c.payload_nbytes(self.shape, self.dtype) for c in (self.codec,
                                                                     self.keyframe_codec)]
        sizes += [self.payload_nbytes(0),
                  raw.payload_nbytes(self.shape, self.dtype) + self.trailer_nbytes]
        sizes += [self.payload_nbytes(t) for t in self.schedule.first_spread_steps()]
        return max(sizes)

    # ------------------------------------------------------------------ spread slices

    def emit_spread(self, x: torch.Tensor, header: Header, step: int, rows: tuple[int, int],
                    pred: torch.Tensor | None, target: torch.Tensor,
                    trailer: torch.Tensor | None) -> torch.Tensor:
        """The payload of a spread keyframe's slice: one sub-payload per row block, each
        updating its rows of ``target``."""
        n, c = _nc(self.shape)
        x2, t2 = as_2d(x), target.view(n, c)
        p2 = None if pred is None else pred.view(n, c)
        payload = torch.zeros(header.payload_nbytes, dtype=torch.uint8, device=x.device)
        header.write(payload)
        offset = header.nbytes
        for p in self.parts(step, rows):
            sub = p.codec.emit(x2[p.lo:p.hi], (p.hi - p.lo, c), None if p.header.keyframe
                               or p2 is None else p2[p.lo:p.hi], t2[p.lo:p.hi], p.header)
            payload[offset:offset + sub.numel()] = sub
            offset += aligned(sub.numel())
        if trailer is not None:
            payload[payload.numel() - trailer.numel():].copy_(trailer)
        header.seal(payload)
        return payload

    def split_spread(self, payload: torch.Tensor, header: Header, step: int,
                     rows: tuple[int, int], what: str) -> list[tuple[Part, torch.Tensor]]:
        """The validated sub-payloads of a spread keyframe's slice (before any is applied)."""
        out, offset = [], header.nbytes
        for p in self.parts(step, rows):
            sub = payload[offset:offset + p.header.payload_nbytes]
            try:
                bad = read_header(sub).mismatches(p.header)
            except WireFormatError as e:
                bad = [str(e)]
            if bad:
                raise WireFormatError(f"{what}: rows {p.lo}:{p.hi} of the spread keyframe at "
                                      f"step {step}: {', '.join(bad)}")
            out.append((p, sub))
            offset += aligned(p.header.payload_nbytes)
        return out

    def absorb_spread(self, parts: list[tuple[Part, torch.Tensor]],
                      pred: torch.Tensor | None, target: torch.Tensor) -> None:
        """Apply the sub-payloads of :meth:`split_spread` to their rows of ``target``."""
        n, c = _nc(self.shape)
        t2 = target.view(n, c)
        p2 = None if pred is None else pred.view(n, c)
        for p, sub in parts:
            p.codec.absorb(sub, p.header, None if p.header.keyframe or p2 is None
                           else p2[p.lo:p.hi], t2[p.lo:p.hi])
