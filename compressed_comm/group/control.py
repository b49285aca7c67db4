"""The control exchange: one fixed-size block per rank, all-gathered on the transport's
control channel (:meth:`~compressed_comm.Transport.control`), through which the ranks of a
compressed group agree on what they do.

A block says which exchange its rank is in:

* ``HANDSHAKE`` -- before a collective the ranks have not agreed on yet (the first step of
  a session, a new stream, a changed shape): its name, step and the sizes this rank will
  send to and expects from each rank;
* ``STEP`` -- at the end of a step (``step()``): how many collectives the step posted and a
  digest of them; agreed, they are the next step's ledger, and collectives that follow it
  need no handshake. With ``codec="auto"`` it also carries what its rank measured in the
  step (:class:`~compressed_comm.auto.Report`), from which every rank reaches the same
  decisions for the next step;
* ``RECOVER`` -- in ``new_session()``: what this rank posted in the session (to drain it).

Every block also carries the session and step, the config's fingerprint and whether its
rank's session failed (with the failed rank and the cause). Blocks have the same size
whatever their kind, so ranks in different exchanges still meet -- a rank that calls
``step()`` and one that issues another collective both see the disagreement, instead of
hanging or crashing the backend -- and every rank reaches the same verdict from the same
blocks.

Block layout (little-endian), :func:`control_nbytes` bytes per rank of a group of W::

    offset  size    field
    0       4       magic b"CCCB"
    4       1       kind: 1 handshake, 2 step, 3 recover
    5       1       flags: bit 0 = this rank's session failed, bit 1 = it is fresh
                    (nothing posted, no failure)
    6       2       zero
    8       4       session id
    12      4       step (the group's step)
    16      4       collectives this rank posted in the step
    20      4       handshake: CRC-32 of "<collective>:<stream>"; step: digest of the step
    24      4       handshake: the stream's message number
    28      4       the rank that failed first (0xFFFFFFFF: none)
    32      4 x F   the config's fingerprint (a CRC-32 per field of
                    compressed_comm.config.SHARED_FIELDS, F of them), zero-padded to 8
    ...     64      what that rank failed with (UTF-8, zero-padded)
    ...     8 x W   handshake: bytes sent to each rank; recover: p2p messages sent to each
    ...     8 x W   handshake: bytes expected from each rank; recover: p2p receives
                    posted from each
    ...     8       recover: collectives posted in the session
    ...     4       step (auto): transfers waited on at once
    ...     4       zero
    ...     8       step (auto): bytes those transfers sent
    ...     8       step (auto): nanoseconds they took, post to completion
    ...     4 x 8   step (auto): encode cost per candidate, picoseconds per byte (0: unknown)
    ...     4 x 8   step (auto): decode cost per candidate, likewise
    ...     8       step (auto): bytes sent in the previous step's control exchange
    ...     8       step (auto): its nanoseconds
    ...     4 x 8   step (auto): the first 8 timed transfers' bytes
    ...     4 x 8   step (auto): their microseconds
    ...     4 x 8   step (auto): shadow-encoding error per candidate, the largest over the
                    rank's streams, in millionths (0: not measured)
    ...     4 x 16  step (auto): compute hidden behind transfers, microseconds per slot of
                    compressed_comm.auto.hidden_slot (0: none waited on)

That is ``416 + 16 W`` bytes per rank in a group of W (:func:`control_nbytes`: 480 for
W = 4), 96 more than before the shadow errors and hidden compute were carried
(``320 + 16 W``).
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..auto import MAX_CANDIDATES, MAX_HIDDEN, MAX_TIMED, Report
from ..config import SHARED_FIELDS, differing_fields
from ..transport import Transport

__all__ = ["HANDSHAKE", "STEP", "RECOVER", "ControlBlock", "control_nbytes",
           "handshake_nbytes", "exchange", "disagreements", "name_crc"]

HANDSHAKE, STEP, RECOVER = 1, 2, 3
_KINDS = {HANDSHAKE: "handshake", STEP: "step", RECOVER: "recover"}
_MAGIC = b"CCCB"
_NONE = 0xFFFFFFFF
_CAUSE = 64
_FIXED = struct.Struct(f"<4sBBxxIIIIII{len(SHARED_FIELDS)}I{-4 * len(SHARED_FIELDS) % 8}x"
                       f"{_CAUSE}s")
_REPORT = struct.Struct(f"<I4xQQ{MAX_CANDIDATES}I{MAX_CANDIDATES}IQQ{MAX_TIMED}I{MAX_TIMED}I"
                        f"{MAX_CANDIDATES}I{MAX_HIDDEN}I")


def control_nbytes(world_size: int) -> int:
    """Bytes each rank contributes to a control exchange in a group of ``world_size``."""
    return _FIXED.size + 16 * world_size + 8 + _REPORT.size


#: the size of a size handshake's block: a control block
handshake_nbytes = control_nbytes


def name_crc(kind: str, stream: str) -> int:
    """The CRC-32 that names a collective of ``kind`` on ``stream`` in a handshake."""
    return zlib.crc32(f"{kind}:{stream}".encode())


@dataclass(frozen=True)
class ControlBlock:
    """One rank's block (see the module docstring for the fields)."""

    kind: int
    session: int
    step: int
    position: int = 0
    name: int = 0
    seq: int = 0
    fingerprint: tuple[int, ...] = ()
    failed: bool = False
    fresh: bool = False
    failed_rank: int = -1
    cause: str = ""
    sent: tuple[int, ...] = ()
    expected: tuple[int, ...] = ()
    collectives: int = 0
    report: Report = Report()

    @property
    def what(self) -> str:
        """The exchange's name, for messages."""
        return _KINDS.get(self.kind, f"kind {self.kind}")

    def pack(self, world: int) -> bytes:
        fingerprint = tuple(self.fingerprint) or (0,) * len(SHARED_FIELDS)
        raw = _FIXED.pack(_MAGIC, self.kind, int(self.failed) | 2 * int(self.fresh),
                          self.session & _NONE,
                          self.step & _NONE, self.position & _NONE, self.name & _NONE,
                          self.seq & _NONE, _NONE if self.failed_rank < 0 else self.failed_rank,
                          *fingerprint, self.cause.encode()[:_CAUSE])
        sent = tuple(self.sent) or (0,) * world
        expected = tuple(self.expected) or (0,) * world
        r = self.report
        pad = (0,) * MAX_CANDIDATES
        costs = (*(r.encode_ps + pad)[:MAX_CANDIDATES], *(r.decode_ps + pad)[:MAX_CANDIDATES])
        none = (0,) * MAX_TIMED
        timed = (*(r.timed_bytes + none)[:MAX_TIMED], *(r.timed_us + none)[:MAX_TIMED])
        errors = (r.error_ppm + pad)[:MAX_CANDIDATES]
        hidden = (r.hidden_us + (0,) * MAX_HIDDEN)[:MAX_HIDDEN]
        return (raw + struct.pack(f"<{2 * world + 1}Q", *sent, *expected, self.collectives)
                + _REPORT.pack(r.link_ops & _NONE, r.link_bytes, r.link_ns, *costs,
                               r.control_bytes, r.control_ns, *timed,
                               *(min(e, _NONE) for e in errors),
                               *(min(h, _NONE) for h in hidden)))

    @classmethod
    def unpack(cls, raw: bytes, world: int) -> ControlBlock:
        fields = _FIXED.unpack(raw[:_FIXED.size])
        magic, kind, flags, session, step, position, name, seq, failed_rank = fields[:9]
        fingerprint = fields[9:9 + len(SHARED_FIELDS)]
        cause = fields[-1].rstrip(b"\x00").decode(errors="replace")
        end = _FIXED.size + 8 * (2 * world + 1)
        counts = struct.unpack(f"<{2 * world + 1}Q", raw[_FIXED.size:end])
        ops, nbytes, ns, *rest = _REPORT.unpack(raw[end:end + _REPORT.size])
        m = 2 * MAX_CANDIDATES
        e = m + 2 + 2 * MAX_TIMED
        us = rest[m + 2 + MAX_TIMED:e]
        timed = next((i for i, t in enumerate(us) if t == 0), MAX_TIMED)  # times are >= 1
        report = Report(ops, nbytes, ns, tuple(rest[:MAX_CANDIDATES]),
                        tuple(rest[MAX_CANDIDATES:m]), rest[m], rest[m + 1],
                        tuple(rest[m + 2:m + 2 + timed]), tuple(us[:timed]),
                        tuple(rest[e:e + MAX_CANDIDATES]), tuple(rest[e + MAX_CANDIDATES:]))
        if magic != _MAGIC:
            return cls(kind=0, session=0, step=0, cause=f"not a control block: {magic!r}")
        return cls(kind=kind, session=session, step=step, position=position, name=name,
                   seq=seq, fingerprint=tuple(fingerprint), failed=bool(flags & 1),
                   fresh=bool(flags & 2),
                   failed_rank=-1 if failed_rank == _NONE else failed_rank, cause=cause,
                   sent=counts[:world], expected=counts[world:2 * world],
                   collectives=counts[2 * world], report=report)


