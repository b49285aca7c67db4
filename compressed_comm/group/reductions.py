"""Reductions over the group's all-to-all and all-gather: reduce-scatter and all-reduce of
sums and averages, every rank getting the same bits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from ..session import StreamKey
from .arguments import split_sizes
from .handle import Handle, forward_only

if TYPE_CHECKING:
    from .collectives import _GroupBase

__all__ = ["Reductions"]


def _reduce_op(op: str, stream: str) -> bool:
    """Whether ``op`` averages (``"avg"``) rather than sums (``"sum"``); ValueError else."""
    if op not in ("sum", "avg"):
        raise ValueError(f"reduction of stream {stream!r}: op must be 'sum' or 'avg', got "
                         f"{op!r} (other reductions do not commute with residual coding)")
    return op == "avg"


class Reductions:
    """The reductions of a group (mixed into :class:`~.collectives._GroupBase`)."""

    def reduce_scatter_async(self: _GroupBase, x: torch.Tensor, *, stream: str,
                             op: str = "sum", input_split_sizes: Sequence[int] | None = None
                             ) -> Handle[torch.Tensor]:
        """Start a reduce-scatter along dim 0: split ``i`` of ``x`` (``input_split_sizes``,
        default equal) is summed (``op="sum"``) or averaged (``"avg"``) over the ranks onto
        rank ``i``; ``wait()`` returns this rank's reduced split.

        Each ``(src, dst)`` split is its own residual stream, as in :meth:`all_to_all_async`;
        the owner adds its own exact split and the others' reconstructions in rank order, in
        float32, so the result does not depend on arrival order.
        """
        average = _reduce_op(op, stream)
        x = forward_only(x)
        in_sizes, _ = split_sizes(self.world_size, x, stream, input_split_sizes, None)
        world, mine = self.world_size, in_sizes[self.rank]
        parts = self.all_to_all_async(x, stream=stream, input_split_sizes=in_sizes,
                                      output_split_sizes=[mine] * world)

        def reduce(timeout: float) -> torch.Tensor:
            stacked = parts.wait(timeout).view(world, mine, *x.shape[1:])
            total = stacked[0].float()
            for part in stacked[1:]:
                total += part.float()
            return (total / world if average else total).to(x.dtype)
        return self._handle(reduce)

    def reduce_scatter(self: _GroupBase, x: torch.Tensor, *, stream: str, op: str = "sum",
                       input_split_sizes: Sequence[int] | None = None) -> torch.Tensor:
        """Reduce-scatter along dim 0; see :meth:`reduce_scatter_async`."""
        return self.reduce_scatter_async(x, stream=stream, op=op,
                                         input_split_sizes=input_split_sizes).wait()

    def all_reduce(self: _GroupBase, x: torch.Tensor, *, stream: str,
                   op: str = "sum") -> torch.Tensor:
        """The sum (``op="sum"``) or average (``"avg"``) of every rank's ``x``, the same on
        every rank: a reduce-scatter of the rows of ``x`` viewed ``(N, C)`` (see
        :meth:`reduce_scatter_async`; rank ``i`` owns the ``i``-th of ``world`` near-equal
        row blocks) and an all-gather of the reduced blocks, each rank taking the
        reconstruction of its own block, as its peers do."""
        _reduce_op(op, stream)
        x = forward_only(x)
        if self.world_size == 1:
            return x.clone()
        world = self.world_size
        flat = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
        rows = [flat.shape[0] // world + (r < flat.shape[0] % world) for r in range(world)]
        mine = self.reduce_scatter(flat, stream=f"{stream}.reduce", op=op,
                                   input_split_sizes=rows)
        shapes = [(n, flat.shape[1]) for n in rows]
        gathered = self.all_gather(mine, stream=f"{stream}.gather", shapes=shapes)
        gathered[self.rank] = self.framing.reconstruction(
            StreamKey("all_gather", f"{stream}.gather"), mine)
        result = torch.cat(gathered).view(x.shape)
        self._account_reduction(stream, flat.split(rows), mine, result)
        return result

    def _account_reduction(self, stream: str, blocks: Sequence[torch.Tensor],
                           reduced: torch.Tensor, result: torch.Tensor) -> None:
        """Record the error of an all_reduce's result (compressed groups with track_error)."""
