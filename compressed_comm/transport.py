"""Transports: the minimal byte movers under :class:`~compressed_comm.CompressedGroup`.

A transport moves ``uint8`` payload buffers between ranks and knows nothing of codecs or
streams. :class:`TorchDistTransport` runs over any ``torch.distributed`` process group
(NCCL, gloo); :mod:`compressed_comm.testing` provides an in-process transport for N
virtual ranks with the same interface. All operations are asynchronous and return a
:class:`Work` whose ``wait(timeout)`` raises :class:`~compressed_comm.CommTimeoutError` if
the transfer does not complete in time and :class:`~compressed_comm.CommError` if the
transport fails.
"""

from __future__ import annotations

import datetime
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import AllgatherOptions, AllToAllOptions

from .errors import CommError, CommTimeoutError

__all__ = ["Work", "P2POp", "Transport", "TorchDistTransport"]


class Work:
    """A pending transfer: :meth:`wait` calls ``finish(timeout)`` until a call returns
    (``finish`` None: complete already). A wait that raises leaves the transfer pending, so
    a later wait tries again; after one has returned, the next ones return at once.
    """

    __slots__ = ("_finish",)

    def __init__(self, finish: Callable[[float | None], None] | None = None) -> None:
        self._finish = finish

    @classmethod
    def done(cls) -> Work:
        """A transfer that completed when it was posted."""
        return cls()

    @classmethod
    def all_of(cls, works: Sequence[Work]) -> Work:
        """Several transfers as one, waited for within one overall timeout."""
        works = list(works)

        def finish(timeout: float | None) -> None:
            deadline = None if timeout is None else time.monotonic() + timeout
            for w in works:
                w.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return cls(finish)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the transfer is complete; ``timeout`` in seconds (None: no limit)."""
        if self._finish is not None:
            self._finish(timeout)
            self._finish = None


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

    def control(self) -> Transport:
        """A transport over the same ranks for a group's small control blocks: its transfers
        never queue behind this transport's (asynchronous data in flight), and a control
        block never meets a data payload, so ranks that disagree wait for each other instead
        of failing the backend. This transport itself where there is no second channel."""
        return self

    def rebuild(self) -> None:
        """Make fresh connections to the same ranks, replacing this transport's (after a
        timeout or a broken connection: gloo's do not survive one). Every rank calls it
        together. Raises :class:`~compressed_comm.CommError` where the transport cannot."""
        raise CommError(f"{type(self).__name__} cannot make fresh connections")

    def send(self, tensor: torch.Tensor, dst: int, timeout: float | None = None) -> None:
        """Send ``tensor`` to ``dst`` and wait."""
        self.isend(tensor, dst).wait(timeout)

    def recv(self, tensor: torch.Tensor, src: int, timeout: float | None = None) -> None:
        """Receive from ``src`` into ``tensor`` and wait."""
        self.irecv(tensor, src).wait(timeout)


def _start(what: str, op: Callable[..., dist.Work | None], *args: Any) -> Work:
    """Start a torch.distributed operation; transport failures become :class:`CommError`,
    and its wait raises our timeout and error types."""
    try:
        work = op(*args)
    except RuntimeError as e:
        raise CommError(f"{what} failed to start: {e}") from e
    if work is None:
        return Work.done()

    def finish(timeout: float | None) -> None:
        try:
            if timeout is None:
                work.wait()
            else:
                work.wait(datetime.timedelta(seconds=timeout))
        except RuntimeError as e:
            text = str(e)
            if "timed out" in text.lower() or "timeout" in text.lower():
                raise CommTimeoutError(f"{what}: not complete within {timeout} s ({text})") from e
            raise CommError(f"{what} failed: {text}") from e
    return Work(finish)


class TorchDistTransport(Transport):
    """A transport over a ``torch.distributed`` process group (default: the world group).

    Calls the group's own methods with group ranks, so it also works on process groups that
    were constructed directly (e.g. ``ProcessGroupGloo(store, rank, size)``) rather than
    through ``init_process_group``/``new_group``.

    Its :meth:`control` channel: on a gloo group, the group itself, point-to-point with tags
    of its own (gloo matches messages by source and tag, and its point-to-point transfers do
    not queue behind its collectives); on other backends (NCCL), a gloo group of the same
    ranks that the library makes from ``torch.distributed``'s default store on first use,
    under a prefix named after the group and numbered in the order this rank's transports
    over it ask for one (ranks ask in the same order, as their programs make the same calls).
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
        self._control: Transport | None = None
        self._retired: list[dist.ProcessGroup] = []
        try:
            self.accepts_short_messages = process_group.name() == "gloo"
        except RuntimeError:  # a group without a backend name
            self.accepts_short_messages = False

    def __repr__(self) -> str:
        return f"TorchDistTransport(rank={self.rank}, world_size={self.world_size})"

    def control(self) -> Transport:
        if self._control is None:
            self._control = (_TagChannel(self) if self.accepts_short_messages else
                             TorchDistTransport(_gloo_side_group(self.group)))
        return self._control

    def rebuild(self) -> None:
        """A new group of the same ranks and backend, made from the default store under a
        prefix of its own (the group's name and this rank's count of rebuilds, which every
        rank advances alike): the caller's group is left as it is, and this transport runs
        on the library's own from now on."""
        old = self.group
        backend = old.name() if hasattr(old, "name") else "gloo"
        if backend not in ("gloo", "nccl"):
            raise CommError(f"cannot rebuild a {backend!r} group: only gloo and NCCL groups")
        store = _default_store()
        name = getattr(old, "group_name", "") or "unnamed"
        count = store.add(f"compressed_comm/rebuild/{name}/rank{self.rank}", 1)
        prefixed = dist.PrefixStore(f"compressed_comm/rebuild/{name}/{count}/", store)
        if backend == "gloo":
            self.group = dist.ProcessGroupGloo(prefixed, self.rank, self.world_size,
                                               _SIDE_GROUP_TIMEOUT)
        else:  # pragma: no cover - needs GPUs
            self.group = dist.ProcessGroupNCCL(prefixed, self.rank, self.world_size)
        self._retired.append(old)  # a broken group's threads may still hold its buffers
        self._control = None

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


