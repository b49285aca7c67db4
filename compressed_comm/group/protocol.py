""":class:`Collectives`: what :class:`~compressed_comm.CompressedGroup` and
:class:`~compressed_comm.RawGroup` both offer, as a type for code that takes either (the
compressed exchange or its exact baseline)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch

from .handle import Handle

__all__ = ["Collectives"]


class Collectives(Protocol):
    """A group's ranks, step and session marks, and its collectives (documented on
    :class:`~compressed_comm.CompressedGroup`); every rank issues the same calls on the
    same streams in the same order."""

    rank: int
    world_size: int

    def step(self) -> None: ...

    def new_session(self, *, rebuild: bool = False) -> None: ...

    def isend(self, x: torch.Tensor, dst: int, *, stream: str) -> Handle[None]: ...

    def irecv(self, like: torch.Tensor, src: int, *, stream: str) -> Handle[torch.Tensor]: ...

    def send(self, x: torch.Tensor, dst: int, *, stream: str) -> None: ...

    def recv(self, like: torch.Tensor, src: int, *, stream: str) -> torch.Tensor: ...

    def all_gather_async(self, x: torch.Tensor, *, stream: str,
                         shapes: Sequence[Sequence[int]] | None = None
                         ) -> Handle[list[torch.Tensor]]: ...

    def all_gather(self, x: torch.Tensor, *, stream: str,
                   shapes: Sequence[Sequence[int]] | None = None) -> list[torch.Tensor]: ...

    def ring_iter(self, x: torch.Tensor, *, stream: str,
                  shapes: Sequence[Sequence[int]] | None = None
                  ) -> Iterator[tuple[int, torch.Tensor]]: ...

    def ring_pass(self, x: torch.Tensor, *, stream: str,
                  shapes: Sequence[Sequence[int]] | None = None) -> list[torch.Tensor]: ...

    def all_to_all_async(self, x: torch.Tensor, *, stream: str,
                         input_split_sizes: Sequence[int] | None = None,
                         output_split_sizes: Sequence[int] | None = None
                         ) -> Handle[torch.Tensor]: ...

    def all_to_all(self, x: torch.Tensor, *, stream: str,
                   input_split_sizes: Sequence[int] | None = None,
                   output_split_sizes: Sequence[int] | None = None) -> torch.Tensor: ...

    def reduce_scatter_async(self, x: torch.Tensor, *, stream: str, op: str = "sum",
                             input_split_sizes: Sequence[int] | None = None
                             ) -> Handle[torch.Tensor]: ...

    def reduce_scatter(self, x: torch.Tensor, *, stream: str, op: str = "sum",
                       input_split_sizes: Sequence[int] | None = None) -> torch.Tensor: ...

    def all_reduce(self, x: torch.Tensor, *, stream: str, op: str = "sum") -> torch.Tensor: ...
