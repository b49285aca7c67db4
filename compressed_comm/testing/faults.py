"""Fault injection for tests: a transport that drops, duplicates, reorders, corrupts,
delays messages or kills its rank, on purpose and reproducibly.

:class:`FaultyTransport` wraps another :class:`~compressed_comm.Transport` (normally an
:class:`~compressed_comm.testing.InProcessTransport`) and passes every outgoing *message* through
an injection decision taken from a :class:`FaultPlan`. The messages of one transport are
numbered 0, 1, 2, ... in the order they are sent, over all operations together:

* each :meth:`~FaultyTransport.isend`;
* each ``send`` op of :meth:`~FaultyTransport.batch_isend_irecv` (in the order of the batch);
* this rank's contribution to :meth:`~FaultyTransport.all_gather` (one message);
* each per-destination chunk of :meth:`~FaultyTransport.all_to_all_single`, in destination
  order, except the chunk a rank keeps for itself (it crosses no link).

Receives are passed to the inner transport unchanged: a receiver sees what a real one would
(a timeout for a lost message, a size error for a message of another size, wrong bytes).

A decision is the schedule's fault for the message index if the plan has one, otherwise a
random draw against the plan's probabilities (one ``random.Random(seed + rank)`` per
transport, so a run with a fixed seed and a deterministic program is reproducible).

Point-to-point messages can suffer every :class:`Fault`. Collectives deliver every rank's
contribution in one step, so dropping, duplicating or reordering one contribution has no
meaning there: for ``all_gather`` and ``all_to_all_single`` only ``CORRUPT_HEADER``,
``CORRUPT_BODY``, ``DELAY`` and ``KILL`` are applied, ``DUPLICATE`` and ``REORDER`` decisions
are ignored (not recorded), and a ``DROP`` decision makes the whole collective *lost*: this
rank does not contribute, so its peers time out waiting for it, and its own wait times out
too (or raises :class:`~compressed_comm.CommError` once the fabric is aborted). Over an
:class:`~compressed_comm.testing.InProcessTransport` the lost collective still uses up its
sequence number, so later collectives of the ranks stay matched.

Example (two virtual ranks, the second message of rank 0 dropped)::

    fabric, ts = faulty_world(2, FaultPlan(schedule={1: Fault.DROP}))
    run_ranks(2, lambda t: body(ts[t.rank]), fabric=fabric)
"""

from __future__ import annotations

import dataclasses
import enum
import random
import threading
import time
import types
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..errors import CommError, CommTimeoutError
from ..transport import P2POp, Transport, Work
from .inprocess import Fabric, InProcessTransport

__all__ = ["HEADER_BYTES", "Fault", "FaultPlan", "FaultyTransport", "Injection", "faulty_world"]

HEADER_BYTES = 48
"""``CORRUPT_HEADER`` flips a bit in bytes ``[0, 48)`` of a message, ``CORRUPT_BODY`` after."""


class Fault(enum.Enum):
    """What can happen to one outgoing message."""

    DROP = "drop"                        # never delivered
    DUPLICATE = "duplicate"              # delivered twice
    REORDER = "reorder"                  # held back, delivered after the next message on the link
    CORRUPT_HEADER = "corrupt_header"    # one random bit flipped in bytes [0, 48)
    CORRUPT_BODY = "corrupt_body"        # one random bit flipped in bytes [48, end), if any
    DELAY = "delay"                      # delivered after FaultPlan.delay seconds
    KILL = "kill"                        # the sending rank dies; the fabric is aborted


_COLLECTIVE_FAULTS = frozenset({Fault.DROP, Fault.CORRUPT_HEADER, Fault.CORRUPT_BODY,
                                Fault.DELAY, Fault.KILL})


