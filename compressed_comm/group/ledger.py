"""The ledger: what a rank posted, step by step and in the whole session, and the drain that
ends a session.

* :class:`Entry` -- one collective of a step, described as every rank describes it alike
  (its kind, stream, shapes and dtype), with what this rank needs to post it again (its own
  all-to-all splits, the device).
* :class:`Plan` -- the collectives of the current step: those the previous step agreed on
  (:attr:`Plan.expected`: diffusion steps repeat their collectives, so a call that matches
  its expected entry needs no handshake), those agreed so far, and how many were posted.
  A rank that leaves a step early (it failed, or its peer did) posts the rest of the plan
  with status frames, so that no peer waits on a transfer it will never post.
* :class:`Ledger` -- every transfer posted in the session: work not yet waited on, the sizes
  of the point-to-point messages sent to and receives posted from each peer, and each
  collective with the bytes it sends to and expects from every rank. :meth:`Ledger.drain`
  ends a session: it completes what was posted, posts the collectives its peers posted and
  it did not (of the sizes they expect, with zeros: a collective a rank left by a timeout,
  say), and satisfies (or receives and drops) the point-to-point messages one side posted
  and the other never matched, so that nothing of the old session reaches the next one.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import CommTimeoutError
from ..transport import Transport, Work

__all__ = ["Entry", "Plan", "Ledger", "CONTROL_TAG"]

#: transport tag of the size messages a drain exchanges on the control channel
CONTROL_TAG = 0x4343
#: the collectives a ledger records, by code
_KINDS = ("all_gather", "all_to_all")


@dataclass(frozen=True)
class Entry:
    """One collective of a step (see the module docstring).

    ``shapes`` are every rank's shape (all-gather, ring pass) or the shape of a row
    (all-to-all); ``splits`` this rank's input and output splits (all-to-all). ``volatile``:
    its shapes changed within the session, so it is agreed by a handshake at every step.
    """

    kind: str
    stream: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    device: torch.device = field(default=torch.device("cpu"), compare=False)
    splits: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
    volatile: bool = field(default=False, compare=False)

    @property
    def common(self) -> str:
        """What every rank says of this entry alike."""
        return f"{self.kind}:{self.stream}:{self.shapes}:{self.dtype}"

    def __str__(self) -> str:
        return f"{self.kind} of stream {self.stream!r}"

    def described(self) -> str:
        """This entry with its shapes (and this rank's splits), for messages."""
        splits = (f", splits {list(self.splits[0])} -> {list(self.splits[1])}"
                  if self.kind == "all_to_all" else "")
        return f"{self} (shapes {list(self.shapes)}, {self.dtype}{splits})"


def digest(entries: Sequence[Entry]) -> int:
    """A CRC-32 of what every rank says of ``entries`` alike."""
    return zlib.crc32("|".join(e.common for e in entries).encode())


class Plan:
    """The collectives of the current step (see the module docstring)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """A new session: nothing agreed."""
        #: the collectives the previous step agreed on
        self.expected: list[Entry] = []
        #: this step's collectives agreed so far, in order
        self.entries: list[Entry] = []
        #: how many of :attr:`entries` were posted
        self.posted = 0

    def next_expected(self) -> Entry | None:
        """The entry the previous step had where this step's next collective stands."""
        n = len(self.entries)
        return self.expected[n] if n < len(self.expected) else None

    def rest(self) -> list[Entry]:
        """What this rank has yet to post of the step: its agreed entries not posted, then
        the expected entries after them."""
        return self.entries[self.posted:] + self.expected[len(self.entries):]

    def end_step(self) -> None:
        """The step's entries are agreed by every rank: the next step's expectation."""
        self.expected, self.entries, self.posted = self.entries, [], 0


class Ledger:
    """Every transfer posted in the current session (see the module docstring)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.device = torch.device("cpu")
        self.clear()

    def clear(self) -> None:
        """Forget everything (a new session)."""
        #: transport work not yet waited on, in the order it was posted
        self.unwaited: dict[int, Work] = {}
        #: sizes of the p2p messages sent to / receives posted from each peer
        self.sent: list[list[int]] = [[] for _ in range(self.world_size)]
        self.posted: list[list[int]] = [[] for _ in range(self.world_size)]
        self._receives: list[list[int]] = [[] for _ in range(self.world_size)]  # work ids
        #: the collectives posted, in order: kind, bytes sent to and expected from each rank
        self.records: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

    @property
    def collectives(self) -> int:
        """How many collectives were posted in the session."""
        return len(self.records)

    @property
    def empty(self) -> bool:
        """Whether nothing was posted in the session."""
        return not (self.records or any(self.sent) or any(self.posted))

    def collective(self, kind: str, send: Sequence[int], recv: Sequence[int]) -> None:
        """A collective of ``kind`` was posted, sending ``send[r]`` bytes to and expecting
        ``recv[r]`` from each rank ``r``."""
        self.records.append((kind, tuple(send), tuple(recv)))

    def record(self, work: Work, tensor: torch.Tensor) -> Work:
        """``work`` (on ``tensor``) was posted."""
        self.unwaited[id(work)] = work
        self.device = tensor.device
        return work

    def receive(self, work: Work, src: int, buf: torch.Tensor) -> Work:
        """``work``, a receive from ``src`` into ``buf``, was posted."""
        self.posted[src].append(buf.numel())
        self._receives[src].append(id(work))
        return self.record(work, buf)

    def done(self, work: Work) -> None:
        """``work`` was waited on."""
        self.unwaited.pop(id(work), None)

    def failed(self, work: Work) -> None:
        """``work``'s wait failed (a timeout): it is over, and a receive it was took no
        message, so the next message on its link goes to the next receive."""
        self.done(work)
        for src, ids in enumerate(self._receives):
            if id(work) in ids:
                i = ids.index(id(work))
                del ids[i], self.posted[src][i]

    def counts(self) -> tuple[list[int], list[int]]:
        """Point-to-point messages sent to, and receives posted from, each peer."""
        return [len(v) for v in self.sent], [len(v) for v in self.posted]

    def drain(self, transport: Transport, control: Transport, timeout: float,
              sent: Sequence[Sequence[int]] | None = None,
              posted: Sequence[Sequence[int]] | None = None,
              collectives: Sequence[int] | None = None) -> None:
        """Complete (without decoding) every transfer of the ending session, and receive or
        satisfy the point-to-point messages one side posted and the other never matched.
        Every rank calls it. ``sent[s][d]``, ``posted[d][s]`` and ``collectives[r]`` are the
        counts of every rank (exchanged on ``control`` here when not given)."""
        world, me = self.world_size, transport.rank
        if world == 1:
            return
        peers = [p for p in range(world) if p != me]
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        def swap(out: dict[int, torch.Tensor], into: dict[int, torch.Tensor]) -> None:
            works = [control.isend(t, p, CONTROL_TAG) for p, t in out.items()]
            works += [control.irecv(t, p, CONTROL_TAG) for p, t in into.items()]
            for w in works:
                w.wait(left())

        if sent is None or posted is None or collectives is None:
            # every rank's counts: p2p messages sent to / posted from each peer, collectives
            mine = torch.tensor([len(v) for v in self.sent] + [len(v) for v in self.posted]
                                + [self.collectives], dtype=torch.int64)
            got = {p: torch.empty_like(mine) for p in peers}
            swap({p: mine for p in peers}, got)
            got[me] = mine
            sent = [[int(got[s][d]) for d in range(world)] for s in range(world)]
            posted = [[int(got[d][world + s]) for s in range(world)] for d in range(world)]
            collectives = [int(got[r][2 * world]) for r in range(world)]
        dummies = self._match_collectives(transport, swap, list(collectives))

        # per peer p: the sizes of my sends p never posted a receive for, then of my
        # receives p never sent; both sides know how many of each
        def extra(src: int, dst: int) -> int:
            return max(0, sent[src][dst] - posted[dst][src])

        out, into = {}, {}
        for p in peers:
            sizes = (self.sent[p][posted[p][me]:sent[me][p]]
                     + self.posted[p][sent[p][me]:posted[me][p]])
            if sizes:
                out[p] = torch.tensor(sizes, dtype=torch.int64)
            n = extra(p, me) + max(0, posted[p][me] - sent[me][p])
            if n:
                into[p] = torch.empty(n, dtype=torch.int64)
        swap(out, into)

        def room(p: int, size: int) -> int:
            # where the transport takes shorter messages: room for any message of the link
            # (a repeated one, say), no smaller than the receives posted on it
            return max([size] + self.posted[p]) if transport.accepts_short_messages else size
        # satisfy the peers' unmatched receives, finish what was posted, then receive (and
        # drop) the unmatched messages, in the order each link delivers them
        works = [transport.isend(self._zeros(size), p)
                 for p, sizes in into.items() for size in sizes[extra(p, me):].tolist()]
        receives = {i for ids in self._receives for i in ids}
        for key, w in list(self.unwaited.items()):
            if key not in receives:
                w.wait(left())
        for w in dummies + works:
            w.wait(left())
        leftovers = [transport.irecv(self._zeros(room(p, size)), p)
                     for p, sizes in into.items() for size in sizes[:extra(p, me)].tolist()]
        # a message sent but lost in transit never comes: one timeout for all of them
        lost = min(deadline, time.monotonic() + timeout)
        for w in [w for k, w in self.unwaited.items() if k in receives] + leftovers:
            try:
                w.wait(max(0.0, lost - time.monotonic()))
            except CommTimeoutError:
                continue

    def _match_collectives(self, transport: Transport,
                           swap: Callable[[dict[int, torch.Tensor], dict[int, torch.Tensor]], None],
                           counts: list[int]) -> list[Work]:
        """Post, with zeros, the collectives peers posted and this rank did not, in their
        order and of the sizes they expect; every rank sends its records past the fewest
        any rank has to every peer first."""
        world, me = self.world_size, transport.rank
        low, high = min(counts), max(counts)
        if low == high:
            return []
        width = 1 + 2 * world

        def rows(records: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]]
                 ) -> torch.Tensor:
            return torch.tensor([[_KINDS.index(k), *s, *r] for k, s, r in records],
                                dtype=torch.int64).view(-1, width)
        peers = [p for p in range(world) if p != me]
        mine = rows(self.records[low:])
        theirs = {p: torch.empty(counts[p] - low, width, dtype=torch.int64) for p in peers
                  if counts[p] > low}
        swap({p: mine for p in peers} if mine.numel() else {}, theirs)
        theirs[me] = mine
        works = []
        for i in range(counts[me], high):
            leaders = {p: theirs[p][i - low].tolist() for p in theirs if counts[p] > i}
            kind = _KINDS[next(iter(leaders.values()))[0]]
            if kind == "all_gather":
                slot = next(iter(leaders.values()))[1]
                outs = list(self._zeros(slot * world).view(world, slot))
                works.append(transport.all_gather(outs, self._zeros(slot)))
            else:  # what I send to p is what p expects from me, and the other way round
                send = [leaders[p][1 + world + me] if p in leaders else 0 for p in range(world)]
                recv = [leaders[p][1 + me] if p in leaders else 0 for p in range(world)]
                works.append(transport.all_to_all_single(self._zeros(sum(recv)),
                                                         self._zeros(sum(send)), recv, send))
        return works

    def _zeros(self, nbytes: int) -> torch.Tensor:
        return torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
