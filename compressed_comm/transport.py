"""Transports: the minimal byte movers under :class:`~compressed_comm.CompressedGroup`.

A transport moves ``uint8`` payload buffers between ranks and knows nothing of codecs or
streams. :class:`TorchDistTransport` runs over any ``torch.distributed`` process group
(NCCL, gloo); the simulator provides an in-process transport for N virtual ranks with the
same interface. All operations are asynchronous and return a :class:`Work` whose
``wait(timeout)`` raises :class:`~compressed_comm.CommTimeoutError` if the transfer does
not complete in time and :class:`~compressed_comm.CommError` if the transport fails.
"""

from __future__ import annotations

import datetime
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, Sequence

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import AllgatherOptions, AllToAllOptions

from .errors import CommError, CommTimeoutError

__all__ = ["Work", "P2POp", "Transport", "TorchDistTransport"]


class Work(Protocol):
    """A pending transfer."""

    def wait(self, timeout: float | None = None) -> None:
        """Block until the transfer is complete; ``timeout`` in seconds (None: no limit)."""
        ...


@dataclass(frozen=True)
class P2POp:
    """One point-to-point operation of a batch: send ``tensor`` to, or receive it from, ``peer``."""

    kind: Literal["send", "recv"]
    tensor: torch.Tensor
    peer: int


class Transport(ABC):
    """Moves buffers between the ``world_size`` ranks of one group; ranks are group ranks."""

    rank: int
    world_size: int
    #: whether a receive may be posted with a buffer longer than the message (gloo: yes;
    #: NCCL: no). Receivers then post the largest size a stream can send, so a message of
    #: an unexpected size is reported from its header instead of failing the backend.
    accepts_short_messages: bool = False

    @abstractmethod
    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> Work:
        """Start sending ``tensor`` to ``dst``. Messages of one ``(src, dst, tag)`` arrive in
        order; ``tag`` separates independent channels (the group's control messages)."""

    @abstractmethod
    def irecv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> Work:
        """Start receiving the next message of ``(src, tag)`` into ``tensor`` (as many bytes
        as were sent)."""

    def batch_isend_irecv(self, ops: Sequence[P2POp]) -> list[Work]:
        """Start a batch of sends and receives (e.g. one ring hop) that may run concurrently."""
        return [self.isend(op.tensor, op.peer) if op.kind == "send" else
                self.irecv(op.tensor, op.peer) for op in ops]

    @abstractmethod
    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor) -> Work:
        """Start gathering every rank's ``tensor`` into ``outputs`` (all of one size)."""

    @abstractmethod
    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
                          output_split_sizes: list[int], input_split_sizes: list[int]) -> Work:
        """Start sending ``input[i-th split]`` to rank ``i`` and receiving rank ``i``'s into
        ``output[i-th split]`` (splits along dim 0)."""

    def send(self, tensor: torch.Tensor, dst: int, timeout: float | None = None) -> None:
        """Send ``tensor`` to ``dst`` and wait."""
        self.isend(tensor, dst).wait(timeout)

    def recv(self, tensor: torch.Tensor, src: int, timeout: float | None = None) -> None:
        """Receive from ``src`` into ``tensor`` and wait."""
        self.irecv(tensor, src).wait(timeout)


class _DistWork:
    """A torch.distributed work handle with our timeout and error semantics."""

    __slots__ = ("_work", "_what")

    def __init__(self, work: dist.Work | None, what: str) -> None:
        self._work = work
        self._what = what

    def wait(self, timeout: float | None = None) -> None:
        if self._work is None:
            return
        try:
            if timeout is None:
                self._work.wait()
            else:
                self._work.wait(datetime.timedelta(seconds=timeout))
        except RuntimeError as e:
            text = str(e)
            if "timed out" in text.lower() or "timeout" in text.lower():
                raise CommTimeoutError(f"{self._what}: not complete within {timeout} s ({text})") from e
            raise CommError(f"{self._what} failed: {text}") from e


def _start(what: str, op: Callable[..., dist.Work | None], *args: Any) -> _DistWork:
    """Start a torch.distributed operation; transport failures become :class:`CommError`."""
    try:
        return _DistWork(op(*args), what)
    except RuntimeError as e:
        raise CommError(f"{what} failed to start: {e}") from e


class TorchDistTransport(Transport):
    """A transport over a ``torch.distributed`` process group (default: the world group).

    Calls the group's own methods with group ranks, so it also works on process groups that
    were constructed directly (e.g. ``ProcessGroupGloo(store, rank, size)``) rather than
    through ``init_process_group``/``new_group``.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        if process_group is None:
            if not dist.is_initialized():
                raise RuntimeError("TorchDistTransport(None) needs torch.distributed to be "
                                   "initialised (dist.init_process_group) or a process group")
            process_group = dist.group.WORLD
        self.group = process_group
        self.rank = process_group.rank()
        self.world_size = process_group.size()
        try:
            self.accepts_short_messages = process_group.name() == "gloo"
        except RuntimeError:  # a group without a backend name
            self.accepts_short_messages = False

    def __repr__(self) -> str:
        return f"TorchDistTransport(rank={self.rank}, world_size={self.world_size})"

    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> Work:
        return _start(f"send to rank {dst}", self.group.send, [tensor], dst, tag)

    def irecv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> Work:
        return _start(f"recv from rank {src}", self.group.recv, [tensor], src, tag)

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor) -> Work:
        return _start("all_gather", self.group.allgather, [outputs], [tensor], AllgatherOptions())

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
                          output_split_sizes: list[int], input_split_sizes: list[int]) -> Work:
        # torch >= 2.13 names the method all_to_all_single; earlier releases alltoall_base
        op = getattr(self.group, "all_to_all_single", None) or self.group.alltoall_base
        return _start("all_to_all", op, output, input, list(output_split_sizes),
                      list(input_split_sizes), AllToAllOptions())
