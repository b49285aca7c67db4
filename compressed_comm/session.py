"""Session: the table of residual streams of one request (one generation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .autopolicy import AutoPolicy
from .codecs import Codec, IdentityCodec, get_codec
from .config import CompressionConfig
from .errors import StreamMismatchError
from .stream import StreamDecoder, StreamEncoder, StreamKey, StreamStats

__all__ = ["Session", "SessionStats", "StreamKey"]

_Stream = StreamEncoder | StreamDecoder


@dataclass(frozen=True)
class SessionStats:
    """Per-stream statistics and their totals."""

    streams: tuple[StreamStats, ...]

    def select(self, role: str) -> SessionStats:
        """Only the streams of ``role``: ``"encoder"`` (sent) or ``"decoder"`` (received)."""
        if role not in ("encoder", "decoder"):
            raise ValueError(f"role must be 'encoder' or 'decoder', got {role!r}")
        return SessionStats(tuple(s for s in self.streams if s.role == role))

    @property
    def raw_bytes(self) -> int:
        return sum(s.raw_bytes for s in self.streams)

    @property
    def wire_bytes(self) -> int:
        return sum(s.wire_bytes for s in self.streams)

    @property
    def reference_bytes(self) -> int:
        return sum(s.reference_bytes for s in self.streams)

    @property
    def ratio(self) -> float:
        """raw bytes / wire bytes over all streams (inf before any traffic)."""
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else float("inf")


class Session:
    """The residual streams of one request on one rank, keyed by ``(key, origin)``
    (a :class:`StreamKey`, or a plain name).

    ``encoder(name, x)`` is the stream this rank sends (origin = ``rank``);
    ``decoder(name, origin, like)`` the one it receives from ``origin``. Streams are created
    on first use with the shape, dtype and device of the tensor given, and later calls must
    agree. Call :meth:`reset` between requests: sessions never share state, so two
    concurrent requests simply use two sessions.

    Every session has an :attr:`id`, written into each payload header and advanced by
    :meth:`reset`, so a message of an earlier request is never taken for this one's.

    Which codec a stream gets: raw (identity) if its name matches ``config.skip`` or the
    tensor is smaller than ``config.min_bytes``; otherwise ``config.codec``. With
    ``codec="auto"`` a stream holds every candidate, and :meth:`prepare` picks the one its
    next message goes through from :attr:`auto` (a group keeps it agreed across ranks).
    """

    def __init__(self, config: CompressionConfig | None = None, *, rank: int = 0,
                 session_id: int = 0, namespace: str = "") -> None:
        self.config = config or CompressionConfig()
        self.rank = int(rank)
        #: the id in this session's payload headers (ranks of a group agree on it)
        self.id = int(session_id)
        #: prefix of every stream's tag: two sessions on one transport never take each
        #: other's payloads
        self.namespace = namespace
        kernels = self.config.kernels
        self._candidates = tuple(get_codec(s, kernels=kernels) for s in self.config.candidates)
        self._codec = None if self.config.auto else self._candidates[0]
        #: with ``codec="auto"``: the measurements and decisions (kept across :meth:`reset`)
        self.auto = AutoPolicy(self.config.candidates, config=self.config) \
            if self.config.auto else None
        self._raw = IdentityCodec("identity")
        self._streams: dict[tuple[StreamKey, int], _Stream] = {}

    def __repr__(self) -> str:
        return (f"Session(rank={self.rank}, id={self.id}, codec={self.config.codec!r}, "
                f"streams={len(self._streams)})")

    def __len__(self) -> int:
        return len(self._streams)

    def __iter__(self) -> Iterator[_Stream]:
        return iter(self._streams.values())

    def codec_for(self, key: str | StreamKey, nbytes: int) -> Codec | None:
        """The codec of a stream ``key`` carrying ``nbytes`` per message (``skip`` patterns
        match the caller's name, :attr:`StreamKey.name`); None where the stream picks among
        the auto candidates."""
        if self.config.skips(StreamKey.of(key).name) or nbytes < self.config.min_bytes:
            return self._raw
        return self._codec

    def encoder(self, key: str | StreamKey, like: torch.Tensor, *,
                renew: bool = False) -> StreamEncoder:
        """The stream this rank sends under ``key`` (created to match ``like`` on first use).

        ``renew``: a stream made for another shape or dtype than ``like``'s is replaced by a
        fresh one (its old state freed; the next message is a keyframe) instead of raising
        :class:`~compressed_comm.StreamMismatchError`. Its receivers must renew alike."""
        return self._get(StreamEncoder, key, self.rank, like, renew)  # type: ignore[return-value]

    def decoder(self, key: str | StreamKey, origin: int, like: torch.Tensor, *,
                renew: bool = False) -> StreamDecoder:
        """The stream this rank receives from ``origin`` under ``key`` (``renew``: as for
        :meth:`encoder`)."""
        return self._get(StreamDecoder, key, int(origin), like, renew)  # type: ignore[return-value]

    def fits(self, key: str | StreamKey, origin: int, like: torch.Tensor) -> bool:
        """Whether the stream ``(key, origin)`` is absent or made for ``like``'s shape, dtype
        and device (so that using it renews nothing)."""
        stream = self._streams.get((StreamKey.of(key), int(origin)))
        return stream is None or _made_for(stream, like)

    def _get(self, cls: type, key: str | StreamKey, origin: int, like: torch.Tensor,
             renew: bool = False) -> _Stream:
        key = StreamKey.of(key)
        stream = self._streams.get((key, origin))
        if stream is not None and renew and isinstance(stream, cls) and not _made_for(stream,
                                                                                       like):
            del self._streams[(key, origin)]
            stream = None
        if stream is None:
            if not isinstance(like, torch.Tensor):
                raise TypeError(f"stream {str(key)!r}: like must be a tensor, got "
                                f"{type(like).__name__}")
            codec = self.codec_for(key, like.nbytes)
            auto = codec is None and self.auto is not None
            stream = cls(key, like, self.config, origin=origin, codec=codec,
                         session=self.id, namespace=self.namespace,
                         candidates=self._candidates if auto else None,
                         meter=self.auto.meter if auto else None)
            self._streams[(key, origin)] = stream
            return stream
        if not isinstance(stream, cls):
            raise StreamMismatchError(
                f"{stream.what} is already this rank's {stream.role}; it cannot also be its "
                f"{cls.role}"
            )
        if not _made_for(stream, like):
            raise StreamMismatchError(
                f"{stream.what} was created for shape {stream.shape}, dtype {stream.dtype} on "
                f"{stream.device}; got shape {tuple(like.shape)}, dtype {like.dtype} on "
                f"{like.device} (use another stream name, or reset() between requests)"
            )
        return stream

    def prepare(self, stream: _Stream) -> None:
        """Choose the candidate of ``stream``'s next message (the next one to send, or to
        post a receive for) where the stream has several (``codec="auto"``)."""
        if self.auto is None or len(stream.layouts) < 2:
            return
        message = stream.step if isinstance(stream, StreamEncoder) else stream.expected
        decision = self.auto.choose(stream, message)
        stream.choose(decision.spec, message, decision)

    def reset(self) -> None:
        """Drop every stream (and its references) and advance :attr:`id`: the next request
        starts from scratch, and payloads of this one are rejected by the next one's streams."""
        self._streams.clear()
        self.id = (self.id + 1) & 0xFFFFFFFF

    def stats(self) -> SessionStats:
        """Traffic, accuracy and memory of every stream."""
        return SessionStats(tuple(s.stats() for s in self._streams.values()))

    @property
    def reference_bytes(self) -> int:
        """Memory held by all streams' references."""
        return sum(s.reference_bytes for s in self._streams.values())


def _made_for(stream: _Stream, like: torch.Tensor) -> bool:
    return (tuple(like.shape), like.dtype, like.device) == (stream.shape, stream.dtype,
                                                            stream.device)
