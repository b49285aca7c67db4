"""The control plane of a compressed group: one agreement per step, failures seen by every
rank at the same call, and recovery without a restart.

**Steady state.** At the end of every step (``step()``) the ranks exchange one control
block (:mod:`.control`) saying how many collectives the step posted and a digest of them.
Agreed, they become the next step's :class:`~.ledger.Plan`: diffusion steps repeat their
collectives, so a collective that matches the entry the previous step had at its position
is posted at once -- every rank computes the same sizes from the residual streams it
mirrors -- and a step's wire operations are its data collectives plus that one exchange.

**Handshakes** agree on what has no entry yet: the first step of a session, calls beyond
the previous step's count (a new stream, a third transformer call), and entries whose
shapes changed before (volatile).

**Deviation.** A call that does not match its expected entry (another stream, shape or
collective) cannot tell whether its peers deviate too, so it takes part in the expected
collective with a *void* status frame of the expected size saying what it calls instead.
Every rank sees every other's frame: if all are void the ranks agree on the new call by a
handshake (it stays volatile); otherwise every rank raises the same
:class:`~compressed_comm.WireFormatError`. A rank that calls ``step()`` before the end of
the expected collectives voids the rest alike, so a shorter step is agreed too.

**Failures.** A rank whose step fails -- a NaN in its input, a corrupt payload, a peer's
status frame, its caller's exception reported with :meth:`ControlPlane.fail`, or
``new_session()`` in the middle of a step -- posts the rest of the step's plan with
*failed* status frames of the sizes its peers expect, so that every peer waiting on a
transfer of it gets the frame and raises :class:`~compressed_comm.PeerFailedError` naming
the rank and the cause, at once instead of at its timeout. Errors every rank reached from
the same control exchange need no frames.

**Recovery.** ``new_session()`` exchanges ``RECOVER`` blocks until every rank is in one
(a rank still in another exchange sees the recovering rank's block and raises, then
recovers too; every rank has five timeouts to join), drains what the session left on the
transport (within two timeouts) (:meth:`~.ledger.Ledger.drain`)
and starts the next session. A rank whose session is still fresh (nothing posted, no
failure) that meets peers already at work in the same session has nothing to recover and
returns, while they repeat their exchange: ``new_session()`` twice, or by a rank whose
peers already recovered, does not disturb the group.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..errors import GroupFailedError, PeerFailedError, WireFormatError
from ..stream import StreamKey
from ..transport import P2POp
from ..wire import STATUS_FAILED, STATUS_VOID
from . import control
from .control import HANDSHAKE, RECOVER, STEP, ControlBlock
from .framing import Incoming, template
from .ledger import Entry, digest

if TYPE_CHECKING:
    from .groups import CompressedGroup

__all__ = ["ControlPlane", "AGREED"]

#: attribute set on an error every rank raised from the same control exchange: no status
#: frames are needed for it
AGREED = "_compressed_comm_agreed"
#: how many timeouts ``new_session()`` waits for every rank to join it
_RECOVERY_TIMEOUTS = 5


def _agreed(error: BaseException) -> BaseException:
    setattr(error, AGREED, True)
    return error


class ControlPlane:
    """The control plane's part of :class:`~compressed_comm.CompressedGroup` (see the module
    docstring). Active with ``CompressionConfig(handshake=True)``, the default."""

    # ------------------------------------------------------------------ public

    def fail(self: CompressedGroup, error: BaseException) -> None:
        """Report that this rank's step failed outside the library (an exception in the
        caller's code between collectives), e.g. in an ``except`` handler: every peer
        waiting on this rank's transfers of the step gets :class:`PeerFailedError` naming
        this rank and ``error``. Call ``new_session()`` on every rank afterwards."""
        self._fail(error)

    # ------------------------------------------------------------------ the agreement

    def _control_on(self: CompressedGroup) -> bool:
        return self.config.handshake and self.world_size > 1

    def _admit(self: CompressedGroup, entry: Entry) -> bool:
        """Before a collective: whether it needs a handshake (True), or matches the step's
        plan and can go at once (False); a deviation is probed first (module docstring)."""
        if not self._control_on():
            return False
        expected = self._plan.next_expected()
        if expected is None or expected.volatile:
            return True  # nothing agreed at this position yet, or its shapes change
        if expected == entry:
            self._plan.entries.append(expected)
            return False
        self._probe(expected, f"calls {entry.described()} where the last step had "
                              f"{expected.described()}")
        return True

    def _probe(self: CompressedGroup, expected: Entry, why: str) -> None:
        """Take part in ``expected`` with a void frame saying ``why``; return if every rank
        did (the ranks then agree on what they call instead), raise if not."""
        frames = self._post_status(expected, STATUS_VOID, self.rank, why, wait=True)
        others = {o: f for o, f in frames.items() if o != self.rank}
        if all(f is not None and f[0] == STATUS_VOID for f in others.values()):
            return
        self._plan.entries.append(expected)
        self._plan.posted += 1
        failed = self._frame_error(f"{expected}", frames)
        raise failed if failed is not None else _disagreement(
            self.rank, f"{expected}", f"rank {self.rank} {why}; the others call it")

    def _handshake(self: CompressedGroup, entry: Entry, step: int, send: list[int],
                   recv: list[int]) -> None:
        """Agree on ``entry`` and its sizes with every rank (a ``HANDSHAKE`` block)."""
        blocks = self._exchange(control.ControlBlock(
            kind=HANDSHAKE, session=self.session.id, step=self.step_index,
            position=len(self._plan.entries), name=control.name_crc(entry.kind, entry.stream),
            seq=step, fingerprint=self._fingerprint, sent=tuple(send), expected=tuple(recv)),
            f"{entry} (size handshake)")
        self._verdict(blocks, f"{entry}")
        volatile = self._plan.next_expected() is not None
        self._plan.entries.append(Entry(entry.kind, entry.stream, entry.shapes, entry.dtype,
                                        entry.device, entry.splits, volatile=volatile))

    def _end_step(self: CompressedGroup) -> None:
        """``step()``: void the expected collectives this step did not reach, then agree on
        the step with every rank (one ``STEP`` block), making it the next step's plan."""
        self._check_usable()
        plan = self._plan
        try:
            if len(plan.entries) < len(plan.expected):
                n = len(plan.entries)
                for expected in plan.expected[n:]:
                    self._probe(expected, f"ended its step (step()) after {n} collectives")
                plan.expected = plan.expected[:n]
            if not plan.entries and not plan.expected:
                plan.end_step()
                return  # nothing this step, nothing expected: every rank agrees already
            auto = self.session.auto
            start = time.perf_counter()
            blocks = self._exchange(control.ControlBlock(
                kind=STEP, session=self.session.id, step=self.step_index,
                position=len(plan.entries), name=digest(plan.entries),
                fingerprint=self._fingerprint,
                report=auto.meter.report() if auto is not None else control.Report()),
                "step()")
            self._verdict(blocks, "step()")
            if auto is not None:  # the same blocks on every rank: the same decisions
                auto.meter.control(control.control_nbytes(self.world_size)
                                   * (self.world_size - 1), time.perf_counter() - start)
                auto.agree([b.report for b in blocks])
        except BaseException as e:
            self._fail(e)
            raise
        plan.end_step()

    def _recover(self: CompressedGroup) -> bool:
        """``new_session()``: leave the step (status frames for what peers may wait on),
        then ``RECOVER`` blocks until every rank is in one, then drain; False where this
        rank's session is fresh and its peers are at work in it (nothing to end)."""
        if self._failure is None and self._plan.entries and self._plan.rest():
            self._fail(PeerFailedError(f"rank {self.rank} started a new session in the "
                                       f"middle of a step", self.rank, "new_session()"))
        fresh = self._ledger.empty and self._failure is None and not self._plan.entries
        # a peer may still be in a wait of its own (up to a timeout) before it gets here
        deadline = time.monotonic() + _RECOVERY_TIMEOUTS * self.timeout
        failure = self._failure
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GroupFailedError(f"rank {self.rank}: the ranks did not all start a new "
                                       f"session within {_RECOVERY_TIMEOUTS} x {self.timeout} s")
            sent, posted = self._ledger.counts()
            blocks = self._exchange(control.ControlBlock(
                kind=RECOVER, session=self.session.id, step=self.step_index,
                failed=failure is not None, fresh=fresh, failed_rank=_origin(failure, self.rank),
                cause=_cause(failure), fingerprint=self._fingerprint, sent=tuple(sent),
                expected=tuple(posted), collectives=self._ledger.collectives),
                "new_session()", left)
            if all(b.kind == RECOVER for b in blocks):
                break
            if fresh and all(b.kind == RECOVER or (b.session == self.session.id
                                                  and not b.failed) for b in blocks):
                return False  # the peers are at work in this very session
        self._ledger.drain(self.transport, self.transport.control(), 2 * self.timeout,
                           sent=[list(b.sent) for b in blocks],
                           posted=[list(b.expected) for b in blocks],
                           collectives=[b.collectives for b in blocks])
        return True

    # ------------------------------------------------------------------ failures

    def _fail(self: CompressedGroup, error: BaseException) -> None:
        """This rank leaves the step abnormally with ``error``: it fails the group until
        ``new_session()`` and, unless every rank reached ``error`` from one control
        exchange, posts the rest of the step's plan with failed frames (module docstring)."""
        if self._failure is not None:
            return
        self._failure = error
        if not self._control_on() or getattr(error, AGREED, False):
            return
        origin, cause = _origin(error, self.rank), _cause(error)
        rest, self._plan.entries = self._plan.rest(), self._plan.entries[:self._plan.posted]
        for entry in rest:
            try:
                self._post_status(entry, STATUS_FAILED, origin, cause, wait=False)
            except Exception:  # noqa: BLE001 - the transport itself failed: peers time out
                break
            self._plan.entries.append(entry)
            self._plan.posted += 1

    def _frame_error(self: CompressedGroup, what: str,
                     frames: dict[int, tuple[int, int, str] | None]) -> BaseException | None:
        """The error the status frames received in a transfer stand for, if any."""
        for status in (STATUS_FAILED, STATUS_VOID):
            found = [f for o, f in sorted(frames.items())
                     if f is not None and f[0] == status and o != self.rank]
            if found:
                _, rank, text = found[0]
                return (_peer_failed(self.rank, what, rank, text) if status == STATUS_FAILED
                        else _disagreement(self.rank, what, f"rank {rank} {text}"))
        return None

    def _post_status(self: CompressedGroup, entry: Entry, status: int, rank: int, text: str,
                      wait: bool) -> dict[int, Any]:
        """Post the collective of ``entry`` with status frames (``status`` about ``rank``,
        ``text``) of the sizes the peers expect instead of payloads. With ``wait``: wait for
        it and return what every rank sent, by origin (a status tuple, or None for data);
        a ring pass always waits, hop by hop, forwarding what arrives."""
        world, me, device = self.world_size, self.rank, entry.device
        what = f"{entry} (status frames)"
        mine = (status, rank, text)

        def frame(nbytes: int) -> torch.Tensor:
            return self.framing.frame(nbytes, status, rank, text, device)

        def like(shape: Sequence[int]) -> torch.Tensor:
            return template(shape, entry.dtype, device)

        if entry.kind == "all_to_all":
            rest = entry.shapes[0]
            in_sizes, out_sizes = entry.splits
            recv_name = StreamKey("all_to_all", entry.stream, me)
            incoming = {src: self.framing.receiver(recv_name, src, like((out_sizes[src], *rest)))
                        for src in range(world) if src != me}
            payloads = [None if dst == me else frame(self.framing.sender(
                StreamKey("all_to_all", entry.stream, dst), like((in_sizes[dst], *rest))).nbytes)
                for dst in range(world)]
            recv_sizes = [0 if src == me else incoming[src].nbytes for src in range(world)]
            work, received = self._post_all_to_all(what, payloads, recv_sizes, device)
            bufs = {src: received[src] for src in incoming}
        else:
            name = StreamKey(entry.kind, entry.stream)
            self.framing.expect(name, entry.shapes)
            incoming = {o: self.framing.receiver(name, o, like(entry.shapes[o]))
                        for o in range(world) if o != me}
            nbytes = self.framing.sender(name, like(entry.shapes[me])).nbytes
            if entry.kind == "ring":
                return self._status_ring(what, frame(nbytes), incoming, mine)
            sizes = [nbytes if o == me else incoming[o].nbytes for o in range(world)]
            work, outs = self._post_all_gather(what, frame(nbytes), max(sizes), device)
            bufs = {o: outs[o][: sizes[o]] for o in incoming}
        if not wait:
            return {}
        self._wait(work, self.timeout, what)
        return {me: mine} | {o: self.framing.status(b) for o, b in bufs.items()}

    def _status_ring(self: CompressedGroup, what: str, packet: torch.Tensor, incoming: dict[int, Incoming],
                     mine: tuple[int, int, str]) -> dict[int, Any]:
        """A ring pass of the status frame ``packet``, hop by hop (see :meth:`_post_status`)."""
        world, me = self.world_size, self.rank
        nxt, prv = (me + 1) % world, (me - 1) % world
        frames: dict[int, Any] = {me: mine}
        for hop in range(1, world):
            origin = (me - hop) % world
            buf = self._buffer(incoming[origin].nbytes, packet.device)
            for w in self._batch([P2POp("send", packet, nxt), P2POp("recv", buf, prv)], what):
                self._wait(w, self.timeout, what)
            frames[origin] = self.framing.status(buf)
            packet = buf
        return frames

    # ------------------------------------------------------------------ exchanges

    def _exchange(self: CompressedGroup, block: ControlBlock, what: str,
                  timeout: float | None = None) -> list[ControlBlock]:
        """All ranks' blocks, exchanged on the control channel (CPU tensors: the channel of
        a torch.distributed group may be a gloo group). Repeated while the only other
        blocks are those of ranks whose ``new_session()`` found their session fresh (they
        return and come back)."""
        world = self.world_size
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                blocks = control.exchange(self.transport.control(), block,
                                          max(0.0, deadline - time.monotonic()),
                                          torch.device("cpu"))
            except Exception as e:
                raise type(e)(f"rank {self.rank}: {what}: {e}") from e
            nbytes = control.control_nbytes(world)
            self._sent(nbytes * (world - 1), world - 1)
            self.handshake_messages_sent += world - 1
            if block.kind == RECOVER or not any(
                    b.kind == RECOVER and b.fresh and b.session == block.session
                    for b in blocks) or not all(
                    b.kind == block.kind or (b.kind == RECOVER and b.fresh) for b in blocks):
                return blocks

    def _verdict(self: CompressedGroup, blocks: list[ControlBlock], what: str) -> None:
        """Raise, on every rank alike, what ``blocks`` disagree on or the failure they
        report."""
        failed = control.failure(blocks)
        if failed is not None:
            raise _agreed(_peer_failed(self.rank, what, failed.failed_rank, failed.cause))
        problems = control.disagreements(blocks)
        if problems:
            raise _agreed(_disagreement(self.rank, what, "; ".join(problems[:6])))


def _peer_failed(me: int, what: str, rank: int, cause: str) -> PeerFailedError:
    return PeerFailedError(f"rank {me}: {what}: rank {rank} failed ({cause}); call "
                           "new_session() on every rank", rank, cause)


def _disagreement(me: int, what: str, detail: str) -> WireFormatError:
    return WireFormatError(f"rank {me}: {what}: the ranks disagree ({detail}); every rank must "
                           "issue the same calls with the same config, step() and new_session()")


def _origin(error: BaseException | None, me: int) -> int:
    """The rank a failure is about: the failed peer's, or this rank's own."""
    if error is None:
        return -1
    return error.rank if isinstance(error, PeerFailedError) and error.rank >= 0 else me


def _cause(error: BaseException | None) -> str:
    """What a failure was, for a frame or block: the original cause of a peer's failure."""
    if error is None:
        return ""
    if isinstance(error, PeerFailedError) and error.cause:
        return error.cause
    return f"{type(error).__name__}: {error}"
