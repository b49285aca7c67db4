"""The group's collectives, written once over a :class:`~.framing.Framing`: point-to-point,
all-gather (also asynchronous), ring pass and all-to-all, with the steps, sessions and
failed state they share. :class:`~compressed_comm.RawGroup` and
:class:`~compressed_comm.CompressedGroup` differ only in their framing (and the compressed
group's size handshake, :meth:`_GroupBase._agree`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from ..errors import GroupFailedError
from ..session import StreamKey
from ..transport import TorchDistTransport, Transport, Work
from .arguments import check_peer, gather_shapes, split_sizes
from .framing import Framing, Incoming, template
from .handle import Handle, forward_only
from .ledger import Entry, Ledger, Plan
from .posting import Posting
from .reductions import Reductions

__all__ = ["DEFAULT_TIMEOUT"]

T = TypeVar("T")

DEFAULT_TIMEOUT = 300.0


def _posted(incoming: dict[int, Incoming]) -> None:
    for i in incoming.values():
        i.posted()


def _like(shape: Sequence[int], x: torch.Tensor) -> torch.Tensor:
    """A zero-memory tensor with ``shape`` and ``x``'s dtype and device (a stream template)."""
    return template(shape, x.dtype, x.device)


class _GroupBase(Posting, Reductions):
    """What raw and compressed groups share: transport, timeouts, steps, sessions, the
    failed state, the ledger that lets :meth:`new_session` drain a failed session, and the
    collectives over the group's :attr:`framing`.

    Every collective is forward-only: inputs that require grad are detached, and results
    never carry autograd history."""

    framing: Framing

    def __init__(self, transport: Transport | dist.ProcessGroup | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        if transport is None or isinstance(transport, dist.ProcessGroup):
            transport = TorchDistTransport(transport)
        if not isinstance(transport, Transport):
            raise TypeError(f"expected a Transport, a ProcessGroup or None; got "
                            f"{type(transport).__name__}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout}")
        self.transport = transport
        self.timeout = float(timeout)
        self.rank = transport.rank
        self.world_size = transport.world_size
        self.step_index = 0
        #: counts the sessions this group has started (ranks agree on it)
        self.session_index = 0
        #: bytes and point-to-point messages this rank has sent in the current session; the
        #: size handshakes' messages are among them and also counted apart, since the caller
        #: waits for them before the payloads move, asynchronous or not
        self.bytes_sent = 0
        self.messages_sent = 0
        self.handshake_messages_sent = 0
        self._inflight: dict[StreamKey, list[Handle[Any]]] = {}
        self._failure: BaseException | None = None
        self._closed: str | None = None
        self._ledger = Ledger(self.world_size)
        self._plan = Plan()
        #: ``codec="auto"``: where the time of transfers waited on at once is reported
        self._link_meter: Any = None
        self._posted_at: dict[int, tuple[float, int]] = {}

    # ------------------------------------------------------------------ steps and sessions

    def step(self) -> None:
        """Mark the end of a denoising step."""
        self.step_index += 1

    @property
    def failed(self) -> BaseException | None:
        """The failure that stopped this group (None while it is usable)."""
        return self._failure

    def new_session(self, *, rebuild: bool = False) -> None:
        """Start a new request (all ranks together): end the current session and drop all
        per-request state.

        Transfers still in flight are cancelled (their handles raise
        :class:`~compressed_comm.CancelledError`) and their bytes drained, so no message of
        the old session can reach the new one; this also recovers a group that failed. The
        ranks exchange a few control messages to agree on what is left to drain. Raises
        :class:`~compressed_comm.GroupFailedError` if that is impossible (a peer is gone);
        the group is then closed for good.

        ``rebuild`` (every rank alike): first make fresh connections
        (:meth:`~compressed_comm.Transport.rebuild`) -- after a timeout or a broken
        connection, which a gloo group does not survive -- abandoning what the old ones
        carried instead of draining it.
        """
        self._check_open()
        self._cancel_inflight(f"rank {self.rank}: the transfer's session ended (new_session)")
        try:
            if rebuild:
                self.transport.rebuild()
                self._ledger.clear()
                self._plan.clear()
            if not self._end_session():
                return  # nothing to end: the session goes on
        except BaseException as e:
            self._closed = (f"new_session could not re-synchronise the ranks "
                            f"({type(e).__name__}: {e})")
            raise GroupFailedError(f"rank {self.rank}: {self._closed}; create a new group") from e
        self._ledger.clear()
        self._plan.clear()
        self._failure = None
        self.step_index = 0
        self.session_index += 1
        self.bytes_sent = self.messages_sent = self.handshake_messages_sent = 0
        self._reset()

    def _end_session(self) -> bool:
        """What ``new_session()`` does before dropping the session's state: drain it (its
        counts and sizes go over the data transport itself). False: there was nothing to
        end, the session goes on."""
        self._ledger.drain(self.transport, self.transport, self.timeout)
        return True

    def abort(self) -> None:
        """Close this group on this rank at once, without talking to its peers: pending
        handles are cancelled, state is dropped and every later call raises
        :class:`~compressed_comm.GroupFailedError`. For a rank that gives up (a peer died);
        its peers time out. Create a new group (and transport) to continue."""
        self._cancel_inflight(f"rank {self.rank}: the group was aborted")
        self._ledger.clear()
        self._plan.clear()
        self._closed = "the group was aborted"
        self._reset()

    def _cancel_inflight(self, why: str) -> None:
        for hs in self._inflight.values():
            for h in hs:
                h._cancel(why)
        self._inflight.clear()

    def _reset(self) -> None:
        """Drop per-request state (subclasses)."""

    def _check_open(self) -> None:
        if self._closed is not None:
            raise GroupFailedError(f"rank {self.rank}: {self._closed}; create a new group")

    def _check_usable(self) -> None:
        self._check_open()
        if self._failure is not None:
            e = self._failure
            raise GroupFailedError(
                f"rank {self.rank}: an earlier transfer failed ({type(e).__name__}: {e}); the "
                "group refuses work until new_session() on every rank (or abort())")

    def _fail(self, error: BaseException) -> None:
        if self._failure is None:
            self._failure = error

    def _guarded(self, op: Callable[[], T]) -> T:
        """Run ``op`` (which posts transfers) on a usable group; any failure fails the group,
        since its peers may be left waiting on a transfer this rank did not post."""
        self._check_usable()
        try:
            return op()
        except BaseException as e:
            self._fail(e)
            raise

    # the control plane's hooks (:mod:`.plane`; raw tensors have none: their sizes are
    # the caller's)

    def _admit(self, entry: Entry) -> bool:
        """Before a collective: whether it needs a handshake."""
        return False

    def _handshake(self, entry: Entry, step: int, send: list[int], recv: list[int]) -> None:
        """Agree with every rank on ``entry`` and the sizes each rank sends and expects."""

    def _entry_posted(self) -> None:
        """The collective admitted last was posted."""

    def _frame_error(self, what: str, frames: dict[int, tuple[int, int, str] | None]
                     ) -> BaseException | None:
        """The error the status frames received in a transfer stand for, if any."""
        return None

    def _received(self, what: str, bufs: dict[int, torch.Tensor]) -> None:
        """Raise what status frames among the received ``bufs`` (by origin) stand for."""
        frames = {o: self.framing.status(b) for o, b in bufs.items()}
        if any(f is not None for f in frames.values()):
            error = self._frame_error(what, frames)
            if error is not None:
                raise error

    # ------------------------------------------------------------------ the collectives

    def isend(self, x: torch.Tensor, dst: int, *, stream: str) -> Handle[None]:
        """Start sending ``x`` to ``dst`` on ``stream``."""
        check_peer(self.rank, self.world_size, dst, "destination")
        name = StreamKey("p2p", stream, dst)
        x = forward_only(x)
        return self._guarded(lambda: self._send_bytes(
            self.framing.sender(name, x).payload(), dst, name))

    def irecv(self, like: torch.Tensor, src: int, *, stream: str) -> Handle[torch.Tensor]:
        """Start receiving a tensor shaped like ``like`` from ``src`` on ``stream``."""
        check_peer(self.rank, self.world_size, src, "source")
        name = StreamKey("p2p", stream, self.rank)

        def start() -> Handle[torch.Tensor]:
            earlier = self._settled(name, {src: like}, self._earlier(name))
            incoming = self.framing.receiver(name, src, like)
            # where the transport allows, room for any message of the stream: one of an
            # unexpected size (a peer out of step) is then reported from its header
            short = self.transport.accepts_short_messages
            buf = self._buffer(incoming.room if short else incoming.nbytes, like.device)
            what = f"recv of stream {stream!r} from rank {src}"
            work = self._irecv(buf, src, what)
            incoming.posted()

            def finish(timeout: float) -> torch.Tensor:
                self._wait(work, timeout, what)
                return incoming.take(buf, exact=not short)
            return self._track(name, self._handle(finish, earlier))
        return self._guarded(start)

    def all_gather_async(self, x: torch.Tensor, *, stream: str,
                         shapes: Sequence[Sequence[int]] | None = None
                         ) -> Handle[list[torch.Tensor]]:
        """Start an all-gather of every rank's ``x``; ``wait()`` returns them in rank order.

        ``x`` is encoded now; the payloads are decoded at ``wait()``, which may come a step
        later (DistriFusion-style: issue at step t, use at step t+1). The caller's own slot is
        ``x`` itself. ``shapes`` gives each rank's shape when they differ (uneven patches).
        """
        x = forward_only(x)
        shapes = gather_shapes(self.rank, self.world_size, x, shapes)
        if self.world_size == 1:
            return Handle.completed([x])
        return self._guarded(lambda: self._all_gather(x, stream, shapes))

    def _all_gather(self, x: torch.Tensor, stream: str, shapes: list[tuple[int, ...]]
                    ) -> Handle[list[torch.Tensor]]:
        world, me = self.world_size, self.rank
        name = StreamKey("all_gather", stream)
        entry = Entry("all_gather", stream, tuple(shapes), x.dtype, x.device)
        handshake = self._admit(entry)
        earlier = self._settled(name, {o: _like(s, x) for o, s in enumerate(shapes)},
                                self._earlier(name))
        incoming = self._receivers(name, x, shapes)
        outgoing = self.framing.sender(name, x)
        sizes = [outgoing.nbytes if o == me else incoming[o].nbytes for o in range(world)]
        slot = max(sizes)
        if handshake:
            self._handshake(entry, outgoing.step, [slot] * world,
                            [slot if o != me else 0 for o in range(world)])
        what = f"all_gather of stream {stream!r}"
        work, outs = self._post_all_gather(what, outgoing.payload(), slot, x.device)
        _posted(incoming)
        self._entry_posted()

        def finish(timeout: float) -> list[torch.Tensor]:
            self._wait(work, timeout, what, ("all_gather", stream))
            got = {o: outs[o][: sizes[o]] for o in range(world) if o != me}
            self._received(what, got)
            return [x if o == me else incoming[o].take(got[o]) for o in range(world)]
        return self._track(name, self._handle(finish, earlier))

    def _post_all_gather(self, what: str, payload: torch.Tensor, slot: int,
                         device: torch.device) -> tuple[Work, list[torch.Tensor]]:
        """Post an all-gather of ``payload`` padded to ``slot`` bytes; its work and outputs."""
        world = self.world_size
        if slot != payload.numel():
            padded = torch.zeros(slot, dtype=torch.uint8, device=device)
            padded[: payload.numel()] = payload
            payload = padded
        outs = list(self._buffer(slot * world, device).view(world, slot))
        work = self._all_gather_op(what, payload, outs)
        self._sent(slot * (world - 1), world - 1)
        return work, outs

    def ring_iter(self, x: torch.Tensor, *, stream: str,
                  shapes: Sequence[Sequence[int]] | None = None
                  ) -> Iterator[tuple[int, torch.Tensor]]:
        """Pass every rank's ``x`` around the ring; yields ``(origin, tensor)`` per hop.

        The first item is ``(rank, x)``; then the blocks of ranks ``rank-1, rank-2, ...``.
        Each packet is forwarded unchanged and decoded once here with its origin's
        reference, so hops add no error. The next hop's transfer is in flight while the
        caller works on the current block. Iterate to the end: every rank must take part in
        every hop (a pass left unfinished is drained by ``new_session()``).
        """
        x = forward_only(x)
        shapes = gather_shapes(self.rank, self.world_size, x, shapes)
        if self.world_size == 1:
            yield self.rank, x
            return
        name = StreamKey("ring", stream)
        for h in self._earlier(name):
            h.wait()

        def start() -> tuple[dict[int, Incoming], torch.Tensor]:
            entry = Entry("ring", stream, tuple(shapes), x.dtype, x.device)
            handshake = self._admit(entry)
            incoming = self._receivers(name, x, shapes)
            outgoing = self.framing.sender(name, x)
            if handshake:
                self._handshake(entry, outgoing.step, [outgoing.nbytes] * self.world_size,
                                [0 if o == self.rank else incoming[o].nbytes
                                 for o in range(self.world_size)])
            return incoming, outgoing.payload()
        incoming, payload = self._guarded(start)
        yield from self._ring_hops(x, payload, stream, incoming)

    def all_to_all_async(self, x: torch.Tensor, *, stream: str,
                         input_split_sizes: Sequence[int] | None = None,
                         output_split_sizes: Sequence[int] | None = None
                         ) -> Handle[torch.Tensor]:
        """Start an all-to-all along dim 0 (Ulysses); ``wait()`` returns the output tensor.

        Split ``i`` of ``x`` (``input_split_sizes``, default equal) goes to rank ``i``; the
        output concatenates what every rank sent here (``output_split_sizes``, default the
        input's). Each ``(src, dst)`` chunk is its own residual stream; the own chunk is
        copied exactly.
        """
        x = forward_only(x)
        in_sizes, out_sizes = split_sizes(self.world_size, x, stream, input_split_sizes,
                                          output_split_sizes)
        if self.world_size == 1:
            return Handle.completed(x)
        return self._guarded(lambda: self._all_to_all(x, stream, in_sizes, out_sizes))

    def _all_to_all(self, x: torch.Tensor, stream: str, in_sizes: list[int],
                    out_sizes: list[int]) -> Handle[torch.Tensor]:
        world, me = self.world_size, self.rank
        rest = tuple(x.shape[1:])
        chunks = x.split(in_sizes, dim=0)
        send_name = {dst: StreamKey("all_to_all", stream, dst) for dst in range(world)}
        recv_name = send_name[me]
        entry = Entry("all_to_all", stream, (rest,), x.dtype, x.device,
                      (tuple(in_sizes), tuple(out_sizes)))
        handshake = self._admit(entry)
        likes = {src: _like((out_sizes[src], *rest), x) for src in range(world) if src != me}
        earlier = self._settled(recv_name, likes, self._earlier(recv_name))
        incoming = {src: self.framing.receiver(recv_name, src, like)
                    for src, like in likes.items()}
        outgoing = {dst: self.framing.sender(send_name[dst], chunks[dst])
                    for dst in range(world) if dst != me}
        recv_sizes = [0 if src == me else incoming[src].nbytes for src in range(world)]
        if handshake:
            # the group's step: with renewed streams, chunk streams may restart on some ranks
            self._handshake(entry, self.step_index,
                            [0 if d == me else outgoing[d].nbytes for d in range(world)],
                            recv_sizes)
        what = f"all_to_all of stream {stream!r}"
        work, received = self._post_all_to_all(
            what, [None if dst == me else outgoing[dst].payload() for dst in range(world)],
            recv_sizes, x.device)
        _posted(incoming)
        self._entry_posted()

        def finish(timeout: float) -> torch.Tensor:
            self._wait(work, timeout, what, ("all_to_all", stream))
            self._received(what, {src: received[src] for src in incoming})
            out = torch.empty((sum(out_sizes), *rest), dtype=x.dtype, device=x.device)
            for src, part in enumerate(out.split(out_sizes, dim=0)):
                part.copy_(chunks[me] if src == me else incoming[src].take(received[src]))
            return out
        return self._track(recv_name, self._handle(finish, earlier))

    def _post_all_to_all(self, what: str, payloads: list[torch.Tensor | None],
                         recv_sizes: list[int], device: torch.device
                         ) -> tuple[Work, list[torch.Tensor]]:
        """Post an all-to-all of ``payloads`` (None: this rank's own); its work and the
        received bytes by origin."""
        empty = torch.empty(0, dtype=torch.uint8, device=device)
        parts = [empty if p is None else p for p in payloads]
        recv_buf = self._buffer(sum(recv_sizes), device)
        send_buf = torch.cat(parts)
        work = self._all_to_all_op(what, send_buf, recv_buf, [p.numel() for p in parts],
                                   recv_sizes)
        self._sent(send_buf.numel(), self.world_size - 1)
        return work, list(recv_buf.split(recv_sizes))

    def send(self, x: torch.Tensor, dst: int, *, stream: str) -> None:
        """Send ``x`` to ``dst`` on ``stream`` and wait."""
        self.isend(x, dst, stream=stream).wait()

    def recv(self, like: torch.Tensor, src: int, *, stream: str) -> torch.Tensor:
        """Receive a tensor shaped like ``like`` from ``src`` on ``stream``."""
        return self.irecv(like, src, stream=stream).wait()

    def all_gather(self, x: torch.Tensor, *, stream: str,
                   shapes: Sequence[Sequence[int]] | None = None) -> list[torch.Tensor]:
        """All-gather every rank's ``x`` (own slot exact); see :meth:`all_gather_async`."""
        return self.all_gather_async(x, stream=stream, shapes=shapes).wait()

    def ring_pass(self, x: torch.Tensor, *, stream: str,
                  shapes: Sequence[Sequence[int]] | None = None) -> list[torch.Tensor]:
        """Every rank's ``x`` by ring passing, in rank order (same result as an all-gather)."""
        out: list[torch.Tensor] = [x] * self.world_size
        for origin, t in self.ring_iter(x, stream=stream, shapes=shapes):
            out[origin] = t
        return out

    def all_to_all(self, x: torch.Tensor, *, stream: str,
                   input_split_sizes: Sequence[int] | None = None,
                   output_split_sizes: Sequence[int] | None = None) -> torch.Tensor:
        """All-to-all along dim 0; see :meth:`all_to_all_async`."""
        return self.all_to_all_async(x, stream=stream, input_split_sizes=input_split_sizes,
                                     output_split_sizes=output_split_sizes).wait()

    # ------------------------------------------------------------------ helpers

    def _receivers(self, name: StreamKey, x: torch.Tensor, shapes: list[tuple[int, ...]]
                   ) -> dict[int, Incoming]:
        self.framing.expect(name, shapes)  # every origin's shape, before any is sized
        return {o: self.framing.receiver(name, o, _like(shapes[o], x))
                for o in range(self.world_size) if o != self.rank}
