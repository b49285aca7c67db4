"""Tensor parallelism through DTensor (torch's ``parallelize_module``, diffusers'
``TensorParallelConfig``): the all-reduce and reduce-scatter of partial sums, compressed."""

from __future__ import annotations

from typing import Any

import torch

from compressed_comm import CompressedGroup

from .base import HookHandle, ModuleWith, compressible, eager
from .points import HookPoint, Patch, make_patch, resolve_owner

__all__ = ["DTENSOR_REDUCE", "install_dtensor_reduce"]

DTENSOR_REDUCE = HookPoint(
    "dtensor_reduce", "torch", "torch.distributed.tensor.placement_types", "", ("funcol",),
    "tensor parallelism through DTensor (torch's parallelize_module, diffusers' "
    "TensorParallelConfig): the all-reduce and reduce-scatter of partial sums, "
    "with enable_compression(..., reduce=True)")


def install_dtensor_reduce(handle: HookHandle, module: Any) -> list[Patch]:
    """DTensor's ``Partial`` placement reduces with ``funcol.all_reduce(tensor, reduceOp,
    group=(mesh, dim))`` (row-parallel outputs becoming replicated) and
    ``funcol.reduce_scatter_single(tensor, reduceOp, scatter_dim, group)`` (becoming
    sharded); sums and averages of float tensors over a mesh dimension are compressed
    (:meth:`~compressed_comm.CompressedGroup.all_reduce`, ``reduce_scatter``: one stream per
    ``(src, dst)`` block, every rank gets the same result); other reductions, groups given
    otherwise and tensors that need gradients go through unchanged."""
    owner = resolve_owner(DTENSOR_REDUCE, module)

    def op_and_group(tensor: torch.Tensor, reduce_op: Any, group: Any
                     ) -> tuple[str, CompressedGroup] | None:
        op = str(reduce_op).lower()
        pg = _mesh_group(group)
        if op not in ("sum", "avg") or pg is None or not compressible(tensor):
            return None
        return op, handle.group_for(pg)

    def build(real: Any) -> Any:
        @eager
        def all_reduce(tensor: torch.Tensor, reduceOp: str, group: Any,  # noqa: N803
                       *args: Any, **kwargs: Any) -> torch.Tensor:
            found = op_and_group(tensor, reduceOp, group)
            if found is None or args or kwargs:
                return real.all_reduce(tensor, reduceOp, group, *args, **kwargs)
            op, compressed = found
            return compressed.all_reduce(tensor, stream=handle.stream_name("reduce"), op=op)

        @eager
        def reduce_scatter_single(tensor: torch.Tensor, reduceOp: str,  # noqa: N803
                                  scatter_dim: int, group: Any, *args: Any,
                                  **kwargs: Any) -> torch.Tensor:
            found = op_and_group(tensor, reduceOp, group)
            world = None if found is None else found[1].world_size
            if found is None or args or kwargs or tensor.shape[scatter_dim] % world:
                return real.reduce_scatter_single(tensor, reduceOp, scatter_dim, group,
                                                  *args, **kwargs)
            op, compressed = found
            rows = tensor.movedim(scatter_dim, 0).contiguous()
            mine = compressed.reduce_scatter(rows, stream=handle.stream_name("reduce"), op=op)
            return mine.movedim(0, scatter_dim).contiguous()
        return ModuleWith(real, all_reduce=all_reduce,
                           reduce_scatter_single=reduce_scatter_single)

    return [make_patch(owner, "funcol", handle, build)]


def _mesh_group(group: Any) -> Any | None:
    """The process group of a ``(DeviceMesh, dim)`` pair or a 1-D mesh; None otherwise."""
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, tuple) and len(group) == 2 and isinstance(group[0], DeviceMesh):
        return group[0].get_group(group[1])
    if isinstance(group, DeviceMesh) and group.ndim == 1:
        return group.get_group()
    return None
