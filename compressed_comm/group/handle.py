"""Handle: a transfer in flight, completed by :meth:`Handle.wait`."""

from __future__ import annotations

import weakref
from typing import Any, Callable, Generic, Sequence, TypeVar

import torch

from ..errors import CancelledError

__all__ = ["Handle", "forward_only"]

T = TypeVar("T")


def forward_only(x: torch.Tensor) -> torch.Tensor:
    """``x`` detached if it requires grad (compression is forward-only), else ``x`` itself."""
    return x.detach() if x.requires_grad else x


class Handle(Generic[T]):
    """A compressed transfer in flight; :meth:`wait` completes it and returns the result.

    Waiting twice returns the same result (or raises the same error). Handles of one stream
    complete in the order they were started: waiting on a newer one first completes the
    older ones, whose results are then kept as copies (the stream's reference moves on).
    A handle whose session ended (``new_session()``, ``abort()``) before it was waited on
    raises :class:`~compressed_comm.CancelledError`.
    """

    __slots__ = ("_finish", "_result", "_error", "_before", "_timeout", "_group")

    def __init__(self, finish: Callable[[float], T], timeout: float,
                 before: Sequence[Handle[Any]] = (), group: Any = None) -> None:
        self._finish: Callable[[float], T] | None = finish
        self._result: T | None = None
        self._error: BaseException | None = None
        self._before = list(before)
        self._timeout = timeout
        # weak: a group and the handles it tracks must not keep each other alive (a cycle
        # would leave the process group to the collector at interpreter exit, when gloo's
        # threads can no longer release tensors safely)
        self._group = None if group is None else weakref.ref(group)

    @classmethod
    def completed(cls, result: T) -> Handle[T]:
        """A handle that is already done."""
        h: Handle[T] = cls(lambda _t: result, 0.0)
        h.wait()
        return h

    def is_completed(self) -> bool:
        """Whether the transfer is over: waited on, failed or cancelled."""
        return self._finish is None

    def wait(self, timeout: float | None = None) -> T:
        """Complete the transfer (raising on timeout or error) and return its result."""
        if self._finish is not None:
            group = self._group() if self._group is not None else None
            if group is not None:
                group._check_usable()
            for older in self._before:
                if not older.is_completed():
                    older.wait(timeout)
                    older._result = _snapshot(older._result)
            finish, self._finish, self._before = self._finish, None, []
            try:
                self._result = finish(self._timeout if timeout is None else timeout)
            except BaseException as e:
                self._error = e
                if group is not None:
                    group._fail(e)
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def _cancel(self, why: str) -> None:
        if self._finish is not None:
            self._finish, self._before = None, []
            self._error = CancelledError(why)


def _snapshot(result: Any) -> Any:
    """A copy of a result that outlives the next update of the stream's reference."""
    if isinstance(result, torch.Tensor):
        return result.clone()
    if isinstance(result, list):
        return [_snapshot(r) for r in result]
    return result
