"""Which transformer call of a denoising step is running: one set of streams per call.

A pipeline that runs classifier-free guidance as two transformer calls per step (the
conditional branch, then the unconditional one; diffusers pipelines without batched CFG,
xDiT outside its CFG parallelism), or a third call for skip-layer guidance, must not send
every call through the same residual streams: the second call would be coded against the
first's reference. :class:`StepCalls` gives each call of a step its own stream prefix: the
caller's tag (:meth:`StepCalls.tagged`), else the call's index within the step. Each call's
streams then warm up and keyframe on their own, and reference memory grows with the number
of calls per step.

Steps end at :meth:`StepCalls.end_step` -- the pipeline scheduler's ``step()`` where an
adapter wraps it (``marked`` steps), or the owner's own step marks -- and, in any mode, at a
call whose tag was already used in this step. Unmarked, an untagged call is always the first
of a new step (a bare transformer driven one call per step), so a loop that calls a bare
transformer twice per step tags its calls.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

__all__ = ["MAX_MARKED_CALLS", "StepCalls"]

log = logging.getLogger(__name__)

#: untagged calls of one marked step after which steps are taken to be unmarked (a scheduler
#: that is not the one wrapped): every untagged call then starts a step, and memory is bounded
MAX_MARKED_CALLS = 8


class StepCalls:
    """The calls of the current denoising step and their stream prefixes.

    ``marked``: steps end only at :meth:`end_step` (or a repeated tag); untagged calls are
    keyed by their index within the step. Unmarked: every untagged call starts a step.
    Listeners added with :meth:`on_step_end` run at every step boundary.
    """

    def __init__(self, marked: bool = False) -> None:
        self.marked = marked
        #: steps ended in this generation
        self.step = 0
        self._keys: list[str] = []
        self._tag: str | None = None
        self._listeners: list[Callable[[], None]] = []
        self._warned = False

    def __repr__(self) -> str:
        return (f"StepCalls({'marked' if self.marked else 'unmarked'}, step={self.step}, "
                f"calls={self._keys})")

    @property
    def prefix(self) -> str:
        """The stream-name prefix of the call running: ``""`` for the first untagged call of
        a step (the names of a one-call step are unchanged), ``"call<i>/"`` for the i-th
        untagged one, ``"<tag>/"`` for a tagged one."""
        key = self._keys[-1] if self._keys else ""
        return "" if key in ("", "call0") else f"{key}/"

    @contextlib.contextmanager
    def tagged(self, tag: str) -> Iterator[None]:
        """Transformer calls inside are keyed by ``tag`` (``"cond"``, ``"uncond"``): the
        same tag in every step, a distinct one per call of a step."""
        if not isinstance(tag, str) or not tag or "/" in tag:
            raise ValueError(f"a call tag is a non-empty string without '/'; got {tag!r}")
        outer, self._tag = self._tag, tag
        try:
            yield
        finally:
            self._tag = outer

    def begin_call(self) -> None:
        """A transformer call starts: end the step first if this call cannot belong to it."""
        if self._tag is not None:
            key = self._tag
        elif self.marked and len(self._keys) < MAX_MARKED_CALLS:
            key = f"call{len(self._keys)}"
        else:
            if self.marked and not self._warned:
                self._warned = True
                log.warning("compressed_comm: %d transformer calls without a scheduler step; "
                            "every untagged call now counts as a step (tag the calls of a "
                            "step, or mark steps)", len(self._keys))
            self.marked = False
            key = ""
        if key in self._keys:
            self.end_step()
        self._keys.append(key)

    def end_step(self) -> None:
        """The current step is over (also a step without transformer calls: the hook points
        may be driven directly)."""
        self._keys = []
        self.step += 1
        for listener in self._listeners:
            listener()

    def on_step_end(self, listener: Callable[[], None]) -> None:
        """Run ``listener()`` at every step boundary."""
        self._listeners.append(listener)

    def reset(self) -> None:
        """A new generation: no calls yet, step 0 (listeners stay)."""
        self._keys = []
        self.step = 0