#: how long the library's own gloo groups let an operation take (a wait's own timeout is
#: what the library uses; this is only the backend's outer bound)
_SIDE_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


def _default_store() -> dist.Store:
    """torch.distributed's default store, through which the library makes groups of its own."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError) as e:
        raise CommError(f"the library's own groups need torch.distributed's default store "
                        f"(dist.init_process_group): {e}") from e


def _gloo_side_group(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """A new gloo group of ``group``'s ranks, made from the default store (a rendezvous of
    those ranks only) under a prefix no other side group uses: the group's name and this
    rank's count of side groups over it, which every rank advances in the same order."""
    store = _default_store()
    name = getattr(group, "group_name", "") or "unnamed"
    rank, size = group.rank(), group.size()
    count = store.add(f"compressed_comm/side/{name}/rank{rank}", 1)
    prefix = f"compressed_comm/side/{name}/{count}/"
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size,
                                 _SIDE_GROUP_TIMEOUT)


#: the tags of a gloo group's control channel: point-to-point of the channel at
#: ``_CONTROL_TAGS + 16 + tag``, its all-gathers and all-to-alls below that
_CONTROL_TAGS = 0x7C000000


class _TagChannel(Transport):
    """The control channel of a gloo group (see :class:`TorchDistTransport`): collectives
    made of point-to-point transfers with tags no data transfer uses."""

    accepts_short_messages = True

    def __init__(self, data: TorchDistTransport) -> None:
        self.data = data
        self.rank = data.rank
        self.world_size = data.world_size

    def __repr__(self) -> str:
        return f"control channel of {self.data!r}"

    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> Work:
        return self.data.isend(tensor, dst, _CONTROL_TAGS + 16 + tag)

    def irecv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> Work:
        return self.data.irecv(tensor, src, _CONTROL_TAGS + 16 + tag)

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor) -> Work:
        peers = [p for p in range(self.world_size) if p != self.rank]
        works = [self.data.isend(tensor, p, _CONTROL_TAGS + 1) for p in peers]
        works += [self.data.irecv(outputs[p], p, _CONTROL_TAGS + 1) for p in peers]
        outputs[self.rank].copy_(tensor)
        return Work.all_of(works)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
                          output_split_sizes: list[int], input_split_sizes: list[int]) -> Work:
        ins = input.split(list(input_split_sizes))
        outs = output.split(list(output_split_sizes))
        works = []
        for p in range(self.world_size):
            if p == self.rank:
                outs[p].copy_(ins[p])
            else:
                works.append(self.data.isend(ins[p].contiguous(), p, _CONTROL_TAGS + 2))
                works.append(self.data.irecv(outs[p], p, _CONTROL_TAGS + 2))
        return Work.all_of(works)
