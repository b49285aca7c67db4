"""Framing: how a group turns one rank's tensor into the bytes a transfer carries, and the
bytes it receives back into a tensor -- the one thing the raw and the compressed groups do
differently. The collectives themselves (:mod:`compressed_comm.group.collectives`) are
written once, over a :class:`Framing`.

* :class:`RawFraming` -- the tensor's own bytes; nothing is kept between calls.
* :class:`CompressedFraming` -- a payload of the residual stream the transfer belongs to
  (:class:`~compressed_comm.Session`): the sender encodes against its reference, the
  receiver decodes into the reference it shares with the sender.

Sizes are known before anything moves: an :class:`Outgoing` says how many bytes it will
send, an :class:`Incoming` how many it expects (and how much room a receive needs where the
transport takes messages shorter than the buffer).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch

from ..session import Session, StreamKey
from ..stream import StreamDecoder, StreamEncoder
from ..wire import announced_payload, read_status, status_frame

__all__ = ["Framing", "Outgoing", "Incoming", "RawFraming", "CompressedFraming", "as_bytes",
           "template"]


def template(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-memory tensor of ``shape``, ``dtype`` and ``device``: what a stream is made for."""
    return torch.empty((), dtype=dtype, device=device).expand(tuple(shape))


def as_bytes(x: torch.Tensor) -> torch.Tensor:
    """The bytes of ``x`` as a flat uint8 tensor (a view if ``x`` is contiguous)."""
    return x.contiguous().view(-1).view(torch.uint8)


class Outgoing(ABC):
    """What this rank sends in one transfer."""

    #: bytes the payload will have
    nbytes: int
    #: the stream's message number (0 for raw transfers)
    step: int = 0

    @abstractmethod
    def payload(self) -> torch.Tensor:
        """The bytes to send (a 1-D uint8 tensor of :attr:`nbytes`); compressed streams
        encode here, so call it once the transfer is agreed."""


class Incoming(ABC):
    """What this rank receives from one origin in one transfer."""

    #: bytes the payload is expected to have
    nbytes: int
    #: bytes a receive buffer gets where the transport takes shorter messages: room for an
    #: unexpected message, whose header then says what is wrong
    room: int

    @abstractmethod
    def take(self, buf: torch.Tensor, exact: bool = True) -> torch.Tensor:
        """The tensor the received bytes ``buf`` hold: :attr:`nbytes` of them, or (not
        ``exact``) a message of at most :attr:`room` bytes at its start."""

    def posted(self) -> None:
        """The receive is posted: the stream's next transfer is the message after it."""


class Framing(ABC):
    """How the tensors of a group's transfers become bytes (see the module docstring)."""

    @abstractmethod
    def sender(self, name: StreamKey, x: torch.Tensor) -> Outgoing:
        """The transfer of ``x`` on stream ``name`` from this rank."""

    @abstractmethod
    def receiver(self, name: StreamKey, origin: int, like: torch.Tensor) -> Incoming:
        """The next transfer on stream ``name`` from ``origin`` of a tensor shaped like
        ``like`` (earlier ones posted and still in flight count)."""

    def fits(self, name: StreamKey, origin: int, like: torch.Tensor) -> bool:
        """Whether stream ``(name, origin)`` can carry ``like`` without being renewed."""
        return True

    def expect(self, name: StreamKey, shapes: Sequence[Sequence[int]]) -> None:
        """An all-gather or ring pass on ``name`` carries ``shapes`` (by origin)."""

    def reconstruction(self, name: StreamKey, x: torch.Tensor) -> torch.Tensor:
        """What the receivers of this rank's last message ``x`` on ``name`` hold."""
        return x

    def status(self, buf: torch.Tensor) -> tuple[int, int, str] | None:
        """``(status, rank, text)`` if the received bytes ``buf`` are a status frame (see
        :func:`compressed_comm.wire.status_frame`), None for data."""
        return None

    def frame(self, nbytes: int, status: int, rank: int, text: str,
              device: torch.device) -> torch.Tensor:
        """A status frame of ``nbytes`` (what a receiver expects) in place of a payload."""
        raise NotImplementedError(f"{type(self).__name__} sends no status frames")


# ---------------------------------------------------------------------- raw


class _RawOut(Outgoing):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.nbytes = x.numel() * x.element_size()

    def payload(self) -> torch.Tensor:
        return as_bytes(self.x)


class _RawIn(Incoming):
    def __init__(self, like: torch.Tensor) -> None:
        self.shape, self.dtype = tuple(like.shape), like.dtype
        self.nbytes = self.room = like.numel() * like.element_size()

    def take(self, buf: torch.Tensor, exact: bool = True) -> torch.Tensor:
        return buf[:self.nbytes].view(self.dtype).view(self.shape)


class RawFraming(Framing):
    """The tensor's own bytes; received tensors are views of fresh receive buffers."""

    def sender(self, name: StreamKey, x: torch.Tensor) -> Outgoing:
        return _RawOut(x)

    def receiver(self, name: StreamKey, origin: int, like: torch.Tensor) -> Incoming:
        return _RawIn(like)


# ---------------------------------------------------------------------- compressed


class _StreamOut(Outgoing):
    def __init__(self, enc: StreamEncoder, x: torch.Tensor) -> None:
        self.enc, self.x = enc, x
        self.nbytes = enc.payload_nbytes()
        self.step = enc.step

    def payload(self) -> torch.Tensor:
        return self.enc.encode(self.x)


class _StreamIn(Incoming):
    def __init__(self, dec: StreamDecoder) -> None:
        self.dec = dec
        self.nbytes = dec.payload_nbytes(dec.expected)
        self.room = max(self.nbytes, dec.max_payload_nbytes())

    def take(self, buf: torch.Tensor, exact: bool = True) -> torch.Tensor:
        return self.dec.decode(buf if exact else announced_payload(buf))

    def posted(self) -> None:
        self.dec.announce()


class CompressedFraming(Framing):
    """Payloads of the residual streams of ``session``; with ``renew``, a stream whose
    tensors change shape or dtype starts afresh instead of raising."""

    def __init__(self, session: Session, renew: bool = False) -> None:
        self.session = session
        self.renew = renew

    def sender(self, name: StreamKey, x: torch.Tensor) -> Outgoing:
        enc = self.session.encoder(name, x, renew=self.renew)
        self.session.prepare(enc)  # codec="auto": the message's codec, hence its size
        return _StreamOut(enc, x)

    def receiver(self, name: StreamKey, origin: int, like: torch.Tensor) -> Incoming:
        dec = self.session.decoder(name, origin, like, renew=self.renew)
        self.session.prepare(dec)
        return _StreamIn(dec)

    def fits(self, name: StreamKey, origin: int, like: torch.Tensor) -> bool:
        return not self.renew or self.session.fits(name, origin, like)

    def expect(self, name: StreamKey, shapes: Sequence[Sequence[int]]) -> None:
        if self.session.auto is not None:  # one codec for every origin of the collective
            self.session.auto.expect(name, shapes)

    def reconstruction(self, name: StreamKey, x: torch.Tensor) -> torch.Tensor:
        return self.session.encoder(name, x).reference.clone()

    def status(self, buf: torch.Tensor) -> tuple[int, int, str] | None:
        return read_status(buf)

    def frame(self, nbytes: int, status: int, rank: int, text: str,
              device: torch.device) -> torch.Tensor:
        return status_frame(nbytes, status, rank, text, device)