def exchange(transport: Transport, block: ControlBlock, timeout: float,
             device: torch.device) -> list[ControlBlock]:
    """Every rank's block, in rank order: one all-gather on ``transport`` (the control
    channel). A tensor that owns its memory: the backend may release it from its thread."""
    world = transport.world_size
    raw = block.pack(world)
    mine = torch.tensor(list(raw), dtype=torch.uint8, device=device)
    outs = list(torch.empty(len(raw) * world, dtype=torch.uint8, device=device)
                .view(world, len(raw)))
    transport.all_gather(outs, mine).wait(timeout)
    return [ControlBlock.unpack(bytes(o.cpu().numpy()), world) for o in outs]


def failure(blocks: Sequence[ControlBlock]) -> ControlBlock | None:
    """The block of the lowest rank whose session failed, if any."""
    return next((b for b in blocks if b.failed), None)


def disagreements(blocks: Sequence[ControlBlock]) -> list[str]:
    """What the ranks' blocks (in rank order) disagree on; empty when they agree."""
    world = len(blocks)
    problems = []
    kinds = [b.kind for b in blocks]
    if len(set(kinds)) > 1:
        problems.append("the ranks are in different exchanges: " + ", ".join(
            f"rank {r} {b.what}" for r, b in enumerate(blocks)))
    for label, values in (("session", [b.session for b in blocks]),
                          ("step", [b.step for b in blocks])):
        if len(set(values)) > 1:
            problems.append(f"{label} differs by rank: {dict(enumerate(values))}")
    differ = differing_fields([b.fingerprint for b in blocks])
    if differ:
        problems.append(f"CompressionConfig differs in {', '.join(differ)}")
    if problems or kinds[0] == RECOVER:
        return problems
    if kinds[0] == STEP:
        counts = [b.position for b in blocks]
        if len(set(counts)) > 1:
            problems.append(f"collectives in the step differ by rank: {dict(enumerate(counts))}")
        elif len({b.name for b in blocks}) > 1:
            problems.append("the step's collectives (their kinds, streams or shapes) differ "
                            "by rank")
        return problems
    names = [b.name for b in blocks]
    if len(set(names)) > 1:
        problems.append(f"stream name differs by rank: "
                        f"{dict(enumerate(f'{v:#010x}' for v in names))}")
    seqs = [b.seq for b in blocks]
    if len(set(seqs)) > 1:
        problems.append(f"the stream's message number differs by rank: {dict(enumerate(seqs))}")
    positions = [b.position for b in blocks]
    if len(set(positions)) > 1:
        problems.append(f"collectives before this one differ by rank: "
                        f"{dict(enumerate(positions))}")
    for src in range(world):
        for dst in range(world):
            if src != dst and blocks[src].sent[dst] != blocks[dst].expected[src]:
                problems.append(f"rank {src} sends {blocks[src].sent[dst]} bytes to rank "
                                f"{dst}, which expects {blocks[dst].expected[src]}")
    return problems


def replace(block: ControlBlock, **changes: object) -> ControlBlock:
    """``block`` with ``changes``."""
    return dataclasses.replace(block, **changes)  # type: ignore[arg-type]
