"""The two groups: :class:`CompressedGroup` (residual-compressed) and :class:`RawGroup`
(uncompressed, the exact baseline), the same collectives over two framings."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from ..config import CompressionConfig
from ..session import Session, SessionStats, StreamKey
from ..transport import Transport
from .collectives import DEFAULT_TIMEOUT, _GroupBase
from .framing import CompressedFraming, RawFraming
from .plane import ControlPlane

__all__ = ["CompressedGroup", "RawGroup"]


class CompressedGroup(ControlPlane, _GroupBase):
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
        self.framing = CompressedFraming(self.session, self.renew_streams)
        #: with ``track_error``: per all_reduce stream, a bound on the relative error of its
        #: last result against the exact reduction (compression error; the rounding of the
        #: sum to the tensor's dtype aside), the same on every rank
        self.reduce_errors: dict[str, float] = {}
        self._fingerprint = self.config.fingerprint()
        auto = self.session.auto
        if auto is not None:
            if self.world_size > 1 and not self.config.handshake:
                raise ValueError("codec='auto' needs CompressionConfig(handshake=True): the "
                                 "ranks agree on every stream's codec in the per-step control "
                                 "exchange")
            auto.world_size = self.world_size
            self._link_meter = auto.meter
        if self._control_on() and self.transport.accepts_short_messages:
            # now, while every rank is here (it costs nothing where the channel is a gloo
            # group's own): a rank that fails must not leave its peers making a channel
            self.transport.control()

    def __repr__(self) -> str:
        return (f"CompressedGroup(rank={self.rank}, world_size={self.world_size}, "
                f"codec={self.config.codec!r}, step={self.step_index})")

    def _reset(self) -> None:
        self.session.reset()  # advances the session id written into every header
        self.reduce_errors = {}
        self._posted_at = {}
        if self.session.auto is not None:
            self.session.auto.advance(self.step_index)

    def stats(self) -> SessionStats:
        """Traffic, accuracy and memory of every stream of the current session."""
        return self.session.stats()

    def step(self) -> None:
        """Mark the end of a denoising step (every rank). With the control plane
        (``config.handshake``), the ranks agree on the step's collectives here, in one small
        exchange: the next step's collectives that repeat them need no handshake."""
        if self._control_on():
            self._end_step()
        self.step_index += 1
        if self.session.auto is not None:
            self.session.auto.advance(self.step_index)

    def _end_session(self) -> bool:
        return self._recover() if self._control_on() else super()._end_session()

    def _entry_posted(self) -> None:
        if self._control_on():
            self._plan.posted += 1

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
        work = self._all_gather_op(what, block, [o.view(torch.uint8) for o in outs])
        self._wait(work, self.timeout, what)
        self._sent(vec.nbytes * (world - 1), world - 1)
        errors = torch.stack(outs).cpu()  # [sender][block, then own reduced block]
        bound = errors[:, :world].sum(0) + errors[:, world]
        norm = float(torch.linalg.vector_norm(result.float()))
        self.reduce_errors[stream] = float(bound.norm()) / max(norm, 1e-30)


class RawGroup(_GroupBase):
    """The same collectives as :class:`CompressedGroup`, uncompressed: the exact baseline.

    Tensors travel as their raw bytes; nothing is kept between calls, ``stream`` only names
    the transfer in errors. Received tensors are fresh buffers.
    """

    def __init__(self, transport: Transport | dist.ProcessGroup | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(transport, timeout=timeout)
        self.framing = RawFraming()

    def __repr__(self) -> str:
        return f"RawGroup(rank={self.rank}, world_size={self.world_size}, step={self.step_index})"
