"""Posting bytes on the transport: every transfer of a group goes through these, so that
its ledger knows what ``new_session()`` has left to complete or drain, and every wait is
timed and names what it waited for."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

import torch

from ..errors import CommError
from ..stream import StreamKey
from ..transport import P2POp, Work
from .framing import Incoming
from .handle import Handle

if TYPE_CHECKING:
    from .collectives import _GroupBase

__all__ = ["Posting"]

T = TypeVar("T")


class Posting:
    """The transport operations of a group and its transfers in flight, by stream (mixed
    into :class:`~.collectives._GroupBase`)."""

    def _settled(self: _GroupBase, name: StreamKey, likes: dict[int, torch.Tensor],
                 earlier: list[Handle[Any]]) -> list[Handle[Any]]:
        """``earlier`` (the stream's transfers in flight), or none once they are complete
        where one of the streams ``(name, origin)`` is about to be renewed for
        ``likes[origin]``: they belong to the old stream."""
        if not earlier or all(self.framing.fits(name, o, t) for o, t in likes.items()):
            return earlier
        for h in earlier:
            h.wait()
        return []

    def _earlier(self: _GroupBase, name: StreamKey) -> list[Handle[Any]]:
        """The still-incomplete handles of stream ``name``, oldest first."""
        live = [h for h in self._inflight.get(name, ()) if not h.is_completed()]
        self._inflight[name] = live
        return list(live)

    def _track(self: _GroupBase, name: StreamKey, handle: Handle[T]) -> Handle[T]:
        self._inflight.setdefault(name, []).append(handle)
        return handle

    def _handle(self: _GroupBase, finish: Callable[[float], T], before: Sequence[Handle[Any]] = ()
                ) -> Handle[T]:
        return Handle(finish, self.timeout, before, group=self)

    @staticmethod
    def _buffer(nbytes: int, device: torch.device) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def _start(self: _GroupBase, what: str, op: Callable[..., T], *args: Any) -> T:
        try:
            return op(*args)
        except CommError as e:
            raise type(e)(f"rank {self.rank}: {what}: {e}") from e

    def _isend(self: _GroupBase, data: torch.Tensor, dst: int, what: str) -> Work:
        work = self._start(what, self.transport.isend, data, dst)
        self._ledger.sent[dst].append(data.numel())
        self._sent(data.numel(), 1)
        return self._ledger.record(work, data)

    def _irecv(self: _GroupBase, buf: torch.Tensor, src: int, what: str) -> Work:
        work = self._start(what, self.transport.irecv, buf, src)
        return self._ledger.receive(work, src, buf)

    def _batch(self: _GroupBase, ops: list[P2POp], what: str) -> list[Work]:
        works = self._start(what, self.transport.batch_isend_irecv, ops)
        for op, work in zip(ops, works):
            if op.kind == "send":
                self._ledger.sent[op.peer].append(op.tensor.numel())
                self._sent(op.tensor.numel(), 1)
                self._ledger.record(work, op.tensor)
            else:
                self._ledger.receive(work, op.peer, op.tensor)
                self._timed(work, op.tensor.numel())
        return works

    def _all_gather_op(self: _GroupBase, what: str, block: torch.Tensor,
                       outs: list[torch.Tensor]) -> Work:
        work = self._start(what, self.transport.all_gather, outs, block)
        self._ledger.collective("all_gather", [block.numel()] * self.world_size,
                                [block.numel()] * self.world_size)
        self._timed(work, block.numel() * (self.world_size - 1))
        return self._ledger.record(work, block)

    def _all_to_all_op(self: _GroupBase, what: str, send_buf: torch.Tensor, recv_buf: torch.Tensor,
                       send_sizes: list[int], recv_sizes: list[int]) -> Work:
        work = self._start(what, self.transport.all_to_all_single, recv_buf, send_buf,
                           recv_sizes, send_sizes)
        self._ledger.collective("all_to_all", send_sizes, recv_sizes)
        self._timed(work, send_buf.numel())
        return self._ledger.record(work, send_buf)

    def _timed(self: _GroupBase, work: Work, nbytes: int) -> None:
        """With a link meter (``codec="auto"``): note when ``work`` (``nbytes`` sent) was
        posted, so that :meth:`_wait` can report how long it took."""
        if self._link_meter is not None:
            self._posted_at[id(work)] = (time.perf_counter(), nbytes)

    def _wait(self: _GroupBase, work: Work, timeout: float, what: str,
              collective: tuple[str, str] | None = None) -> None:
        """Wait for ``work``. A timed transfer's time from post to completion is reported to
        the link meter where it is the link's: waited on at once (the wait began within a
        tenth of that time), or still in flight when the wait began after other work (it
        ended during the wait). One that was complete before its wait (asynchronous use,
        hidden behind compute) says only that the link was fast enough: not reported.

        The time from post to the wait's start -- compute the caller ran while the
        transfer was in flight -- is reported as hidden for ``collective`` (its operation
        and stream name; ``codec="auto"`` credits it, :meth:`~.autopolicy.Meter.hidden`)."""
        entered = time.perf_counter()
        try:
            work.wait(timeout)
        except CommError as e:
            self._ledger.failed(work)  # over, unsuccessfully: nothing to wait for in a drain
            self._posted_at.pop(id(work), None)
            raise type(e)(f"rank {self.rank}: {what}: {e}") from e
        self._ledger.done(work)
        posted = self._posted_at.pop(id(work), None)
        if posted is not None and self._link_meter is not None:
            elapsed = time.perf_counter() - posted[0]
            blocked = time.perf_counter() - entered
            if entered - posted[0] <= 0.1 * elapsed or blocked >= max(1e-4, 0.05 * elapsed):
                self._link_meter.transfer(posted[1], elapsed)
            if collective is not None:
                self._link_meter.hidden(*collective, entered - posted[0])

    def _send_bytes(self: _GroupBase, data: torch.Tensor, dst: int,
                    name: StreamKey) -> Handle[None]:
        """Start sending the uint8 buffer ``data`` to ``dst``; it stays alive until done."""
        what = f"send of stream {name.name!r} to rank {dst}"
        work = self._isend(data, dst, what)

        def finish(timeout: float, data: torch.Tensor = data) -> None:
            self._wait(work, timeout, what)
        return self._track(name, self._handle(finish))

    def _sent(self: _GroupBase, nbytes: int, messages: int) -> None:
        self.bytes_sent += nbytes
        self.messages_sent += messages

    def _ring_hops(self: _GroupBase, x: torch.Tensor, packet: torch.Tensor, stream: str,
                   incoming: dict[int, Incoming]) -> Iterator[tuple[int, torch.Tensor]]:
        """The hops of a ring pass of this rank's byte ``packet``: yields ``(rank, x)``, then
        ``(origin, tensor)`` per hop while the next hop is in flight; every received packet
        is forwarded unchanged. A failure fails the group."""
        world = self.world_size
        nxt, prv = (self.rank + 1) % world, (self.rank - 1) % world
        name = StreamKey("ring", stream)

        def post(packet: torch.Tensor, hop: int) -> tuple[int, torch.Tensor, Handle[None]]:
            origin = (self.rank - hop) % world
            buf = self._buffer(incoming[origin].nbytes, x.device)
            what = (f"ring pass of stream {stream!r}, hop {hop} of {world - 1}: block of rank "
                    f"{origin} sent to rank {nxt}, received from rank {prv}")
            works = self._guarded(lambda: self._batch(
                [P2POp("send", packet, nxt), P2POp("recv", buf, prv)], what))

            def finish(timeout: float) -> None:
                for w in works:
                    self._wait(w, timeout, what, ("ring", stream))
            return origin, buf, self._track(name, self._handle(finish))

        def forward_rest(pending: tuple[int, torch.Tensor, Handle[None]], hop: int) -> None:
            """After a failure at ``hop``: the rest of the pass still goes round (the
            peers downstream wait on it), forwarding what arrives unread."""
            for later in range(hop + 1, world):
                _, buf, handle = pending
                handle.wait()
                if later < world - 1:
                    pending = post(buf, later + 1)

        pending = post(packet, 1)
        for i in incoming.values():
            i.posted()
        self._entry_posted()
        yield self.rank, x
        for hop in range(1, world):
            origin, buf, handle = pending
            handle.wait()
            if hop < world - 1:
                pending = post(buf, hop + 1)  # forward unchanged while decoding
            try:
                self._check_usable()
                self._received(f"ring pass of stream {stream!r}", {origin: buf})
                block = incoming[origin].take(buf)
            except Exception as e:
                if hop < world - 1:
                    try:
                        forward_rest(pending, hop)
                    except Exception:  # noqa: BLE001 - the first error is the one to report
                        pass
                self._fail(e)
                raise
            yield origin, block
