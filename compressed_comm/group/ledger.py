"""The ledger of a session: what this rank posted on the transport, and the recovery that
completes or matches it when the session ends.

Every transfer a group posts is recorded here: work not yet waited on, the sizes of the
point-to-point messages sent to and receives posted from each peer, and the number of
collectives. :meth:`Ledger.drain` uses the records of every rank to end a session cleanly:
it completes what was posted and satisfies (or receives and drops) the point-to-point
messages one side posted and the other never matched, so that nothing of the old session
reaches the next one.
"""

from __future__ import annotations

import time

import torch

from ..errors import GroupFailedError
from ..transport import Transport, Work

__all__ = ["Ledger", "CONTROL_TAG"]

#: transport tag of the control messages a drain exchanges (data uses tag 0)
CONTROL_TAG = 0x4343


class Ledger:
    """What one rank has posted in the current session (see the module docstring)."""

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
        self.collectives = 0

    def record(self, work: Work, tensor: torch.Tensor) -> Work:
        """``work`` (on ``tensor``) was posted."""
        self.unwaited[id(work)] = work
        self.device = tensor.device
        return work

    def done(self, work: Work) -> None:
        """``work`` was waited on."""
        self.unwaited.pop(id(work), None)

    def drain(self, transport: Transport, timeout: float) -> None:
        """Complete (without decoding) every transfer of the ending session, and receive or
        satisfy the point-to-point messages one side posted and the other never matched.
        Every rank calls it; raises :class:`~compressed_comm.GroupFailedError` if the ranks
        issued different numbers of collectives (nothing can match those)."""
        world, me = self.world_size, transport.rank
        if world == 1:
            return
        peers = [p for p in range(world) if p != me]
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        def exchange(out: dict[int, torch.Tensor], into: dict[int, torch.Tensor]) -> None:
            works = [transport.isend(t, p, CONTROL_TAG) for p, t in out.items()]
            works += [transport.irecv(t, p, CONTROL_TAG) for p, t in into.items()]
            for w in works:
                w.wait(left())

        # 1. every rank's counts: p2p messages sent to / posted from each peer, collectives
        mine = torch.tensor([len(v) for v in self.sent] + [len(v) for v in self.posted]
                            + [self.collectives], dtype=torch.int64)
        got = {p: torch.empty_like(mine) for p in peers}
        exchange({p: mine for p in peers}, got)
        got[me] = mine
        sent = [[int(got[s][d]) for d in range(world)] for s in range(world)]
        posted = [[int(got[d][world + s]) for s in range(world)] for d in range(world)]
        collectives = [int(got[r][2 * world]) for r in range(world)]
        if len(set(collectives)) != 1:
            raise GroupFailedError(
                f"the ranks issued different numbers of collectives in the failed session "
                f"({dict(enumerate(collectives))}): the transport cannot be re-synchronised")

        # 2. per peer p: the sizes of my sends p never posted a receive for, then of my
        #    receives p never sent; both sides know how many of each
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
        exchange(out, into)
        # 3. satisfy the peers' unmatched receives, finish what was posted, then receive
        #    (and drop) the unmatched messages, in the order each link delivers them
        works = [transport.isend(self._zeros(size), p)
                 for p, sizes in into.items() for size in sizes[extra(p, me):].tolist()]
        for w in list(self.unwaited.values()):
            w.wait(left())
        works += [transport.irecv(self._zeros(size), p)
                  for p, sizes in into.items() for size in sizes[:extra(p, me)].tolist()]
        for w in works:
            w.wait(left())

    def _zeros(self, nbytes: int) -> torch.Tensor:
        return torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
