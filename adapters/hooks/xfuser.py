"""xDiT (xfuser): its Ulysses all-to-all and PipeFusion's patch transfers between pipeline
stages, compressed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from compressed_comm import CompressedGroup, Handle, ops
from compressed_comm.wire import SUPPORTED_DTYPES

from .base import HookHandle, compressible, group_name, replace_method
from .points import HookPoint, Patch, make_patch, resolve_owner

__all__ = ["PIPEFUSION", "ULYSSES", "PipeFusionHooks", "install_pipefusion", "install_ulysses"]

ULYSSES = HookPoint(
    "ulysses", "xfuser", "xfuser.model_executor.layers.usp", "", ("_sdpa_all_to_all_single",),
    "xDiT's Ulysses all-to-all of Q/K/V and of the attention output")

PIPEFUSION = HookPoint(
    "pipefusion", "xfuser", "xfuser.core.distributed.group_coordinator",
    "PipelineGroupCoordinator",
    ("pipeline_send", "pipeline_isend", "pipeline_recv", "recv_next", "get_pipeline_recv_data"),
    "PipeFusion's point-to-point patches between pipeline stages")


def install_ulysses(handle: HookHandle, module: Any) -> list[Patch]:
    """``usp._sdpa_all_to_all_single(x)``: an equal all-to-all of ``x``'s flat bytes over
    the Ulysses group; compressed as an all-to-all along dim 0 (one stream per chunk, rows
    of ``x``'s last dim, the head dim) by ``compressed_comm::all_to_all``."""
    owner = resolve_owner(ULYSSES, module)
    key = handle.key

    def build(original: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
        def _sdpa_all_to_all_single(x: torch.Tensor) -> torch.Tensor:
            pg = owner.PROCESS_GROUP.ULYSSES_PG
            # 2-D inputs are xDiT's packed GQA exchange: rows are whole chunks, no channels
            if x.dim() < 3 or not compressible(x) or x.shape[0] % dist.get_world_size(pg):
                return original(x)
            # a compressed_comm:: op: traced into compiled graphs, no graph break
            return ops.all_to_all(x, key, group_name(pg), "a2a")
        return _sdpa_all_to_all_single

    return [make_patch(owner, "_sdpa_all_to_all_single", handle, build)]


class PipeFusionHooks:
    """``PipelineGroupCoordinator``'s patch transfers between pipeline stages, compressed:
    one stream per ``(name, patch index)``. The first transfer of each key still runs
    xDiT's shape handshake; payload sizes then follow from the shape.

    Each method named after a hook point attribute is that attribute's replacement, called
    with the original method and the coordinator; what it cannot compress (another dtype,
    one stage) goes to the original.
    """

    def __init__(self, handle: HookHandle) -> None:
        self.handle = handle

    def patches(self, owner: Any) -> list[Patch]:
        """The patches of ``owner`` (the coordinator class), one per attribute."""
        return [make_patch(owner, attr, self.handle, replace_method(attr, getattr(self, attr)))
                for attr in PIPEFUSION.attrs]

    # ------------------------------------------------------------------ replacements

    def pipeline_send(self, original: Callable[..., None], coord: Any, tensor: torch.Tensor,
                      name: str = "latent", segment_idx: int = -1) -> None:
        if not self._compress(coord, tensor):
            return original(coord, tensor, name, segment_idx)
        self._start_send(coord, tensor, name, segment_idx).wait()

    def pipeline_isend(self, original: Callable[..., None], coord: Any, tensor: torch.Tensor,
                       name: str = "latent", segment_idx: int = -1) -> None:
        if not self._compress(coord, tensor):
            return original(coord, tensor, name, segment_idx)
        # xDiT drops the send's Work; keep ours
        self.handle.keep_until_session_end(self._start_send(coord, tensor, name, segment_idx))

    def pipeline_recv(self, original: Callable[..., torch.Tensor], coord: Any, idx: int = -1,
                      name: str = "latent") -> torch.Tensor:
        if not self._compress(coord):
            return original(coord, idx, name)
        h, buf = self._start_recv(coord, idx, name)
        return buf.copy_(h.wait())

    def recv_next(self, original: Callable[[Any], None], coord: Any) -> None:
        if not self._compress(coord):
            return original(coord)
        if not coord.recv_tasks_queue:
            raise ValueError("No more tasks to receive")
        name, idx = coord.recv_tasks_queue.pop(0)
        h, _ = self._start_recv(coord, idx, name)
        coord.receiving_tasks.append((h, name, idx))

    def get_pipeline_recv_data(self, original: Callable[..., torch.Tensor], coord: Any,
                               idx: int = -1, name: str = "latent") -> torch.Tensor:
        if not self._compress(coord):
            return original(coord, idx, name)
        if not coord.receiving_tasks:
            raise RuntimeError("No tasks to receive, call add_pipeline_recv_task first")
        h, got_name, got_idx = coord.receiving_tasks.pop(0)
        if (got_name, got_idx) != (name, idx):
            raise RuntimeError(f"received patch {got_name}[{got_idx}] but "
                               f"{name}[{idx}] was requested")
        return coord.recv_buffer[name][idx].copy_(h.wait())

    # ------------------------------------------------------------------ helpers

    def _groups(self, coord: Any) -> tuple[CompressedGroup, CompressedGroup]:
        """The groups xDiT sends and receives on (two directed ones for 2 stages)."""
        if coord.world_size == 2:
            return (self.handle.group_for(coord.device_groups[coord.rank_in_group % 2]),
                    self.handle.group_for(coord.device_groups[(coord.rank_in_group + 1) % 2]))
        g = self.handle.group_for(coord.device_group)
        return g, g

    @staticmethod
    def _stream(name: str | None, idx: int) -> str:
        return f"pipefusion.{name or 'latent'}[{idx}]"

    @staticmethod
    def _compress(coord: Any, tensor: torch.Tensor | None = None) -> bool:
        dtype = tensor.dtype if tensor is not None else coord.dtype
        return dtype in SUPPORTED_DTYPES and coord.world_size > 1

    def _start_send(self, coord: Any, tensor: torch.Tensor, name: str,
                    segment_idx: int) -> Handle[None]:
        tensor = tensor.contiguous()
        coord._check_shape_and_buffer(tensor_send_to_next=tensor, name=name,
                                      segment_idx=segment_idx)
        send, _ = self._groups(coord)
        return send.isend(tensor, (coord.rank_in_group + 1) % coord.world_size,
                          stream=self._stream(name, segment_idx))

    def _start_recv(self, coord: Any, idx: int, name: str
                    ) -> tuple[Handle[torch.Tensor], torch.Tensor]:
        name = name or "latent"
        coord._check_shape_and_buffer(recv_prev=True, name=name, segment_idx=idx)
        buf = coord.recv_buffer[name][idx]
        _, recv = self._groups(coord)
        h = recv.irecv(buf, (coord.rank_in_group - 1) % coord.world_size,
                       stream=self._stream(name, idx))
        return h, buf


def install_pipefusion(handle: HookHandle, module: Any) -> list[Patch]:
    """``PipelineGroupCoordinator``'s ``pipeline_send/isend/recv``, ``recv_next`` and
    ``get_pipeline_recv_data`` (class methods, so every importer is covered); see
    :class:`PipeFusionHooks`."""
    return PipeFusionHooks(handle).patches(resolve_owner(PIPEFUSION, module))
