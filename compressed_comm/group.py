"""CompressedGroup: stateful compressed collectives over a transport (RawGroup: uncompressed).

Every collective names a *stream* (say ``"layer7.k"``); the group derives one residual
stream per flow of data from it -- per origin for all-gathers and ring passes, per
``(src, dst)`` pair for point-to-point and all-to-all -- and keeps them in a
:class:`~compressed_comm.Session`. Payload sizes follow from shapes, dtype, codec and step,
so receivers preallocate and no size handshake is ever sent.

All ranks must issue the same collectives on the same streams in the same order, as with
any ``torch.distributed`` code. Tensors returned by the collectives (other than the caller's
own) are the streams' references: they are updated in place by the stream's next message,
so clone them to keep them across steps.
"""

from __future__ import annotations

import math
import struct
import time
import weakref
import zlib
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from .config import SHARED_FIELDS, CompressionConfig, differing_fields
from .errors import CancelledError, CommError, GroupFailedError, WireFormatError
from .session import Session, SessionStats, StreamKey
from .stream import StreamDecoder
from .transport import P2POp, TorchDistTransport, Transport, Work
from .wire import announced_payload

__all__ = ["CompressedGroup", "RawGroup", "Handle", "handshake_nbytes"]

T = TypeVar("T")

DEFAULT_TIMEOUT = 300.0
#: transport tag of the control messages new_session exchanges (data uses tag 0)
CONTROL_TAG = 0x4343
#: a collective's size handshake block: magic, session, stream CRC, step, the config's
#: fingerprint (a CRC-32 per shared field), pad; then 2 x world uint64 sizes (sent to,
#: expected from, each rank)
_HANDSHAKE = struct.Struct(f"<4sIII{len(SHARED_FIELDS)}I{-4 * len(SHARED_FIELDS) % 8}x")
_HANDSHAKE_MAGIC = b"CCHS"


def handshake_nbytes(world_size: int) -> int:
    """Bytes each rank contributes to the size handshake before a compressed collective."""
    return _HANDSHAKE.size + 16 * world_size


class Handle(Generic[T]):
    """A compressed transfer in flight; :meth:`wait` completes it and returns the result.

    Waiting twice returns the same result (or raises the same error). Handles of one stream
    complete in the order they were started: waiting on a newer one first completes the
    older ones, whose results are then kept as copies (the stream's reference moves on).
    A handle whose session ended (``new_session()``, ``abort()``) before it was waited on
    raises :class:`~compressed_comm.CancelledError`.
    """

    __slots__ = ("_finish", "_result", "_error", "_before", "_timeout", "_group")

    def __init__(self, finish: Callable[[float], T], timeout: float,
                 before: Sequence[Handle[Any]] = (), group: _GroupBase | None = None) -> None:
        self._finish: Callable[[float], T] | None = finish
        self._result: T | None = None
        self._error: BaseException | None = None
        self._before = list(before)
        self._timeout = timeout
        # weak: a group and the handles it tracks must not keep each other alive (a cycle
        # would leave the process group to the collector at interpreter exit, when gloo's
        # threads can no longer release tensors safely)
        self._group = None if group is None else weakref.ref(group)

    @classmethod
    def completed(cls, result: T) -> Handle[T]:
        """A handle that is already done."""
        h: Handle[T] = cls(lambda _t: result, 0.0)
        h.wait()
        return h

    def is_completed(self) -> bool:
        """Whether the transfer is over: waited on, failed or cancelled."""
        return self._finish is None

    def wait(self, timeout: float | None = None) -> T:
        """Complete the transfer (raising on timeout or error) and return its result."""
        if self._finish is not None:
            group = self._group() if self._group is not None else None
            if group is not None:
                group._check_usable()
            for older in self._before:
                if not older.is_completed():
                    older.wait(timeout)
                    older._result = _snapshot(older._result)
            finish, self._finish, self._before = self._finish, None, []
            try:
                self._result = finish(self._timeout if timeout is None else timeout)
            except BaseException as e:
                self._error = e
                if group is not None:
                    group._fail(e)
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def _cancel(self, why: str) -> None:
        if self._finish is not None:
            self._finish, self._before = None, []
            self._error = CancelledError(why)


def _forward_only(x: torch.Tensor) -> torch.Tensor:
    """``x`` detached if it requires grad (compression is forward-only), else ``x`` itself."""
    return x.detach() if x.requires_grad else x


def _snapshot(result: Any) -> Any:
    """A copy of a result that outlives the next update of the stream's reference."""
    if isinstance(result, torch.Tensor):
        return result.clone()
    if isinstance(result, list):
        return [_snapshot(r) for r in result]
    return result


def _like(shape: Sequence[int], x: torch.Tensor) -> torch.Tensor:
    """A zero-memory tensor with ``shape`` and ``x``'s dtype and device (a stream template)."""
    return torch.empty((), dtype=x.dtype, device=x.device).expand(tuple(shape))


