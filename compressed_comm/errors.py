"""Exception types raised by compressed_comm.

Every error names what was wrong and what was expected. All derive from
:class:`CompressedCommError`; each also derives from the built-in exception a caller
would naturally catch (``ValueError`` or ``TypeError``).
"""

from __future__ import annotations

__all__ = [
    "CompressedCommError",
    "WireFormatError",
    "StreamMismatchError",
    "StreamOrderError",
    "StaleMessageError",
    "NonFiniteError",
    "UnsupportedDtypeError",
    "CommError",
    "CommTimeoutError",
    "GroupFailedError",
    "PeerFailedError",
    "CancelledError",
]


class CompressedCommError(Exception):
    """Base class of all compressed_comm errors."""


class WireFormatError(CompressedCommError, ValueError):
    """A payload is malformed, truncated, of another version, or for another codec/stream."""


class StreamMismatchError(CompressedCommError, ValueError):
    """A stream was fed a tensor (or payload) of another shape, dtype, device or role."""


class StreamOrderError(CompressedCommError, ValueError):
    """A stream payload arrived out of order (a message was missed or repeated)."""


class StaleMessageError(StreamOrderError):
    """A payload belongs to another session (an earlier request): it is never used as data."""


class NonFiniteError(CompressedCommError, ValueError):
    """An input to be compressed contains NaN or Inf."""


class UnsupportedDtypeError(CompressedCommError, TypeError):
    """A tensor's dtype is not one of float16, bfloat16, float32."""


class CommError(CompressedCommError, RuntimeError):
    """A transfer failed: the peer is gone, or the transport reported an error."""


class CommTimeoutError(CommError, TimeoutError):
    """A transfer did not complete within its timeout (a peer that never sends)."""


class GroupFailedError(CommError):
    """An earlier transfer of this group failed; the group refuses work until
    ``new_session()`` (or ``abort()``). The message names the original failure."""


class PeerFailedError(CommError):
    """A rank of the group failed in the current step (its input held NaN, a payload it
    received was corrupt, its caller gave up, ...). Every rank raises it at the same call,
    naming that rank (:attr:`rank`) and the cause; ``new_session()`` on every rank recovers."""

    def __init__(self, message: str, rank: int = -1, cause: str = "") -> None:
        super().__init__(message)
        #: the rank that failed first
        self.rank = rank
        #: what it failed with (``"NonFiniteError: ..."``)
        self.cause = cause


class CancelledError(CommError):
    """A transfer was cancelled: its session was ended by ``new_session()`` or ``abort()``."""
