"""DistriFusion's stale all-gather: the other ranks' tensors of the previous step, while this
step's all-gather is in flight.

Used by patch parallelism (:mod:`adapters.dit`, ``ParallelConfig(asynchronous=True)``) and
by diffusers' ring attention under :func:`adapters.xdit.enable_compression` with
``asynchronous=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from compressed_comm import Collectives, Handle

__all__ = ["StaleGather"]


class StaleGather:
    """One rank's stale all-gathers, one per stream.

    The first ``warmup`` (at least one) gathers of each stream are synchronous (exact);
    after that a call returns this rank's ``x`` in its own slot and the other ranks' tensors
    of the stream's previous call, and posts this call's all-gather, completed at the
    stream's next call.
    """

    def __init__(self, warmup: int = 1) -> None:
        self.warmup = max(1, warmup)
        self._pending: dict[str, Handle[list[torch.Tensor]]] = {}
        self._stale: dict[str, list[torch.Tensor]] = {}
        self._synchronous: dict[str, int] = {}

    def __call__(self, group: Collectives, x: torch.Tensor, stream: str,
                 shapes: Sequence[Sequence[int]] | None = None) -> list[torch.Tensor]:
        """Every rank's ``x`` on ``group``, in rank order: fresh during warm-up, else the
        others' one call stale (``shapes``: each rank's, when they differ)."""
        done = self._synchronous.get(stream, 0)
        if done < self.warmup:
            gathered = group.all_gather(x, stream=stream, shapes=shapes)
            self._stale[stream] = gathered
            self._synchronous[stream] = done + 1
            return gathered
        pending = self._pending.pop(stream, None)
        if pending is not None:
            self._stale[stream] = pending.wait()
        stale = self._stale[stream]
        self._pending[stream] = group.all_gather_async(x, stream=stream, shapes=shapes)
        return [x if o == group.rank else t for o, t in enumerate(stale)]

    def finish(self) -> None:
        """Complete the gathers in flight, then forget every stream (a generation ends)."""
        for handle in self._pending.values():
            handle.wait()
        self.clear()

    def clear(self) -> None:
        """Forget every stream, leaving gathers in flight to the group (its
        ``new_session()`` cancels them)."""
        self._pending.clear()
        self._stale.clear()
        self._synchronous.clear()
