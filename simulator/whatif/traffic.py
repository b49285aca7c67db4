"""The collectives of one step: which, how many, of what shape, and what they cost."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from compressed_comm import get_codec
from compressed_comm.group import handshake_nbytes

from ..network import Link, choose, collective_seconds
from .models import WIRE_DTYPE, ModelSpec, check_world, local_image_tokens

__all__ = ["PARALLELISMS", "CODEC_PASSES", "Traffic", "step_traffic"]

#: Parallelisms priced here and the collective each one runs per exchange.
PARALLELISMS: Mapping[str, str] = MappingProxyType(
    {"patch": "all_gather", "ring": "ring", "ulysses": "all_to_all", "pipefusion": "p2p"}
)
#: Device-memory traffic of a codec in units of one raw message: (encode, decode), for
#: residual order 1 with the fused kernels. Encode reads the tensor and the reference for
#: the scale pass and again for the quantise pass and writes the reference (5); decode
#: reads the reference and writes it back (2; the payload is small). Low-rank's subspace
#: step reads the residual twice more (7); the identity keyframe copies (3, 2).
CODEC_PASSES: Mapping[str, tuple[int, int]] = MappingProxyType({
    "identity": (3, 2), "fp8": (3, 2), "int8": (5, 2), "int4": (5, 2), "int2": (5, 2),
    "binary": (5, 2), "lowrank": (7, 2), "lowrankq": (7, 2), "topk": (6, 2)})


@dataclass(frozen=True)
class Traffic:
    """The collectives one rank takes part in during one step: ``count`` of one shape."""

    collective: str             # network.COLLECTIVES
    count: int                  # collectives per step
    shape: tuple[int, int]      # one message (rows, cols), as the codec sees it
    world: int

    def message_bytes(self, codec: str | None) -> int:
        """Bytes of one message: raw bf16 (``codec=None``) or the codec's exact payload."""
        if codec is None:
            return self.shape[0] * self.shape[1] * WIRE_DTYPE.itemsize
        return get_codec(codec).payload_nbytes(self.shape, WIRE_DTYPE)

    @property
    def peers(self) -> int:
        """Messages one rank sends per collective: one for a p2p hop, ``world - 1`` else."""
        return 1 if self.collective == "p2p" else self.world - 1

    def bytes_per_step(self, codec: str | None) -> int:
        """Bytes one rank sends in one step (:attr:`peers` messages per collective)."""
        return self.count * self.peers * self.message_bytes(codec)

    def held_bytes(self, codec: str | None, overlap: bool) -> int:
        """Bytes one rank keeps from one step to the next: for a codec (residual order 1)
        a reference per stream -- every other rank's message of every collective, plus its
        own encoder's (one per collective; one per peer for all-to-all); for raw stale
        K/V (DistriFusion) every other rank's message; nothing for synchronous raw."""
        raw = self.message_bytes(None)
        if self.collective == "p2p":  # PipeFusion: one stream out and one in per patch
            return 0 if codec is None else 2 * self.count * raw
        others = self.count * (self.world - 1) * raw
        if codec is None:
            return others if overlap else 0
        own = self.count * raw * ((self.world - 1) if self.collective == "all_to_all" else 1)
        return others + own

    def codec_seconds(self, codec: str | None, bandwidth: float) -> float:
        """Seconds one rank spends in codec kernels per step at ``bandwidth`` bytes/s of
        device memory: per collective one encode (one per peer for all-to-all) and one
        decode per message received (:data:`CODEC_PASSES`); 0 for raw tensors."""
        if codec is None or self.world == 1:  # one rank sends nothing, encodes nothing
            return 0.0
        enc, dec = CODEC_PASSES[codec.split(":")[0]]
        encodes = self.peers if self.collective == "all_to_all" else 1
        decodes = self.peers
        return self.count * (enc * encodes + dec * decodes) * self.message_bytes(None) / bandwidth

    def seconds(self, link: Link, codec: str | None, first: bool = False,
                nbytes: int | None = None) -> float:
        """Communication seconds of one step, collectives run one after another, the
        control plane's exchanges (:meth:`control_seconds`) included; each message is
        ``nbytes`` (default: :meth:`message_bytes`)."""
        nbytes = self.message_bytes(codec) if nbytes is None else nbytes
        one = collective_seconds(self.collective, nbytes, self.world, link)
        return self.count * one + self.control_seconds(link, codec, first)

    def control_seconds(self, link: Link, codec: str | None, first: bool = False) -> float:
        """Seconds of one step's control exchanges (``CompressionConfig(handshake=True)``,
        the default), each an all-gather of :func:`~compressed_comm.group.handshake_nbytes`
        per rank: one at the end of every step, and on a generation's ``first`` step a size
        handshake before every collective too (later steps repeat the agreed ones); none
        for raw tensors and point-to-point messages."""
        if codec is None or self.collective == "p2p":
            return 0.0
        block = collective_seconds("all_gather", handshake_nbytes(self.world), self.world,
                                   link)
        return (1 + (self.count if first else 0)) * block


def step_traffic(model: ModelSpec, world: int, parallelism: str,
                 patches: int | None = None) -> Traffic:
    """The per-step collectives of ``parallelism`` for ``model`` on ``world`` ranks.

    * ``patch``: per layer, an all-gather of K and one of V, each the rank's local image
      tokens x hidden;
    * ``ring``: the same blocks passed around the ring (``world - 1`` hops);
    * ``ulysses``: per layer, four all-to-alls (Q, K, V, attention output), each sending
      every other rank the local image tokens x ``hidden / world`` (its heads);
    * ``pipefusion``: ``world`` pipeline stages of ``layers / world`` layers; each step,
      every stage sends each of the ``patches`` (default ``world``) image patches' hidden
      states to the next stage: ``patches`` point-to-point messages of
      ``image tokens / patches`` x ``hidden``.

    Text tokens are replicated and never sent; the CFG batch multiplies the rows.
    """
    collective = choose(PARALLELISMS, parallelism, "parallelism")
    parallelism = parallelism.strip().lower()
    check_world(model, world)
    if parallelism == "pipefusion":
        m = patches or world
        if m < 1 or model.image_tokens < m:
            raise ValueError(f"pipefusion needs 1 <= patches <= {model.image_tokens}, got {m}")
        return Traffic(collective, m, (model.batch * math.ceil(model.image_tokens / m),
                                       model.hidden), world)
    rows = model.batch * local_image_tokens(model, world)
    if parallelism == "ulysses":
        if model.heads % world:
            divisors = [w for w in range(1, model.heads + 1) if model.heads % w == 0]
            raise ValueError(
                f"ulysses needs world to divide the {model.heads} attention heads of "
                f"{model.name}; got world {world} (choose one of "
                f"{', '.join(map(str, divisors))})")
        return Traffic(collective, 4 * model.layers, (rows, model.hidden // world), world)
    return Traffic(collective, 2 * model.layers, (rows, model.hidden), world)

