"""Keyframes: when a stream sends its tensor itself instead of a residual, and how.

:class:`Keyframes` is the setting (``CompressionConfig(keyframes=Keyframes(...))``);
:class:`KeyframeSchedule` is what it means for one stream: a function of the step alone, so
sender, receivers and the what-if all know every message's kind (and size) in advance.
"""

from __future__ import annotations

from dataclasses import dataclass

from .codecs import get_codec

__all__ = ["Keyframes", "KeyframeSchedule", "KEYFRAME_CODECS"]

#: Codecs a keyframe may use: stateless ones that send the tensor itself.
KEYFRAME_CODECS = ("identity", "fp8", "int8", "int4", "int2", "binary")


def _count(name: str, value: object, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        kind = "a non-negative" if least == 0 else "a positive"
        raise ValueError(f"Keyframes.{name} must be {kind} integer; got {value!r}")


@dataclass(frozen=True)
class Keyframes:
    """How a stream's keyframes go (every rank of a group alike).

    ``codec`` -- how warmup steps and keyframes are sent: ``"identity"`` (default,
    lossless) or a stateless lossy codec (``"int8"``, ``"fp8"`` halve the bytes, ``"int4"``
    quarters them; also ``"int2"``, ``"binary"``). Both sides take the decoded keyframe as
    their reference, so what it loses is the next residual's to correct.

    ``period`` -- if > 0, every ``period``-th step is also a keyframe, resetting accumulated
    error (and recovering from any NaN that was let through).

    ``spread`` -- if > 1, each periodic keyframe is sent in that many row slices over as
    many consecutive steps: step ``t`` with ``t % period = j < spread`` sends slice ``j`` of
    the rows through ``codec`` and the other rows as residuals, so no single step pays the
    whole tensor (warmup steps stay whole). At most ``period``.
    """

    codec: str = "identity"
    period: int = 0
    spread: int = 1

    def __post_init__(self) -> None:
        if get_codec(self.codec).spec not in KEYFRAME_CODECS:
            raise ValueError(
                f"Keyframes.codec must be one of {', '.join(KEYFRAME_CODECS)} (a keyframe sends "
                f"the tensor itself, with no state); got {self.codec!r}")
        _count("period", self.period, 0)
        _count("spread", self.spread, 1)
        if self.spread > 1 and not self.spread <= self.period:
            raise ValueError(f"Keyframes.spread={self.spread} needs Keyframes.period >= "
                             f"{self.spread} (the slices of one keyframe go out before the "
                             f"next); got period={self.period}")


@dataclass(frozen=True)
class KeyframeSchedule:
    """Which messages of one stream are keyframes, or slices of a spread keyframe."""

    warmup_steps: int = 0
    period: int = 0
    spread: int = 1

    def is_keyframe(self, step: int) -> bool:
        """Whether message ``step`` sends the whole tensor through the keyframe codec."""
        if step < self.warmup_steps:
            return True
        return self.period > 0 and self.spread == 1 and step % self.period == 0

    def slice_rows(self, step: int, rows: int) -> tuple[int, int] | None:
        """Rows ``(lo, hi)`` of ``rows`` that message ``step`` sends as its slice of a spread
        keyframe (the other rows go as residuals); None if it is not such a slice."""
        k = self.spread
        j = step % self.period if k > 1 else k
        if j >= k or step - j < self.warmup_steps:  # not in a keyframe after the warmup
            return None
        return j * rows // k, (j + 1) * rows // k

    def keyed(self, step: int, rows: int = 1) -> bool:
        """Whether message ``step`` is a keyframe or a slice of one."""
        return self.is_keyframe(step) or self.slice_rows(step, max(rows, self.spread)) is not None

    def first_spread_steps(self) -> range:
        """The steps of the first spread keyframe after the warmup (empty without spread)."""
        if self.spread <= 1:
            return range(0)
        first = -(-self.warmup_steps // self.period) * self.period
        return range(first, first + self.spread)
