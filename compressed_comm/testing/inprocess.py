"""N virtual ranks in one process: an in-memory transport and a runner, one thread per rank.

:class:`Fabric` is the shared medium of one virtual world: per-link FIFO mailboxes for
point-to-point traffic and rendezvous slots for collectives. It counts the bytes that cross
every ``(src, dst)`` link. :func:`run_ranks` runs a function on each rank's
:class:`InProcessTransport` and returns every rank's result.

The transport has the semantics of a real one: sends are buffered (they complete at once),
receives and collectives wait for their peers with a timeout, and a rank that fails aborts
the fabric so its peers raise instead of hanging.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from typing import Any, Callable

import torch

from ..errors import CommError, CommTimeoutError
from ..transport import Transport, Work

__all__ = ["Fabric", "InProcessTransport", "run_ranks"]


class Fabric:
    """The shared state of ``world_size`` virtual ranks (use one per virtual world)."""

    def __init__(self, world_size: int) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        self.world_size = world_size
        self._cond = threading.Condition()
        self._mail: dict[tuple[int, int, Any], deque[torch.Tensor]] = defaultdict(deque)
        self._slots: dict[tuple[str, int], dict[int, Any]] = {}
        self._readers: dict[tuple[str, int], int] = defaultdict(int)
        self._bytes: dict[tuple[int, int], int] = defaultdict(int)
        self._aborted: BaseException | None = None

    def transport(self, rank: int) -> InProcessTransport:
        """The transport of virtual rank ``rank``."""
        return InProcessTransport(self, rank)

    def link_bytes(self) -> dict[tuple[int, int], int]:
        """Bytes sent so far over each ``(src, dst)`` link (self-links excluded)."""
        with self._cond:
            return dict(self._bytes)

    def total_bytes(self) -> int:
        """Bytes sent so far over all links."""
        return sum(self.link_bytes().values())

    def abort(self, error: BaseException) -> None:
        """Make every pending and future wait on this fabric raise (a rank has failed)."""
        with self._cond:
            if self._aborted is None:
                self._aborted = error
            self._cond.notify_all()

    # ------------------------------------------------------------------ internals

    def _count(self, src: int, dst: int, nbytes: int) -> None:
        if src != dst:
            self._bytes[(src, dst)] += nbytes

    def _wait_for(self, ready: Callable[[], bool], timeout: float | None, what: str) -> None:
        """Wait (holding the lock) until ``ready()``; raise on timeout or abort."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            if self._aborted is not None:
                raise CommError(f"{what}: aborted because another rank failed "
                                f"({type(self._aborted).__name__}: {self._aborted})")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise CommTimeoutError(f"{what}: not complete within {timeout} s")
            self._cond.wait(left)

    def _post(self, src: int, dst: int, tensor: torch.Tensor, tag: Any = 0) -> None:
        with self._cond:
            self._mail[(src, dst, tag)].append(tensor.detach().clone())
            self._count(src, dst, tensor.nbytes)
            self._cond.notify_all()

    def _take(self, src: int, dst: int, out: torch.Tensor, timeout: float | None,
              tag: Any = 0) -> None:
        with self._cond:
            box = self._mail[(src, dst, tag)]
            self._wait_for(lambda: bool(box), timeout, f"recv on rank {dst} from rank {src}")
            data = box.popleft()
        if data.nbytes > out.nbytes or data.dtype != out.dtype:
            raise CommError(f"recv on rank {dst} from rank {src}: got {data.nbytes} bytes of "
                            f"{data.dtype}, the receive buffer holds {out.nbytes} bytes of "
                            f"{out.dtype}")
        out.view(-1)[: data.numel()].copy_(data.view(-1))  # a shorter message fills a prefix

    def _deposit(self, kind: str, seq: int, rank: int, value: Any) -> None:
        with self._cond:
            self._slots.setdefault((kind, seq), {})[rank] = value
            self._cond.notify_all()

    def _collect(self, kind: str, seq: int, rank: int, timeout: float | None) -> dict[int, Any]:
        key = (kind, seq)
        with self._cond:
            self._wait_for(lambda: len(self._slots.get(key, ())) == self.world_size, timeout,
                           f"{kind} #{seq} on rank {rank} (waiting for all "
                           f"{self.world_size} ranks)")
            slot = self._slots[key]
            self._readers[key] += 1
            if self._readers[key] == self.world_size:
                del self._slots[key], self._readers[key]
            return slot


