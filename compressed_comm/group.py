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
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from .config import CompressionConfig
from .errors import CommError
from .session import Session, SessionStats
from .stream import StreamDecoder
from .transport import P2POp, TorchDistTransport, Transport, Work

__all__ = ["CompressedGroup", "RawGroup", "Handle"]

T = TypeVar("T")

DEFAULT_TIMEOUT = 300.0


class Handle(Generic[T]):
    """A compressed transfer in flight; :meth:`wait` completes it and returns the result.

    Waiting twice returns the same result. Handles of one stream complete in the order they
    were started: waiting on a newer one first completes the older ones, whose results are
    then kept as copies (the stream's reference moves on).
    """

    __slots__ = ("_finish", "_result", "_done", "_before", "_timeout")

    def __init__(self, finish: Callable[[float], T], timeout: float,
                 before: Sequence[Handle[Any]] = ()) -> None:
        self._finish: Callable[[float], T] | None = finish
        self._result: T | None = None
        self._done = False
        self._before = list(before)
        self._timeout = timeout

    @classmethod
    def completed(cls, result: T) -> Handle[T]:
        """A handle that is already done."""
        h: Handle[T] = cls(lambda _t: result, 0.0)
        h.wait()
        return h

    def is_completed(self) -> bool:
        """Whether :meth:`wait` has run."""
        return self._done

    def wait(self, timeout: float | None = None) -> T:
        """Complete the transfer (raising on timeout or error) and return its result."""
        if not self._done:
            for older in self._before:
                if not older.is_completed():
                    older.wait(timeout)
                    older._result = _snapshot(older._result)
            assert self._finish is not None
            finish, self._finish = self._finish, None
            self._result = finish(self._timeout if timeout is None else timeout)
            self._done, self._before = True, []
        return self._result  # type: ignore[return-value]


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
    """What raw and compressed groups share: transport, timeouts, steps, argument checks."""

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
        #: bytes and point-to-point messages this rank has sent in the current session
        self.bytes_sent = 0
        self.messages_sent = 0
        self._inflight: dict[str, list[Handle[Any]]] = {}

    # ------------------------------------------------------------------ steps and sessions

    def step(self) -> None:
        """Mark the end of a denoising step."""
        self.step_index += 1

    def new_session(self) -> None:
        """Start a new request: drop all per-request state (all ranks must do this together)."""
        pending = sum(not h.is_completed() for hs in self._inflight.values() for h in hs)
        if pending:
            raise RuntimeError(f"rank {self.rank}: {pending} transfers are still in flight; "
                               "wait() on them before starting a new session")
        self._inflight.clear()
        self.step_index = 0
        self.bytes_sent = self.messages_sent = 0
        self._reset()

    def _reset(self) -> None:
        """Drop per-request state (subclasses)."""

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

    def _earlier(self, name: str) -> list[Handle[Any]]:
        """The still-incomplete handles of stream ``name``, oldest first."""
        live = [h for h in self._inflight.get(name, ()) if not h.is_completed()]
        self._inflight[name] = live
        return list(live)

    def _track(self, name: str, handle: Handle[T]) -> Handle[T]:
        self._inflight.setdefault(name, []).append(handle)
        return handle

    @staticmethod
    def _buffer(nbytes: int, device: torch.device) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def _start(self, what: str, op: Callable[..., T], *args: Any) -> T:
        try:
            return op(*args)
        except CommError as e:
            raise type(e)(f"rank {self.rank}: {what}: {e}") from e

    def _wait(self, work: Work, timeout: float, what: str) -> None:
        try:
            work.wait(timeout)
        except CommError as e:
            raise type(e)(f"rank {self.rank}: {what}: {e}") from e

    def _ring_hops(self, x: torch.Tensor, packet: torch.Tensor, stream: str,
                   buffer_for: Callable[[int], torch.Tensor],
                   decode: Callable[[int, torch.Tensor], torch.Tensor]
                   ) -> Iterator[tuple[int, torch.Tensor]]:
        """The hops of a ring pass of this rank's byte ``packet``: yields ``(rank, x)``, then
        ``(origin, decode(origin, bytes))`` per hop while the next hop is in flight; every
        received packet is forwarded unchanged."""
        nxt, prv = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size

        def post(packet: torch.Tensor, hop: int) -> tuple[int, torch.Tensor, list[Work]]:
            origin = (self.rank - hop) % self.world_size
            buf = buffer_for(origin)
            works = self._start(
                f"ring pass of stream {stream!r}, hop {hop} (block of rank {origin})",
                self.transport.batch_isend_irecv,
                [P2POp("send", packet, nxt), P2POp("recv", buf, prv)])
            self._sent(packet.numel(), 1)
            return origin, buf, works

        pending = post(packet, 1)
        yield self.rank, x
        for hop in range(1, self.world_size):
            origin, buf, works = pending
            for w in works:
                self._wait(w, self.timeout, f"ring pass of stream {stream!r}, hop {hop} "
                           f"(block of rank {origin}, from rank {prv} to rank {nxt})")
            if hop < self.world_size - 1:
                pending = post(buf, hop + 1)  # forward unchanged while decoding
            yield origin, decode(origin, buf)

    def _send_bytes(self, data: torch.Tensor, dst: int, stream: str) -> Handle[None]:
        """Start sending the uint8 buffer ``data`` to ``dst``; it stays alive until done."""
        what = f"send of stream {stream!r} to rank {dst}"
        work = self._start(what, self.transport.isend, data, dst)
        self._sent(data.numel(), 1)

        def finish(timeout: float, data: torch.Tensor = data) -> None:
            self._wait(work, timeout, what)
        return Handle(finish, self.timeout)

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

    Mark denoising steps with :meth:`step`, and start each request (generation) with
    :meth:`new_session`; ranks must do both in lock-step.
    """

    def __init__(self, transport: Transport | dist.ProcessGroup | None = None,
                 config: CompressionConfig | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(transport, timeout=timeout)
        self.config = config or CompressionConfig()
        self.session = Session(self.config, rank=self.rank)

    def __repr__(self) -> str:
        return (f"CompressedGroup(rank={self.rank}, world_size={self.world_size}, "
                f"codec={self.config.codec!r}, step={self.step_index})")

    def _reset(self) -> None:
        self.session.reset()

    def stats(self) -> SessionStats:
        """Traffic, accuracy and memory of every stream of the current session."""
        return self.session.stats()

    def _decoders(self, name: str, x: torch.Tensor,
                  shapes: list[tuple[int, ...]]) -> dict[int, StreamDecoder]:
        return {o: self.session.decoder(name, o, _like(shapes[o], x))
                for o in range(self.world_size) if o != self.rank}

    # ------------------------------------------------------------------ the collectives

    def isend(self, x: torch.Tensor, dst: int, *, stream: str) -> Handle[None]:
        """Start sending ``x`` to ``dst`` on ``stream``."""
        self._check_peer(dst, "destination")
        name = f"p2p:{stream}->{dst}"
        return self._send_bytes(self.session.encoder(name, x).encode(x), dst, stream)

    def irecv(self, like: torch.Tensor, src: int, *, stream: str) -> Handle[torch.Tensor]:
        """Start receiving a tensor shaped like ``like`` from ``src`` on ``stream``."""
        self._check_peer(src, "source")
        name = f"p2p:{stream}->{self.rank}"
        dec = self.session.decoder(name, src, like)
        earlier = self._earlier(name)
        buf = self._buffer(dec.payload_nbytes(dec.step + len(earlier)), like.device)
        what = f"recv of stream {stream!r} from rank {src}"
        work = self._start(what, self.transport.irecv, buf, src)

        def finish(timeout: float) -> torch.Tensor:
            self._wait(work, timeout, what)
            return dec.decode(buf)
        return self._track(name, Handle(finish, self.timeout, earlier))

    def all_gather_async(self, x: torch.Tensor, *, stream: str,
                         shapes: Sequence[Sequence[int]] | None = None
                         ) -> Handle[list[torch.Tensor]]:
        """Start an all-gather of every rank's ``x``; ``wait()`` returns them in rank order.

        ``x`` is encoded now; the payloads are decoded at ``wait()``, which may come a step
        later (DistriFusion-style: issue at step t, use at step t+1). The caller's own slot is
        ``x`` itself. ``shapes`` gives each rank's shape when they differ (uneven patches).
        """
        shapes = self._shapes(x, shapes)
        if self.world_size == 1:
            return Handle.completed([x])
        name = f"all_gather:{stream}"
        decs = self._decoders(name, x, shapes)
        earlier = self._earlier(name)
        payload = self.session.encoder(name, x).encode(x)
        sizes = [payload.numel() if o == self.rank else
                 decs[o].payload_nbytes(decs[o].step + len(earlier))
                 for o in range(self.world_size)]
        slot = max(sizes)
        if slot != payload.numel():
            padded = torch.zeros(slot, dtype=torch.uint8, device=x.device)
            padded[: payload.numel()] = payload
            payload = padded
        outs = list(self._buffer(slot * self.world_size, x.device).view(self.world_size, slot))
        what = f"all_gather of stream {stream!r}"
        work = self._start(what, self.transport.all_gather, outs, payload)
        self._sent(slot * (self.world_size - 1), self.world_size - 1)

        def finish(timeout: float) -> list[torch.Tensor]:
            self._wait(work, timeout, what)
            return [x if o == self.rank else decs[o].decode(outs[o][: sizes[o]])
                    for o in range(self.world_size)]
        return self._track(name, Handle(finish, self.timeout, earlier))

    def ring_iter(self, x: torch.Tensor, *, stream: str,
                  shapes: Sequence[Sequence[int]] | None = None
                  ) -> Iterator[tuple[int, torch.Tensor]]:
        """Pass every rank's ``x`` around the ring; yields ``(origin, tensor)`` per hop.

        The first item is ``(rank, x)``; then the blocks of ranks ``rank-1, rank-2, ...``.
        Each packet is forwarded unchanged and decoded once here with its origin's
        reference, so hops add no error. The next hop's transfer is in flight while the
        caller works on the current block. Iterate to the end: every rank must take part in
        every hop.
        """
        shapes = self._shapes(x, shapes)
        if self.world_size == 1:
            yield self.rank, x
            return
        name = f"ring:{stream}"
        for h in self._earlier(name):
            h.wait()
        decs = self._decoders(name, x, shapes)
        payload = self.session.encoder(name, x).encode(x)
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
        world = self.world_size
        in_sizes, out_sizes = self._splits(x, stream, input_split_sizes, output_split_sizes)
        rest = tuple(x.shape[1:])
        chunks = x.split(in_sizes, dim=0)
        if world == 1:
            return Handle.completed(x)
        me = self.rank
        send_name = {dst: f"all_to_all:{stream}->{dst}" for dst in range(world)}
        recv_name = send_name[me]
        earlier = self._earlier(recv_name)
        decs = {src: self.session.decoder(recv_name, src, _like((out_sizes[src], *rest), x))
                for src in range(world) if src != me}
        payloads = [torch.empty(0, dtype=torch.uint8, device=x.device) if dst == me else
                    self.session.encoder(send_name[dst], chunks[dst]).encode(chunks[dst])
                    for dst in range(world)]
        recv_sizes = [0 if src == me else decs[src].payload_nbytes(decs[src].step + len(earlier))
                      for src in range(world)]
        recv_buf = self._buffer(sum(recv_sizes), x.device)
        what = f"all_to_all of stream {stream!r}"
        work = self._start(what, self.transport.all_to_all_single, recv_buf, torch.cat(payloads),
                           recv_sizes, [p.numel() for p in payloads])
        self._sent(sum(p.numel() for p in payloads), world - 1)

        def finish(timeout: float) -> torch.Tensor:
            self._wait(work, timeout, what)
            out = torch.empty((sum(out_sizes), *rest), dtype=x.dtype, device=x.device)
            received = recv_buf.split(recv_sizes)
            for src, part in enumerate(out.split(out_sizes, dim=0)):
                part.copy_(chunks[me] if src == me else decs[src].decode(received[src]))
            return out
        return self._track(recv_name, Handle(finish, self.timeout, earlier))


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
        return self._send_bytes(_as_bytes(x), dst, stream)

    def irecv(self, like: torch.Tensor, src: int, *, stream: str) -> Handle[torch.Tensor]:
        self._check_peer(src, "source")
        out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        what = f"recv of stream {stream!r} from rank {src}"
        work = self._start(what, self.transport.irecv, _as_bytes(out), src)

        def finish(timeout: float) -> torch.Tensor:
            self._wait(work, timeout, what)
            return out
        return Handle(finish, self.timeout)

    def all_gather_async(self, x: torch.Tensor, *, stream: str,
                         shapes: Sequence[Sequence[int]] | None = None
                         ) -> Handle[list[torch.Tensor]]:
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
        work = self._start(what, self.transport.all_gather, list(outs), data)
        self._sent(slot * (self.world_size - 1), self.world_size - 1)

        def finish(timeout: float) -> list[torch.Tensor]:
            self._wait(work, timeout, what)
            return [x if o == self.rank else
                    outs[o][: sizes[o]].view(x.dtype).view(shapes[o])
                    for o in range(self.world_size)]
        return Handle(finish, self.timeout)

    def ring_iter(self, x: torch.Tensor, *, stream: str,
                  shapes: Sequence[Sequence[int]] | None = None
                  ) -> Iterator[tuple[int, torch.Tensor]]:
        shapes = self._shapes(x, shapes)
        if self.world_size == 1:
            yield self.rank, x
            return
        yield from self._ring_hops(
            x, _as_bytes(x), stream,
            buffer_for=lambda o: self._buffer(math.prod(shapes[o]) * x.element_size(), x.device),
            decode=lambda o, buf: buf.view(x.dtype).view(shapes[o]))

    def all_to_all_async(self, x: torch.Tensor, *, stream: str,
                         input_split_sizes: Sequence[int] | None = None,
                         output_split_sizes: Sequence[int] | None = None
                         ) -> Handle[torch.Tensor]:
        in_sizes, out_sizes = self._splits(x, stream, input_split_sizes, output_split_sizes)
        if self.world_size == 1:
            return Handle.completed(x)
        row = math.prod(x.shape[1:]) * x.element_size()
        out = torch.empty((sum(out_sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
        what = f"all_to_all of stream {stream!r}"
        work = self._start(what, self.transport.all_to_all_single, _as_bytes(out), _as_bytes(x),
                           [n * row for n in out_sizes], [n * row for n in in_sizes])
        self._sent((sum(in_sizes) - in_sizes[self.rank]) * row, self.world_size - 1)

        def finish(timeout: float) -> torch.Tensor:
            self._wait(work, timeout, what)
            return out
        return Handle(finish, self.timeout)
