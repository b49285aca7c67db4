"""Checks of a collective's arguments, before anything is posted."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["check_peer", "gather_shapes", "split_sizes"]


def check_peer(rank: int, world: int, peer: int, role: str) -> None:
    """ValueError unless ``peer`` is another rank of a group of ``world``."""
    if not 0 <= peer < world or peer == rank:
        raise ValueError(f"rank {rank}: {role} rank {peer} is not another rank of this group "
                         f"of {world}")


def gather_shapes(rank: int, world: int, x: torch.Tensor,
                  shapes: Sequence[Sequence[int]] | None) -> list[tuple[int, ...]]:
    """Every rank's shape in an all-gather or ring pass (default: all ``x``'s)."""
    if shapes is None:
        return [tuple(x.shape)] * world
    out = [tuple(int(d) for d in s) for s in shapes]
    if len(out) != world or out[rank] != tuple(x.shape):
        raise ValueError(f"rank {rank}: shapes must list {world} shapes with this rank's equal "
                         f"to {tuple(x.shape)}; got {out}")
    return out


def split_sizes(world: int, x: torch.Tensor, stream: str,
                input_split_sizes: Sequence[int] | None,
                output_split_sizes: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """Validated all-to-all split sizes along dim 0 (default: equal splits both ways)."""
    n = x.shape[0] if x.dim() else 0
    if input_split_sizes is None:
        if x.dim() == 0 or n % world:
            raise ValueError(f"all_to_all of stream {stream!r}: dim 0 of shape "
                             f"{tuple(x.shape)} does not split evenly over {world} ranks; "
                             "pass input_split_sizes")
        input_split_sizes = [n // world] * world
    in_sizes = [int(v) for v in input_split_sizes]
    out_sizes = in_sizes if output_split_sizes is None else [int(v) for v in output_split_sizes]
    if len(in_sizes) != world or len(out_sizes) != world or sum(in_sizes) != n or min(
            in_sizes + out_sizes) < 0:
        raise ValueError(f"all_to_all of stream {stream!r}: split sizes {in_sizes} -> "
                         f"{out_sizes} do not fit dim 0 = {n} over {world} ranks")
    return in_sizes, out_sizes