@dataclass(frozen=True)
class FaultPlan:
    """Which faults to inject: a probability per fault kind, per message, and/or a schedule.

    ``p_*`` are the probabilities of each fault for every message (their sum at most 1);
    ``schedule`` maps message indices to the fault that message gets for sure (it overrides
    the random draw; the draw is still made, so a schedule does not shift the random faults
    of other messages). ``delay`` is how long a ``DELAY``-ed message is held, in seconds.
    The same plan is used by every rank; each rank draws from ``random.Random(seed + rank)``.
    """

    p_drop: float = 0.0
    p_duplicate: float = 0.0
    p_reorder: float = 0.0
    p_corrupt_header: float = 0.0
    p_corrupt_body: float = 0.0
    p_delay: float = 0.0
    p_kill: float = 0.0
    seed: int = 0
    delay: float = 0.05
    schedule: Mapping[int, Fault] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for fault, p in self.probabilities().items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"FaultPlan: p_{fault.value} must be in [0, 1], got {p}")
        total = sum(self.probabilities().values())
        if total > 1.0 + 1e-9:
            raise ValueError(f"FaultPlan: the fault probabilities sum to {total}, more than 1")
        if self.delay < 0:
            raise ValueError(f"FaultPlan: delay must be >= 0 seconds, got {self.delay}")
        schedule = dict(self.schedule)
        for index, fault in schedule.items():
            if not isinstance(index, int) or index < 0:
                raise ValueError(f"FaultPlan: schedule keys are message indices >= 0, "
                                 f"got {index!r}")
            if not isinstance(fault, Fault):
                raise TypeError(f"FaultPlan: schedule[{index}] must be a Fault, got {fault!r}")
        object.__setattr__(self, "schedule", types.MappingProxyType(schedule))

    def probabilities(self) -> dict[Fault, float]:
        """The probability of each fault kind, per message."""
        return {Fault.DROP: self.p_drop, Fault.DUPLICATE: self.p_duplicate,
                Fault.REORDER: self.p_reorder, Fault.CORRUPT_HEADER: self.p_corrupt_header,
                Fault.CORRUPT_BODY: self.p_corrupt_body, Fault.DELAY: self.p_delay,
                Fault.KILL: self.p_kill}


class Injection(NamedTuple):
    """One injected fault: the message's index, the operation, the peer (None: all ranks)."""

    message_index: int
    op: str
    peer: int | None
    fault: Fault


# ---------------------------------------------------------------------------- helpers

