"""The size handshake: a fixed-size block every rank shares before a collective's payloads
move, so that ranks that disagree all raise the same error instead of hanging or crashing
the backend (gloo aborts the process on mismatched sizes).

Block layout (little-endian), :func:`handshake_nbytes` bytes per rank::

    offset  size      field
    0       4         magic b"CCHS"
    4       4         session id
    8       4         CRC-32 of "<collective>:<stream name>"
    12      4         step (the stream's message number, or the group's step)
    16      4 x F     the config's fingerprint: a CRC-32 per shared field
                      (compressed_comm.config.SHARED_FIELDS, F of them), padded to 8 bytes
    ...     8 x W     bytes this rank sends to each of the W ranks
    ...     8 x W     bytes this rank expects from each rank

Every rank sees every block and reaches the same verdict (:func:`disagreements`).
"""

from __future__ import annotations

import struct
import zlib
from typing import Sequence

import torch

from ..config import SHARED_FIELDS, differing_fields

__all__ = ["handshake_nbytes", "handshake_block", "disagreements"]

_FIXED = struct.Struct(f"<4sIII{len(SHARED_FIELDS)}I{-4 * len(SHARED_FIELDS) % 8}x")
_MAGIC = b"CCHS"


def handshake_nbytes(world_size: int) -> int:
    """Bytes each rank contributes to the size handshake before a compressed collective."""
    return _FIXED.size + 16 * world_size


def handshake_block(session: int, kind: str, stream: str, step: int,
                    fingerprint: Sequence[int], send: Sequence[int], recv: Sequence[int],
                    device: torch.device) -> torch.Tensor:
    """This rank's block: the sizes it will send to and expects from each rank. A tensor
    that owns its memory: the backend may release it from its own thread."""
    raw = _FIXED.pack(_MAGIC, session & 0xFFFFFFFF, zlib.crc32(f"{kind}:{stream}".encode()),
                      step & 0xFFFFFFFF, *fingerprint)
    raw += struct.pack(f"<{len(send) + len(recv)}Q", *send, *recv)
    return torch.tensor(list(raw), dtype=torch.uint8, device=device)


def disagreements(blocks: Sequence[torch.Tensor]) -> list[str]:
    """What the ranks' blocks (in rank order) disagree on; empty when they agree."""
    world = len(blocks)
    views = [bytes(b.cpu().numpy()) for b in blocks]
    fields = [_FIXED.unpack(v[:_FIXED.size]) for v in views]
    sizes = [struct.unpack(f"<{2 * world}Q", v[_FIXED.size:]) for v in views]
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
    return problems