class InProcessTransport(Transport):
    """One virtual rank's view of a :class:`Fabric` (a :class:`~compressed_comm.Transport`).

    Like gloo, a receive takes a message shorter than its buffer (into the buffer's prefix)
    and fails on a longer one.
    """

    accepts_short_messages = True

    def __init__(self, fabric: Fabric, rank: int, channel: str = "") -> None:
        if not 0 <= rank < fabric.world_size:
            raise ValueError(f"rank {rank} is outside the fabric's world of {fabric.world_size}")
        self.fabric = fabric
        self.rank = rank
        self.world_size = fabric.world_size
        #: what keeps this transport's traffic apart from other channels' on the fabric
        self.channel = channel
        self._seq: dict[str, int] = defaultdict(int)
        self._control: InProcessTransport | None = None

    def __repr__(self) -> str:
        return f"InProcessTransport(rank={self.rank}, world_size={self.world_size})"

    def _peer(self, peer: int, role: str) -> None:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(f"rank {self.rank}: {role} rank {peer} is not another rank of a "
                             f"world of {self.world_size}")

    def control(self) -> InProcessTransport:
        """The same ranks on a channel of their own (see :meth:`Transport.control`)."""
        if self._control is None:
            self._control = InProcessTransport(self.fabric, self.rank, self.channel + "control/")
        return self._control

    def _next(self, kind: str) -> int:
        seq = self._seq[kind]
        self._seq[kind] += 1
        return seq

    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> Work:
        self._peer(dst, "destination")
        self.fabric._post(self.rank, dst, tensor, (self.channel, tag))
        return Work.done()

    def irecv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> Work:
        self._peer(src, "source")
        return Work(lambda timeout: self.fabric._take(src, self.rank, tensor, timeout,
                                                        (self.channel, tag)))

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor) -> Work:
        if len(outputs) != self.world_size:
            raise ValueError(f"all_gather needs {self.world_size} outputs, got {len(outputs)}")
        kind = self.channel + "all_gather"
        seq = self._next(kind)
        self.fabric._deposit(kind, seq, self.rank, tensor.detach().clone())
        with self.fabric._cond:
            for dst in range(self.world_size):
                self.fabric._count(self.rank, dst, tensor.nbytes)

        def finish(timeout: float | None) -> None:
            got = self.fabric._collect(kind, seq, self.rank, timeout)
            sizes = {r: t.nbytes for r, t in got.items()}
            if len(set(sizes.values())) != 1:
                raise CommError(f"all_gather #{seq}: ranks contributed buffers of different "
                                f"sizes {sizes} (they disagree on shape, dtype or codec)")
            for r, out in enumerate(outputs):
                out.view(-1).copy_(got[r].view(-1))
        return Work(finish)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
                          output_split_sizes: list[int], input_split_sizes: list[int]) -> Work:
        if len(input_split_sizes) != self.world_size or len(output_split_sizes) != self.world_size:
            raise ValueError(f"all_to_all_single needs {self.world_size} split sizes per side")
        kind = self.channel + "all_to_all"
        seq = self._next(kind)
        chunks = [c.detach().clone() for c in input.split(list(input_split_sizes))]
        self.fabric._deposit(kind, seq, self.rank, chunks)
        with self.fabric._cond:
            for dst, chunk in enumerate(chunks):
                self.fabric._count(self.rank, dst, chunk.nbytes)

        def finish(timeout: float | None) -> None:
            got = self.fabric._collect(kind, seq, self.rank, timeout)
            for src, out in enumerate(output.split(list(output_split_sizes))):
                chunk = got[src][self.rank]
                if chunk.shape != out.shape:
                    raise CommError(f"all_to_all #{seq}: rank {src} sent {tuple(chunk.shape)} to "
                                    f"rank {self.rank}, which expected {tuple(out.shape)}")
                out.copy_(chunk)
        return Work(finish)


def run_ranks(world_size: int, fn: Callable[..., Any], *args: Any,
              timeout: float = 120.0, fabric: Fabric | None = None) -> list[Any]:
    """Run ``fn(transport, *args)`` on ``world_size`` virtual ranks, one thread each.

    Returns the results in rank order. If any rank raises, the fabric is aborted (its peers'
    waits raise too) and the first rank's exception is re-raised, annotated with its rank.
    Raises :class:`~compressed_comm.CommTimeoutError` if a rank does not finish in ``timeout``.
    """
    fabric = fabric or Fabric(world_size)
    if fabric.world_size != world_size:
        raise ValueError(f"fabric has {fabric.world_size} ranks, not {world_size}")
    results: list[Any] = [None] * world_size
    errors: list[tuple[int, BaseException]] = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(fabric.transport(rank), *args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append((rank, e))
            fabric.abort(e)

    threads = [threading.Thread(target=body, args=(r,), name=f"virtual-rank-{r}", daemon=True)
               for r in range(world_size)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        stuck = [t.name for t in threads if t.is_alive()]
        fabric.abort(CommTimeoutError("run_ranks timed out"))
        raise CommTimeoutError(f"virtual ranks {stuck} did not finish within {timeout} s")
    if errors:
        rank, error = errors[0]  # the first failure; its peers' errors follow from the abort
        if hasattr(error, "add_note"):
            error.add_note(f"(raised on virtual rank {rank} of {world_size})")
        raise error
    return results