def _lost(fabric: Fabric | None, what: str) -> Work:
    """The work of a collective this rank never contributed to: its wait can only time out."""

    def finish(timeout: float | None) -> None:
        if fabric is not None:
            with fabric._cond:  # raises CommError on abort, CommTimeoutError on timeout
                fabric._wait_for(lambda: False, timeout, what)
        # another inner transport: wait out the timeout (None: fail now rather than hang)
        if timeout is not None:
            time.sleep(timeout)
        raise CommTimeoutError(f"{what}: not complete within {timeout} s "
                               f"(this rank's contribution was dropped)")
    return Work(finish)


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes."""
    return tensor.reshape(-1).view(torch.uint8)


def _flip_bit(tensor: torch.Tensor, lo: int, hi: int, rng: random.Random) -> bool:
    """Flip one random bit of bytes ``[lo, hi)`` of contiguous ``tensor`` in place."""
    data = _bytes_of(tensor)
    hi = min(hi, data.numel())
    if hi <= lo:
        return False
    index = rng.randrange(lo, hi)
    data[index] = int(data[index]) ^ (1 << rng.randrange(8))
    return True


def _corrupted(tensor: torch.Tensor, fault: Fault, rng: random.Random) -> torch.Tensor | None:
    """A corrupted copy of ``tensor`` (the caller's tensor is never modified), or None if
    there is no byte in the fault's region."""
    copy = tensor.detach().contiguous().clone()
    lo, hi = (0, HEADER_BYTES) if fault is Fault.CORRUPT_HEADER else (HEADER_BYTES, copy.nbytes)
    return copy if _flip_bit(copy, lo, hi, rng) else None


# ---------------------------------------------------------------------------- the transport

class FaultyTransport(Transport):
    """A transport that injects the faults of ``plan`` into the messages ``inner`` sends.

    ``fabric`` is aborted when this rank is killed (default: ``inner.fabric`` if it has one).
    ``injected`` counts the faults that took effect (a corruption with no byte in its region
    and ignored collective decisions are not counted); ``records`` lists them in order as
    :class:`Injection` tuples ``(message_index, op, peer, fault)``.

    A ``REORDER``-ed point-to-point message is held until the next message on the same link
    (destination and tag) is delivered (also by a later call); :meth:`flush` delivers held messages now.
    """

    def __init__(self, inner: Transport, plan: FaultPlan | None = None,
                 fabric: Fabric | None = None) -> None:
        self.inner = inner
        self.plan = plan if plan is not None else FaultPlan()
        self.fabric: Fabric | None = fabric if fabric is not None else getattr(inner, "fabric",
                                                                                None)
        self.rank = inner.rank
        self.world_size = inner.world_size
        self.injected: Counter[Fault] = Counter()
        self.records: list[Injection] = []
        self._rng = random.Random(self.plan.seed + self.rank)
        self._cumulative: list[tuple[float, Fault]] = []
        total = 0.0
        for fault, p in self.plan.probabilities().items():
            if p > 0:
                total += p
                self._cumulative.append((total, fault))
        self._messages = 0
        self._held: dict[tuple[int, int], list[torch.Tensor]] = {}  # (dst, tag) -> messages
        self._killed = False
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"FaultyTransport({self.inner!r}, {self.plan!r})"

    @property
    def killed(self) -> bool:
        """Whether this rank was killed by an injected fault."""
        return self._killed

    # ------------------------------------------------------------------ decisions

    def _check_alive(self) -> None:
        if self._killed:
            raise CommError(f"rank {self.rank} was killed (injected fault)")

    def _decide(self) -> tuple[int, Fault | None]:
        """The next message's index and fault (None: deliver it as it is)."""
        index = self._messages
        self._messages += 1
        u = self._rng.random()
        fault = self.plan.schedule.get(index)
        if fault is None:
            for bound, candidate in self._cumulative:
                if u < bound:
                    fault = candidate
                    break
        return index, fault

    def _record(self, index: int, op: str, peer: int | None, fault: Fault) -> None:
        self.injected[fault] += 1
        self.records.append(Injection(index, op, peer, fault))

    def _kill(self) -> None:
        self._killed = True
        error = CommError(f"rank {self.rank} was killed (injected fault)")
        if self.fabric is not None:
            self.fabric.abort(error)
        raise error

    def _check_peer(self, peer: int, role: str) -> None:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(f"rank {self.rank}: {role} rank {peer} is not another rank of a "
                             f"world of {self.world_size}")

    # ------------------------------------------------------------------ point to point

    def _inner_isend(self, tensor: torch.Tensor, dst: int, tag: int) -> Work:
        # tag only when set: inner transports without tags work on the default channel
        return self.inner.isend(tensor, dst, tag) if tag else self.inner.isend(tensor, dst)

    def _send(self, tensor: torch.Tensor, dst: int, tag: int, op: str,
              emit: Callable[[torch.Tensor], Work]) -> Work:
        """Route one outgoing message through its fault; ``emit`` delivers a tensor to dst
        (on the link ``(dst, tag)``)."""
        self._check_alive()
        self._check_peer(dst, "destination")
        index, fault = self._decide()
        if fault in (Fault.CORRUPT_HEADER, Fault.CORRUPT_BODY):
            copy = _corrupted(tensor, fault, self._rng)
            if copy is None:  # no byte in the region: delivered intact, not counted
                fault = None
            else:
                tensor = copy
        if fault is not None:
            self._record(index, op, dst, fault)
        if fault is Fault.KILL:
            self._kill()
        if fault is Fault.DROP:
            return Work.done()
        if fault is Fault.REORDER:
            self._held.setdefault((dst, tag), []).append(tensor.detach().clone())
            return Work.done()
        if fault is Fault.DELAY:
            time.sleep(self.plan.delay)
        works = [emit(tensor)]
        if fault is Fault.DUPLICATE:
            works.append(emit(tensor))
        works.extend(emit(held) for held in self._held.pop((dst, tag), ()))
        return works[0] if len(works) == 1 else Work.all_of(works)

    @property
    def accepts_short_messages(self) -> bool:  # type: ignore[override]
        return self.inner.accepts_short_messages

    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> Work:
        with self._lock:
            return self._send(tensor, dst, tag, "isend",
                              lambda t: self._inner_isend(t, dst, tag))

    def irecv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> Work:
        self._check_alive()
        return self.inner.irecv(tensor, src, tag) if tag else self.inner.irecv(tensor, src)

    def batch_isend_irecv(self, ops: Sequence[P2POp]) -> list[Work]:
        with self._lock:
            actual: list[P2POp] = []
            owned: list[list[int] | None] = []  # per op: indices into actual's works
            for op in ops:
                if op.kind == "recv":
                    self._check_alive()
                    owned.append([len(actual)])
                    actual.append(op)
                    continue
                mine: list[int] = []

                def emit(t: torch.Tensor, op: P2POp = op, mine: list[int] = mine) -> Work:
                    mine.append(len(actual))
                    actual.append(dataclasses.replace(op, tensor=t))
                    return Work.done()

                self._send(op.tensor, op.peer, getattr(op, "tag", 0), "batch_isend_irecv",
                           emit)
                owned.append(mine)
            works = self.inner.batch_isend_irecv(actual) if actual else []
            return [Work.all_of([works[i] for i in idx]) if idx else Work.done() for idx in owned]

    def flush(self) -> list[Work]:
        """Deliver the messages held back by ``REORDER`` now (in the order they were held)."""
        with self._lock:
            self._check_alive()
            held, self._held = self._held, {}
            return [self._inner_isend(t, dst, tag) for (dst, tag), ts in held.items() for t in ts]

    # ------------------------------------------------------------------ collectives

    def _collective_faults(self, op: str, peers: Sequence[int | None]) -> list[Fault | None]:
        """Decide the fault of each message of a collective (one per entry of ``peers``).

        Kills at once on KILL; returns early with DROP last on a drop (the collective is lost).
        """
        faults: list[Fault | None] = []
        for peer in peers:
            index, fault = self._decide()
            if fault not in _COLLECTIVE_FAULTS:
                fault = None
            if fault is not None and fault not in (Fault.CORRUPT_HEADER, Fault.CORRUPT_BODY):
                self._record(index, op, peer, fault)
            if fault is Fault.KILL:
                self._kill()
            faults.append(fault)
            if fault is Fault.DROP:
                break
        return faults

    def _lose(self, kind: str, what: str) -> Work:
        """This rank does not contribute to a collective: its peers time out, so does it."""
        if isinstance(self.inner, InProcessTransport):
            self.inner._next(self.inner.channel + kind)  # keep later collectives matched
        return _lost(self.fabric, f"{what} on rank {self.rank}")

    def control(self) -> Transport:
        """The inner transport's control channel, without faults: faults hit data only."""
        return self.inner.control()

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor) -> Work:
        with self._lock:
            self._check_alive()
            if len(outputs) != self.world_size:
                raise ValueError(f"all_gather needs {self.world_size} outputs, "
                                 f"got {len(outputs)}")
            index = self._messages
            (fault,) = self._collective_faults("all_gather", [None])
            if fault is Fault.DROP:
                return self._lose("all_gather", "all_gather")
            if fault in (Fault.CORRUPT_HEADER, Fault.CORRUPT_BODY):
                copy = _corrupted(tensor, fault, self._rng)
                if copy is not None:
                    self._record(index, "all_gather", None, fault)
                    tensor = copy
            if fault is Fault.DELAY:
                time.sleep(self.plan.delay)
            return self.inner.all_gather(outputs, tensor)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
                          output_split_sizes: list[int], input_split_sizes: list[int]) -> Work:
        with self._lock:
            self._check_alive()
            if (len(input_split_sizes) != self.world_size
                    or len(output_split_sizes) != self.world_size):
                raise ValueError(f"all_to_all_single needs {self.world_size} split sizes per "
                                 f"side")
            input.split(list(input_split_sizes))  # bad splits raise before a message is used
            peers = [dst for dst in range(self.world_size) if dst != self.rank]
            first = self._messages
            faults = self._collective_faults("all_to_all_single", peers)
            if faults and faults[-1] is Fault.DROP:
                return self._lose("all_to_all", "all_to_all")
            copy: torch.Tensor | None = None
            for n, (dst, fault) in enumerate(zip(peers, faults)):
                if fault in (Fault.CORRUPT_HEADER, Fault.CORRUPT_BODY):
                    if copy is None:
                        copy = input.detach().contiguous().clone()
                    chunk = copy.split(list(input_split_sizes))[dst]
                    lo, hi = ((0, HEADER_BYTES) if fault is Fault.CORRUPT_HEADER
                              else (HEADER_BYTES, chunk.nbytes))
                    if _flip_bit(chunk, lo, hi, self._rng):
                        self._record(first + n, "all_to_all_single", dst, fault)
            delays = sum(fault is Fault.DELAY for fault in faults)
            if delays:
                time.sleep(delays * self.plan.delay)
            return self.inner.all_to_all_single(output, copy if copy is not None else input,
                                                output_split_sizes, input_split_sizes)


def faulty_world(world_size: int, plan: FaultPlan | None = None
                 ) -> tuple[Fabric, list[FaultyTransport]]:
    """A fabric of ``world_size`` virtual ranks and each rank's :class:`FaultyTransport`.

    Run a function on them with ``run_ranks(world_size, lambda t: fn(transports[t.rank]),
    fabric=fabric)``.
    """
    fabric = Fabric(world_size)
    return fabric, [FaultyTransport(fabric.transport(r), plan, fabric) for r in range(world_size)]