class _GroupBase:
    """What raw and compressed groups share: transport, timeouts, steps, sessions, the
    failed state and the bookkeeping that lets :meth:`new_session` drain a failed one.

    Every collective is forward-only: inputs that require grad are detached, and results
    never carry autograd history."""

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
        self._clear_ledger()

    def _clear_ledger(self) -> None:
        #: transport work not yet waited on, in the order it was posted
        self._unwaited: dict[int, Work] = {}
        #: sizes of the p2p messages sent to / receives posted from each peer this session
        self._p2p_sent: list[list[int]] = [[] for _ in range(self.world_size)]
        self._p2p_posted: list[list[int]] = [[] for _ in range(self.world_size)]
        self._collectives = 0

    # ------------------------------------------------------------------ steps and sessions

    def step(self) -> None:
        """Mark the end of a denoising step."""
        self.step_index += 1

    @property
    def failed(self) -> BaseException | None:
        """The failure that stopped this group (None while it is usable)."""
        return self._failure

    def new_session(self) -> None:
        """Start a new request (all ranks together): end the current session and drop all
        per-request state.

        Transfers still in flight are cancelled (their handles raise
        :class:`~compressed_comm.CancelledError`) and their bytes drained, so no message of
        the old session can reach the new one; this also recovers a group that failed. The
        ranks exchange a few control messages to agree on what is left to drain. Raises
        :class:`~compressed_comm.GroupFailedError` if that is impossible (a peer is gone, or
        the ranks issued different collectives); the group is then closed for good.
        """
        self._check_open()
        why = f"rank {self.rank}: the transfer's session ended (new_session)"
        for hs in self._inflight.values():
            for h in hs:
                h._cancel(why)
        try:
            self._drain()
        except BaseException as e:
            self._closed = (f"new_session could not re-synchronise the ranks "
                            f"({type(e).__name__}: {e})")
            raise GroupFailedError(f"rank {self.rank}: {self._closed}; create a new group") from e
        self._inflight.clear()
        self._clear_ledger()
        self._failure = None
        self.step_index = 0
        self.session_index += 1
        self.bytes_sent = self.messages_sent = self.handshake_messages_sent = 0
        self._reset()

    def abort(self) -> None:
        """Close this group on this rank at once, without talking to its peers: pending
        handles are cancelled, state is dropped and every later call raises
        :class:`~compressed_comm.GroupFailedError`. For a rank that gives up (a peer died);
        its peers time out. Create a new group (and transport) to continue."""
        for hs in self._inflight.values():
            for h in hs:
                h._cancel(f"rank {self.rank}: the group was aborted")
        self._inflight.clear()
        self._clear_ledger()
        self._closed = "the group was aborted"
        self._reset()

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

    def _drain(self) -> None:
        """Complete (without decoding) every transfer of the ending session, and receive or
        satisfy the point-to-point messages one side posted and the other never matched."""
        world, me = self.world_size, self.rank
        if world == 1:
            return
        peers = [p for p in range(world) if p != me]
        deadline = time.monotonic() + self.timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        def exchange(out: dict[int, torch.Tensor], into: dict[int, torch.Tensor]) -> None:
            works = [self.transport.isend(t, p, CONTROL_TAG) for p, t in out.items()]
            works += [self.transport.irecv(t, p, CONTROL_TAG) for p, t in into.items()]
            for w in works:
                w.wait(left())

        # 1. every rank's counts: p2p messages sent to / posted from each peer, collectives
        mine = torch.tensor([len(v) for v in self._p2p_sent] + [len(v) for v in self._p2p_posted]
                            + [self._collectives], dtype=torch.int64)
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
            sizes = (self._p2p_sent[p][posted[p][me]:sent[me][p]]
                     + self._p2p_posted[p][sent[p][me]:posted[me][p]])
            if sizes:
                out[p] = torch.tensor(sizes, dtype=torch.int64)
            n = extra(p, me) + max(0, posted[p][me] - sent[me][p])
            if n:
                into[p] = torch.empty(n, dtype=torch.int64)
        exchange(out, into)
        # 3. satisfy the peers' unmatched receives, finish what was posted, then receive
        #    (and drop) the unmatched messages, in the order each link delivers them
        works = [self.transport.isend(self._control_buffer(size), p)
                 for p, sizes in into.items() for size in sizes[extra(p, me):].tolist()]
        for w in list(self._unwaited.values()):
            w.wait(left())
        works += [self.transport.irecv(self._control_buffer(size), p)
                  for p, sizes in into.items() for size in sizes[:extra(p, me)].tolist()]
        for w in works:
            w.wait(left())

    def _control_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.zeros(nbytes, dtype=torch.uint8, device=self._device)

    _device = torch.device("cpu")

    # ------------------------------------------------------------------ the collectives

    def isend(self, x: torch.Tensor, dst: int, *, stream: str) -> Handle[None]:
        """Start sending ``x`` to ``dst`` on ``stream``."""
        raise NotImplementedError

    def irecv(self, like: torch.Tensor, src: int, *, stream: str) -> Handle[torch.Tensor]:
        """Start receiving a tensor shaped like ``like`` from ``src`` on ``stream``."""
        raise NotImplementedError

    def all_gather_async(self, x: torch.Tensor, *, stream: str,
                         shapes: Sequence[Sequence[int]] | None = None
                         ) -> Handle[list[torch.Tensor]]:
        """Start an all-gather of every rank's ``x``; ``wait()`` returns them in rank order."""
        raise NotImplementedError

    def ring_iter(self, x: torch.Tensor, *, stream: str,
                  shapes: Sequence[Sequence[int]] | None = None
                  ) -> Iterator[tuple[int, torch.Tensor]]:
        """Pass every rank's ``x`` around the ring; yields ``(origin, tensor)`` per hop."""
        raise NotImplementedError

    def all_to_all_async(self, x: torch.Tensor, *, stream: str,
                         input_split_sizes: Sequence[int] | None = None,
                         output_split_sizes: Sequence[int] | None = None
                         ) -> Handle[torch.Tensor]:
        """Start an all-to-all along dim 0; ``wait()`` returns the output tensor."""
        raise NotImplementedError

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

    def reduce_scatter_async(self, x: torch.Tensor, *, stream: str, op: str = "sum",
                             input_split_sizes: Sequence[int] | None = None
                             ) -> Handle[torch.Tensor]:
        """Start a reduce-scatter along dim 0: split ``i`` of ``x`` (``input_split_sizes``,
        default equal) is summed (``op="sum"``) or averaged (``"avg"``) over the ranks onto
        rank ``i``; ``wait()`` returns this rank's reduced split.

        Each ``(src, dst)`` split is its own residual stream, as in :meth:`all_to_all_async`;
        the owner adds its own exact split and the others' reconstructions in rank order, in
        float32, so the result does not depend on arrival order.
        """
        average = _reduce_op(op, stream)
        x = _forward_only(x)
        in_sizes, _ = self._splits(x, stream, input_split_sizes, None)
        world, mine = self.world_size, in_sizes[self.rank]
        parts = self.all_to_all_async(x, stream=stream, input_split_sizes=in_sizes,
                                      output_split_sizes=[mine] * world)

        def reduce(timeout: float) -> torch.Tensor:
            stacked = parts.wait(timeout).view(world, mine, *x.shape[1:])
            total = stacked[0].float()
            for part in stacked[1:]:
                total += part.float()
            return (total / world if average else total).to(x.dtype)
        return self._handle(reduce)

    def reduce_scatter(self, x: torch.Tensor, *, stream: str, op: str = "sum",
                       input_split_sizes: Sequence[int] | None = None) -> torch.Tensor:
        """Reduce-scatter along dim 0; see :meth:`reduce_scatter_async`."""
        return self.reduce_scatter_async(x, stream=stream, op=op,
                                         input_split_sizes=input_split_sizes).wait()

    def all_reduce(self, x: torch.Tensor, *, stream: str, op: str = "sum") -> torch.Tensor:
        """The sum (``op="sum"``) or average (``"avg"``) of every rank's ``x``, the same on
        every rank: a reduce-scatter of the rows of ``x`` viewed ``(N, C)`` (see
        :meth:`reduce_scatter_async`; rank ``i`` owns the ``i``-th of ``world`` near-equal
        row blocks) and an all-gather of the reduced blocks, each rank taking the
        reconstruction of its own block, as its peers do."""
        _reduce_op(op, stream)
        x = _forward_only(x)
        if self.world_size == 1:
            return x.clone()
        world = self.world_size
        flat = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
        rows = [flat.shape[0] // world + (r < flat.shape[0] % world) for r in range(world)]
        mine = self.reduce_scatter(flat, stream=f"{stream}.reduce", op=op,
                                   input_split_sizes=rows)
        shapes = [(n, flat.shape[1]) for n in rows]
        gathered = self.all_gather(mine, stream=f"{stream}.gather", shapes=shapes)
        gathered[self.rank] = self._reconstruction(f"{stream}.gather", mine)
        result = torch.cat(gathered).view(x.shape)
        self._account_reduction(stream, flat.split(rows), mine, result)
        return result

    def _reconstruction(self, stream: str, x: torch.Tensor) -> torch.Tensor:
        """What this rank's peers received of ``x``, its last message on all-gather ``stream``."""
        return x

    def _account_reduction(self, stream: str, blocks: Sequence[torch.Tensor],
                           reduced: torch.Tensor, result: torch.Tensor) -> None:
        """Record the error of an all_reduce's result (compressed groups with track_error)."""

    # ------------------------------------------------------------------ helpers

    def _check_peer(self, peer: int, role: str) -> None:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(f"rank {self.rank}: {role} rank {peer} is not another rank of "
                             f"this group of {self.world_size}")

    def _shapes(self, x: torch.Tensor, shapes: Sequence[Sequence[int]] | None
                ) -> list[tuple[int, ...]]:
        if shapes is None:
            return [tuple(x.shape)] * self.world_size
        out = [tuple(int(d) for d in s) for s in shapes]
        if len(out) != self.world_size or out[self.rank] != tuple(x.shape):
            raise ValueError(f"rank {self.rank}: shapes must list {self.world_size} shapes with "
                             f"this rank's equal to {tuple(x.shape)}; got {out}")
        return out

    def _earlier(self, name: StreamKey) -> list[Handle[Any]]:
        """The still-incomplete handles of stream ``name``, oldest first."""
        live = [h for h in self._inflight.get(name, ()) if not h.is_completed()]
        self._inflight[name] = live
        return list(live)

    def _track(self, name: StreamKey, handle: Handle[T]) -> Handle[T]:
        self._inflight.setdefault(name, []).append(handle)
        return handle

    def _handle(self, finish: Callable[[float], T], before: Sequence[Handle[Any]] = ()
                ) -> Handle[T]:
        return Handle(finish, self.timeout, before, group=self)

    @staticmethod
    def _buffer(nbytes: int, device: torch.device) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    # posting and waiting: every transfer goes through these, so that new_session knows
    # what is left to complete or drain

    def _start(self, what: str, op: Callable[..., T], *args: Any) -> T:
        try:
            return op(*args)
        except CommError as e:
            raise type(e)(f"rank {self.rank}: {what}: {e}") from e

    def _posted(self, work: Work, tensor: torch.Tensor) -> Work:
        self._unwaited[id(work)] = work
        self._device = tensor.device
        return work

    def _isend(self, data: torch.Tensor, dst: int, what: str) -> Work:
        work = self._start(what, self.transport.isend, data, dst)
        self._p2p_sent[dst].append(data.numel())
        self._sent(data.numel(), 1)
        return self._posted(work, data)

    def _irecv(self, buf: torch.Tensor, src: int, what: str) -> Work:
        work = self._start(what, self.transport.irecv, buf, src)
        self._p2p_posted[src].append(buf.numel())
        return self._posted(work, buf)

    def _batch(self, ops: list[P2POp], what: str) -> list[Work]:
        works = self._start(what, self.transport.batch_isend_irecv, ops)
        for op, work in zip(ops, works):
            if op.kind == "send":
                self._p2p_sent[op.peer].append(op.tensor.numel())
                self._sent(op.tensor.numel(), 1)
            else:
                self._p2p_posted[op.peer].append(op.tensor.numel())
            self._posted(work, op.tensor)
        return works

    def _collective(self, what: str, op: Callable[..., Work], tensor: torch.Tensor,
                    *args: Any) -> Work:
        work = self._start(what, op, *args)
        self._collectives += 1
        return self._posted(work, tensor)

    def _wait(self, work: Work, timeout: float, what: str) -> None:
        try:
            work.wait(timeout)
        except CommError as e:
            raise type(e)(f"rank {self.rank}: {what}: {e}") from e
        self._unwaited.pop(id(work), None)

    def _ring_hops(self, x: torch.Tensor, packet: torch.Tensor, stream: str,
                   buffer_for: Callable[[int], torch.Tensor],
                   decode: Callable[[int, torch.Tensor], torch.Tensor]
                   ) -> Iterator[tuple[int, torch.Tensor]]:
        """The hops of a ring pass of this rank's byte ``packet``: yields ``(rank, x)``, then
        ``(origin, decode(origin, bytes))`` per hop while the next hop is in flight; every
        received packet is forwarded unchanged. A failure fails the group."""
        world = self.world_size
        nxt, prv = (self.rank + 1) % world, (self.rank - 1) % world
        name = StreamKey("ring", stream)

        def post(packet: torch.Tensor, hop: int) -> tuple[int, torch.Tensor, Handle[None]]:
            origin = (self.rank - hop) % world
            buf = buffer_for(origin)
            what = (f"ring pass of stream {stream!r}, hop {hop} of {world - 1}: block of rank "
                    f"{origin} sent to rank {nxt}, received from rank {prv}")
            works = self._guarded(lambda: self._batch(
                [P2POp("send", packet, nxt), P2POp("recv", buf, prv)], what))

            def finish(timeout: float) -> None:
                for w in works:
                    self._wait(w, timeout, what)
            return origin, buf, self._track(name, self._handle(finish))

        pending = post(packet, 1)
        yield self.rank, x
        for hop in range(1, world):
            origin, buf, handle = pending
            handle.wait()
            if hop < world - 1:
                pending = post(buf, hop + 1)  # forward unchanged while decoding
            yield origin, self._guarded(lambda: decode(origin, buf))

    def _send_bytes(self, data: torch.Tensor, dst: int, stream: str) -> Handle[None]:
        """Start sending the uint8 buffer ``data`` to ``dst``; it stays alive until done."""
        what = f"send of stream {stream!r} to rank {dst}"
        work = self._isend(data, dst, what)

        def finish(timeout: float, data: torch.Tensor = data) -> None:
            self._wait(work, timeout, what)
        return self._track(StreamKey("send", stream, dst), self._handle(finish))

    def _sent(self, nbytes: int, messages: int) -> None:
        self.bytes_sent += nbytes
        self.messages_sent += messages

    def _splits(self, x: torch.Tensor, stream: str, input_split_sizes: Sequence[int] | None,
                output_split_sizes: Sequence[int] | None) -> tuple[list[int], list[int]]:
        """Validated all-to-all split sizes along dim 0 (default: equal splits both ways)."""
        world = self.world_size
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


class CompressedGroup(_GroupBase):
    """Compressed send/recv, all-gather, ring pass and all-to-all with residual state.

    ``CompressedGroup(transport_or_process_group, config, timeout=300.0)``: the first
    argument is a :class:`~compressed_comm.Transport`, a ``torch.distributed`` process group,
    or None for the default group. Every blocking wait is bounded by ``timeout`` seconds and
    raises :class:`~compressed_comm.CommTimeoutError` naming the stream and peer.

    A stream keeps the shape and dtype of its first tensor: another one raises
    :class:`~compressed_comm.StreamMismatchError`, unless ``renew_streams=True`` (for callers
    whose stream names do not say the shape, like the drop-in group): the stream then starts
    afresh with a keyframe, its old state freed. Every rank sees the change at the same call
    (the shapes of a collective are known to all its ranks), so all renew alike.

    Compression is forward-only: inputs that require grad are detached.

    Mark denoising steps with :meth:`step`, and start each request (generation) with
    :meth:`new_session`; ranks must do both in lock-step.
    """

    def __init__(self, transport: Transport | dist.ProcessGroup | None = None,
                 config: CompressionConfig | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, renew_streams: bool = False) -> None:
        super().__init__(transport, timeout=timeout)
        self.config = config or CompressionConfig()
        #: a stream whose tensors change shape or dtype starts afresh (a keyframe, its old
        #: state freed) instead of raising StreamMismatchError
        self.renew_streams = bool(renew_streams)
        # groups made on one transport are numbered in creation order (the same on every
        # rank); the number keeps their streams apart even where their names coincide
        index = getattr(self.transport, "_compressed_groups", 0)
        self.transport._compressed_groups = index + 1  # type: ignore[attr-defined]
        self.session = Session(self.config, rank=self.rank,
                               namespace=f"group{index}/" if index else "")
        #: with ``track_error``: per all_reduce stream, a bound on the relative error of its
        #: last result against the exact reduction (compression error; the rounding of the
        #: sum to the tensor's dtype aside), the same on every rank
        self.reduce_errors: dict[str, float] = {}
        self._fingerprint = self.config.fingerprint()

    def __repr__(self) -> str:
        return (f"CompressedGroup(rank={self.rank}, world_size={self.world_size}, "
                f"codec={self.config.codec!r}, step={self.step_index})")

    def _reset(self) -> None:
        self.session.reset()  # advances the session id written into every header
        self.reduce_errors = {}

    def stats(self) -> SessionStats:
        """Traffic, accuracy and memory of every stream of the current session."""
        return self.session.stats()

    def _decoders(self, name: StreamKey, x: torch.Tensor,
                  shapes: list[tuple[int, ...]]) -> dict[int, StreamDecoder]:
        return {o: self.session.decoder(name, o, _like(shapes[o], x), renew=self.renew_streams)
                for o in range(self.world_size) if o != self.rank}

    def _settled(self, name: StreamKey, likes: dict[int, torch.Tensor],
                 earlier: list[Handle[Any]]) -> list[Handle[Any]]:
        """``earlier`` (the stream's transfers in flight), or none once they are complete
        where one of the streams ``(name, origin)`` is about to be renewed for ``likes[origin]``:
        they belong to the old stream."""
        if not self.renew_streams or not earlier or all(
                self.session.fits(name, o, t) for o, t in likes.items()):
            return earlier
        for h in earlier:
            h.wait()
        return []

    def _reconstruction(self, stream: str, x: torch.Tensor) -> torch.Tensor:
        return self.session.encoder(StreamKey("all_gather", stream), x).reference.clone()

    def _account_reduction(self, stream: str, blocks: Sequence[torch.Tensor],
                           reduced: torch.Tensor, result: torch.Tensor) -> None:
        """With ``track_error``: every rank shares the absolute error of each block it sent
        (the senders' own measurement) and of its reduced block, one small all-gather; the
        error of block ``d`` is at most the sum of the senders' errors on it plus its
        owner's, whence a bound on the relative error of the whole result."""
        if not self.config.track_error:
            return
        world, me = self.world_size, self.rank

        def abs_error(key: StreamKey, x: torch.Tensor) -> float:
            rel = self.session.encoder(key, x).stats().last_rel_error or 0.0
            return rel * float(torch.linalg.vector_norm(x.float()))
        mine = [0.0 if d == me else abs_error(StreamKey("all_to_all", f"{stream}.reduce", d),
                                              blocks[d]) for d in range(world)]
        mine.append(abs_error(StreamKey("all_gather", f"{stream}.gather"), reduced))
        vec = torch.tensor(mine, dtype=torch.float64, device=result.device)
        outs = [torch.empty_like(vec) for _ in range(world)]
        what = f"all_reduce of stream {stream!r} (error accounting)"
        block = vec.view(torch.uint8)
        work = self._collective(what, self.transport.all_gather, block,
                                [o.view(torch.uint8) for o in outs], block)
        self._wait(work, self.timeout, what)
        self._sent(vec.nbytes * (world - 1), world - 1)
        errors = torch.stack(outs).cpu()  # [sender][block, then own reduced block]
        bound = errors[:, :world].sum(0) + errors[:, world]
        norm = float(torch.linalg.vector_norm(result.float()))
        self.reduce_errors[stream] = float(bound.norm()) / max(norm, 1e-30)

    def _handshake(self, kind: str, stream: str, seq: int, send: Sequence[int],
                   recv: Sequence[int], device: torch.device) -> None:
        """Before a collective's payloads move: every rank shares the sizes it will send to
        and expects from each rank, its session, step and config, in a block of fixed size
        (so the exchange itself cannot mismatch). Every rank sees every block and reaches
        the same verdict, so a disagreement raises the same error on all of them -- where
        mismatched sizes would otherwise hang or abort the backend (gloo aborts the process)."""
        world = self.world_size
        name_crc = zlib.crc32(f"{kind}:{stream}".encode())
        mine = _HANDSHAKE.pack(_HANDSHAKE_MAGIC, self.session.id & 0xFFFFFFFF, name_crc,
                               seq & 0xFFFFFFFF, *self._fingerprint)
        mine += struct.pack(f"<{2 * world}Q", *send, *recv)
        # a tensor that owns its memory: the backend may release it from its own thread
        block = torch.tensor(list(mine), dtype=torch.uint8, device=device)
        outs = list(self._buffer(len(mine) * world, block.device).view(world, len(mine)))
        what = f"{kind} of stream {stream!r} (size handshake)"
        self._wait(self._collective(what, self.transport.all_gather, block, outs, block),
                   self.timeout, what)
        self._sent(len(mine) * (world - 1), world - 1)
        self.handshake_messages_sent += world - 1
        views = [bytes(o.cpu().numpy()) for o in outs]
        fields = [_HANDSHAKE.unpack(v[:_HANDSHAKE.size]) for v in views]
        sizes = [struct.unpack(f"<{2 * world}Q", v[_HANDSHAKE.size:]) for v in views]
        problems = []
        for label, i in (("session", 1), ("stream name", 2), ("step", 3)):
            values = [f[i] for f in fields]
            if len(set(values)) > 1:
                shown = values if label != "stream name" else [f"{v:#010x}" for v in values]
                problems.append(f"{label} differs by rank: {dict(enumerate(shown))}")
        differ = differing_fields([f[4:4 + len(SHARED_FIELDS)] for f in fields])
        if differ:
            problems.append(f"CompressionConfig differs in {', '.join(differ)}")
        for src in range(world):
            for dst in range(world):
                if src != dst and sizes[src][dst] != sizes[dst][world + src]:
                    problems.append(f"rank {src} sends {sizes[src][dst]} bytes to rank {dst}, "
                                    f"which expects {sizes[dst][world + src]}")
        if problems:
            raise WireFormatError(
                f"rank {self.rank}: {kind} of stream {stream!r}: the ranks disagree ("
                + "; ".join(problems[:6]) + "); every rank must issue the same calls with the "
                "same config, step() and new_session()")

    # ------------------------------------------------------------------ the collectives

    def isend(self, x: torch.Tensor, dst: int, *, stream: str) -> Handle[None]:
        """Start sending ``x`` to ``dst`` on ``stream``."""
        self._check_peer(dst, "destination")
        name = StreamKey("p2p", stream, dst)
        x = _forward_only(x)
        return self._guarded(lambda: self._send_bytes(
            self.session.encoder(name, x, renew=self.renew_streams).encode(x), dst, stream))

    def irecv(self, like: torch.Tensor, src: int, *, stream: str) -> Handle[torch.Tensor]:
        """Start receiving a tensor shaped like ``like`` from ``src`` on ``stream``."""
        self._check_peer(src, "source")
        name = StreamKey("p2p", stream, self.rank)

        def start() -> Handle[torch.Tensor]:
            earlier = self._settled(name, {src: like}, self._earlier(name))
            dec = self.session.decoder(name, src, like, renew=self.renew_streams)
            # where the transport allows, room for any message of the stream: one of an
            # unexpected size (a peer out of step) is then reported from its header
            short = self.transport.accepts_short_messages
            buf = self._buffer(dec.max_payload_nbytes() if short else
                               dec.payload_nbytes(dec.step + len(earlier)), like.device)
            what = f"recv of stream {stream!r} from rank {src}"
            work = self._irecv(buf, src, what)

            def finish(timeout: float) -> torch.Tensor:
                self._wait(work, timeout, what)
                return dec.decode(announced_payload(buf) if short else buf)
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
        x = _forward_only(x)
        shapes = self._shapes(x, shapes)
        if self.world_size == 1:
            return Handle.completed([x])
        return self._guarded(lambda: self._all_gather(x, stream, shapes))

    def _all_gather(self, x: torch.Tensor, stream: str, shapes: list[tuple[int, ...]]
                    ) -> Handle[list[torch.Tensor]]:
        name = StreamKey("all_gather", stream)
        earlier = self._settled(name, {o: _like(s, x) for o, s in enumerate(shapes)},
                                self._earlier(name))
        decs = self._decoders(name, x, shapes)
        enc = self.session.encoder(name, x, renew=self.renew_streams)
        sizes = [enc.payload_nbytes() if o == self.rank else
                 decs[o].payload_nbytes(decs[o].step + len(earlier))
                 for o in range(self.world_size)]
        slot = max(sizes)
        if self.config.handshake:
            self._handshake("all_gather", stream, enc.step, [slot] * self.world_size,
                            [slot if o != self.rank else 0 for o in range(self.world_size)], x.device)
        payload = enc.encode(x)
        if slot != payload.numel():
            padded = torch.zeros(slot, dtype=torch.uint8, device=x.device)
            padded[: payload.numel()] = payload
            payload = padded
        outs = list(self._buffer(slot * self.world_size, x.device).view(self.world_size, slot))
        what = f"all_gather of stream {stream!r}"
        work = self._collective(what, self.transport.all_gather, payload, outs, payload)
        self._sent(slot * (self.world_size - 1), self.world_size - 1)

        def finish(timeout: float) -> list[torch.Tensor]:
            self._wait(work, timeout, what)
            return [x if o == self.rank else decs[o].decode(outs[o][: sizes[o]])
                    for o in range(self.world_size)]
        return self._track(name, self._handle(finish, earlier))

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
        x = _forward_only(x)
        shapes = self._shapes(x, shapes)
        if self.world_size == 1:
            yield self.rank, x
            return
        name = StreamKey("ring", stream)
        for h in self._earlier(name):
            h.wait()

        def start() -> tuple[dict[int, StreamDecoder], torch.Tensor]:
            decs = self._decoders(name, x, shapes)
            enc = self.session.encoder(name, x, renew=self.renew_streams)
            if self.config.handshake:
                size = enc.payload_nbytes()
                self._handshake("ring", stream, enc.step, [size] * self.world_size,
                                [0 if o == self.rank else decs[o].payload_nbytes()
                                 for o in range(self.world_size)], x.device)
            return decs, enc.encode(x)
        decs, payload = self._guarded(start)
        yield from self._ring_hops(
            x, payload, stream,
            buffer_for=lambda o: self._buffer(decs[o].payload_nbytes(), x.device),
            decode=lambda o, buf: decs[o].decode(buf))

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
        x = _forward_only(x)
        in_sizes, out_sizes = self._splits(x, stream, input_split_sizes, output_split_sizes)
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
        likes = {src: _like((out_sizes[src], *rest), x) for src in range(world) if src != me}
        earlier = self._settled(recv_name, likes, self._earlier(recv_name))
        decs = {src: self.session.decoder(recv_name, src, like, renew=self.renew_streams)
                for src, like in likes.items()}
        encs = {dst: self.session.encoder(send_name[dst], chunks[dst], renew=self.renew_streams)
                for dst in range(world) if dst != me}
        recv_sizes = [0 if src == me else decs[src].payload_nbytes(decs[src].step + len(earlier))
                      for src in range(world)]
        if self.config.handshake:
            # the group's step: with renew_streams, chunk streams may restart on some ranks
            self._handshake("all_to_all", stream, self.step_index,
                            [0 if d == me else encs[d].payload_nbytes() for d in range(world)],
                            recv_sizes, x.device)
        payloads = [torch.empty(0, dtype=torch.uint8, device=x.device) if dst == me else
                    encs[dst].encode(chunks[dst]) for dst in range(world)]
        recv_buf = self._buffer(sum(recv_sizes), x.device)
        what = f"all_to_all of stream {stream!r}"
        send_buf = torch.cat(payloads)
        work = self._collective(what, self.transport.all_to_all_single, send_buf, recv_buf,
                                send_buf, recv_sizes, [p.numel() for p in payloads])
        self._sent(send_buf.numel(), world - 1)

        def finish(timeout: float) -> torch.Tensor:
            self._wait(work, timeout, what)
            out = torch.empty((sum(out_sizes), *rest), dtype=x.dtype, device=x.device)
            received = recv_buf.split(recv_sizes)
            for src, part in enumerate(out.split(out_sizes, dim=0)):
                part.copy_(chunks[me] if src == me else decs[src].decode(received[src]))
            return out
        return self._track(recv_name, self._handle(finish, earlier))


def _reduce_op(op: str, stream: str) -> bool:
    """Whether ``op`` averages (``"avg"``) rather than sums (``"sum"``); ValueError else."""
    if op not in ("sum", "avg"):
        raise ValueError(f"reduction of stream {stream!r}: op must be 'sum' or 'avg', got "
                         f"{op!r} (other reductions do not commute with residual coding)")
    return op == "avg"


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    """The bytes of ``x`` as a flat uint8 tensor (a view if ``x`` is contiguous)."""
    return x.contiguous().view(-1).view(torch.uint8)


class RawGroup(_GroupBase):
    """The same collectives as :class:`CompressedGroup`, uncompressed: the exact baseline.

    Tensors travel as their raw bytes; nothing is kept between calls, ``stream`` only names
    the transfer in errors. Received tensors are fresh buffers.
    """

    def __repr__(self) -> str:
        return f"RawGroup(rank={self.rank}, world_size={self.world_size}, step={self.step_index})"

    def isend(self, x: torch.Tensor, dst: int, *, stream: str) -> Handle[None]:
        self._check_peer(dst, "destination")
        return self._guarded(lambda: self._send_bytes(_as_bytes(_forward_only(x)), dst, stream))

    def irecv(self, like: torch.Tensor, src: int, *, stream: str) -> Handle[torch.Tensor]:
        self._check_peer(src, "source")
        out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        what = f"recv of stream {stream!r} from rank {src}"
        work = self._guarded(lambda: self._irecv(_as_bytes(out), src, what))

        def finish(timeout: float) -> torch.Tensor:
            self._wait(work, timeout, what)
            return out
        return self._track(StreamKey("recv", stream, self.rank), self._handle(finish))

    def all_gather_async(self, x: torch.Tensor, *, stream: str,
                         shapes: Sequence[Sequence[int]] | None = None
                         ) -> Handle[list[torch.Tensor]]:
        x = _forward_only(x)
        shapes = self._shapes(x, shapes)
        if self.world_size == 1:
            return Handle.completed([x])
        sizes = [math.prod(s) * x.element_size() for s in shapes]
        slot = max(sizes)
        data = _as_bytes(x)
        if slot != data.numel():
            data = torch.cat([data, torch.zeros(slot - data.numel(), dtype=torch.uint8,
                                                device=x.device)])
        outs = self._buffer(slot * self.world_size, x.device).view(self.world_size, slot)
        what = f"all_gather of stream {stream!r}"
        work = self._guarded(lambda: self._collective(what, self.transport.all_gather, data,
                                                      list(outs), data))
        self._sent(slot * (self.world_size - 1), self.world_size - 1)

        def finish(timeout: float) -> list[torch.Tensor]:
            self._wait(work, timeout, what)
            return [x if o == self.rank else
                    outs[o][: sizes[o]].view(x.dtype).view(shapes[o])
                    for o in range(self.world_size)]
        return self._track(StreamKey("all_gather", stream), self._handle(finish))

    def ring_iter(self, x: torch.Tensor, *, stream: str,
                  shapes: Sequence[Sequence[int]] | None = None
                  ) -> Iterator[tuple[int, torch.Tensor]]:
        x = _forward_only(x)
        shapes = self._shapes(x, shapes)
        if self.world_size == 1:
            yield self.rank, x
            return
        self._check_usable()
        yield from self._ring_hops(
            x, _as_bytes(x), stream,
            buffer_for=lambda o: self._buffer(math.prod(shapes[o]) * x.element_size(), x.device),
            decode=lambda o, buf: buf.view(x.dtype).view(shapes[o]))

    def all_to_all_async(self, x: torch.Tensor, *, stream: str,
                         input_split_sizes: Sequence[int] | None = None,
                         output_split_sizes: Sequence[int] | None = None
                         ) -> Handle[torch.Tensor]:
        x = _forward_only(x)
        in_sizes, out_sizes = self._splits(x, stream, input_split_sizes, output_split_sizes)
        if self.world_size == 1:
            return Handle.completed(x)
        row = math.prod(x.shape[1:]) * x.element_size()
        out = torch.empty((sum(out_sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
        what = f"all_to_all of stream {stream!r}"
        work = self._guarded(lambda: self._collective(
            what, self.transport.all_to_all_single, x, _as_bytes(out), _as_bytes(x),
            [n * row for n in out_sizes], [n * row for n in in_sizes]))
        self._sent((sum(in_sizes) - in_sizes[self.rank]) * row, self.world_size - 1)

        def finish(timeout: float) -> torch.Tensor:
            self._wait(work, timeout, what)
            return out
        return self._track(StreamKey("all_to_all", stream, self.rank), self._handle(finish))
