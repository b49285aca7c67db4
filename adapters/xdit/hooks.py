"""The compressing replacements for each hook point (see :mod:`adapters.xdit.points`).

Every replacement takes its :class:`~compressed_comm.CompressedGroup` from the handle by the
process group the original call would have used, names its stream from the attention layer
being run (``<layer>.<kind><n>``: the n-th such call of that layer in this step) and falls
back to the original code for what it cannot compress: other dtypes, tensors that need
gradients, shapes that do not split. The fallback is the same decision on every rank, since
every rank runs the same program on the same shapes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch

from compressed_comm.wire import SUPPORTED_DTYPES

from .points import HOOK_POINTS, Patch, make_patch, resolve_owner

if TYPE_CHECKING:
    from compressed_comm import CompressedGroup

    from .compression import XDiTCompression

__all__ = ["INSTALLERS"]

def _eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` eagerly under torch.compile (a graph break), never traced into a graph."""
    return torch.compiler.disable(fn, recursive=True)


def compressible(x: torch.Tensor) -> bool:
    """Whether ``x`` can travel compressed (float dtype, no autograd)."""
    return x.dtype in SUPPORTED_DTYPES and not (x.requires_grad and torch.is_grad_enabled())


# ---------------------------------------------------------------------- Ulysses all-to-all

def install_ulysses(handle: XDiTCompression, module: Any) -> list[Patch]:
    """``usp._sdpa_all_to_all_single(x)``: an equal all-to-all of ``x``'s flat bytes over
    the Ulysses group; compressed as an all-to-all along dim 0 (one stream per chunk, rows
    of ``x``'s last dim, the head dim)."""
    owner = resolve_owner(HOOK_POINTS["ulysses"], module)

    def build(original: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
        @_eager
        def _sdpa_all_to_all_single(x: torch.Tensor) -> torch.Tensor:
            pg = owner.PROCESS_GROUP.ULYSSES_PG
            group = handle.group_for(pg)
            # 2-D inputs are xDiT's packed GQA exchange: rows are whole chunks, no channels
            if x.dim() < 3 or not compressible(x) or x.shape[0] % group.world_size:
                return original(x)
            return group.all_to_all(x.contiguous(), stream=handle.stream_name("a2a"))
        return _sdpa_all_to_all_single

    return [make_patch(owner, "_sdpa_all_to_all_single", handle, build)]


# ---------------------------------------------------------------------- torch's ring

class CompressedRotater:
    """torch's ``_RingRotater`` interface over a compressed all-gather or ring pass.

    ``exchange_buffers`` receives this rank's flat ``K||V`` (first call) and the block it
    just got (later calls: nothing to do, packets are forwarded unchanged by the ring);
    ``next_buffer`` returns the next origin's flat ``K||V``, rank-1 first.
    """

    def __init__(self, group: CompressedGroup, stream: str, use_ring: bool,
                 head_dim: int) -> None:
        self._group = group
        self._stream = stream
        self._use_ring = use_ring
        self._head_dim = head_dim
        self._calls = 0
        self._blocks: Any = None
        self._hops: Iterator[tuple[int, torch.Tensor]] | None = None

    def exchange_buffers(self, curr_buffer: torch.Tensor) -> None:
        self._calls += 1
        if self._calls > 1:
            return
        x = curr_buffer.contiguous().view(-1, self._head_dim)
        if self._use_ring:
            self._hops = self._group.ring_iter(x, stream=self._stream)
            next(self._hops)  # this rank's own block; posts the first hop
        else:
            self._blocks = self._group.all_gather_async(x, stream=self._stream)

    def next_buffer(self) -> torch.Tensor:
        if self._hops is not None:
            _, block = next(self._hops)
            return block.reshape(-1)
        if self._blocks is None:
            raise RuntimeError(f"ring stream {self._stream!r}: next_buffer() before "
                               "exchange_buffers()")
        blocks = self._blocks.wait()
        origin = (self._group.rank - self._calls) % self._group.world_size
        return blocks[origin].reshape(-1)


def install_torch_ring(handle: XDiTCompression, module: Any) -> list[Patch]:
    """torch's ``_templated_ring_attention`` creates a rotater per call with
    ``_create_rotater(group, seq_dim)``; the forward K||V rotater becomes compressed."""
    point = HOOK_POINTS["torch_ring"]
    owner = resolve_owner(point, module)
    # the K shape of the ring attention being run, set by the wrapped entry point
    kv_shape: ContextVar[tuple[int, ...] | None] = ContextVar("kv_shape", default=None)
    method_enum = owner._RotateMethod

    def build_rotater(original: Callable[..., Any]) -> Callable[..., Any]:
        @_eager
        def _create_rotater(pg: Any, seq_dim: int, method: Any = None) -> Any:
            shape = kv_shape.get()
            kv_shape.set(None)
            chosen = owner._cp_options.rotate_method
            if (method is not None or shape is None
                    or chosen not in (method_enum.ALL_GATHER, method_enum.ALL_TO_ALL)):
                # explicit methods are the backward pass's gradient rotaters
                return original(pg, seq_dim, method)
            group = handle.group_for(pg)
            return CompressedRotater(group, handle.stream_name("kv"),
                                     chosen == method_enum.ALL_TO_ALL, shape[-1])
        return _create_rotater

    def build_entry(original: Callable[..., Any]) -> Callable[..., Any]:
        def _templated_ring_attention(group: Any, seq_dim: int, op: Any, query: torch.Tensor,
                                      key: torch.Tensor, value: torch.Tensor, *args: Any,
                                      **kwargs: Any) -> Any:
            same = key.shape == value.shape and key.dtype == value.dtype and key.dim() > 0
            token = kv_shape.set(tuple(key.shape) if same and compressible(key) else None)
            try:
                return original(group, seq_dim, op, query, key, value, *args, **kwargs)
            finally:
                kv_shape.reset(token)
        return _templated_ring_attention

    patches = [make_patch(owner, "_create_rotater", handle, build_rotater)]
    entry = make_patch(owner, "_templated_ring_attention", handle, build_entry)
    patches.append(entry)
    # modules that imported the entry point by name (torch's re-export, xfuser's usp)
    for mod in list(sys.modules.values()):
        if mod is not owner and getattr(mod, "_templated_ring_attention", None) is entry.original:
            patches.append(Patch(mod, "_templated_ring_attention", entry.original,
                                 entry.replacement))
    return patches


# ---------------------------------------------------------------------- yunchang's ring

class _Slot:
    """One tensor this rank put on the ring: its hops and the buffer of the latest hop."""

    __slots__ = ("hops", "res")

    def __init__(self, hops: Iterator[tuple[int, torch.Tensor]]) -> None:
        self.hops = hops
        self.res: torch.Tensor | None = None


class RingCommState:
    """The compressed side of one ``yunchang.ring.utils.RingComm``.

    yunchang's loop sends this rank's K and V on the first round, then forwards what it
    received. A tensor sent on the first round starts a compressed ring pass; a tensor that
    is the buffer returned for one of them is a forward, which the ring pass does itself
    (packets travel unchanged and are decoded once here). Anything else goes through the
    original (uncompressed) code.
    """

    def __init__(self, group: CompressedGroup, handle: XDiTCompression) -> None:
        self.group = group
        self.handle = handle
        self.slots: list[_Slot] = []
        self.pending: list[_Slot] = []
        self.rounds = 0
        self.committed = False

    def send_recv(self, comm: Any, original: Callable[..., torch.Tensor], to_send: torch.Tensor,
                  recv_tensor: torch.Tensor | None = None) -> torch.Tensor:
        slot = next((s for s in self.slots if to_send is s.res and s not in self.pending), None)
        if slot is None and self.rounds == 0 and to_send.dim() > 0 and compressible(to_send):
            x = to_send.contiguous()
            slot = _Slot(self.group.ring_iter(x.view(-1, x.shape[-1]),
                                              stream=self.handle.stream_name("ring")))
            next(slot.hops)  # own block; posts the first hop
            self.slots.append(slot)
        if slot is None:
            return original(comm, to_send, recv_tensor)
        slot.res = torch.empty_like(to_send) if recv_tensor is None else recv_tensor
        self.pending.append(slot)
        return slot.res

    def commit(self, comm: Any, original: Callable[[Any], None]) -> None:
        if self.committed:
            raise RuntimeError("commit called twice")
        self.committed = True
        if comm._ops:
            original(comm)

    def wait(self, comm: Any, original: Callable[[Any], None]) -> None:
        if not self.committed:
            raise RuntimeError("wait called before commit")
        if comm._reqs is not None:
            original(comm)
        for slot in self.pending:
            try:
                _, block = next(slot.hops)
            except StopIteration:
                raise RuntimeError(
                    f"rank {self.group.rank}: a K/V block was forwarded more than "
                    f"{self.group.world_size - 1} times around a ring of "
                    f"{self.group.world_size}") from None
            assert slot.res is not None
            slot.res.copy_(block.view(slot.res.shape))
        self.pending = []
        self.rounds += 1
        self.committed = False
        comm._ops = []


def install_yunchang_ring(handle: XDiTCompression, module: Any) -> list[Patch]:
    """``RingComm.send_recv/commit/wait`` (class methods, so every importer is covered)."""
    owner = resolve_owner(HOOK_POINTS["yunchang_ring"], module)
    attr = "_compressed_comm_state"

    def state(comm: Any) -> RingCommState | None:
        if comm.world_size < 2:
            return None
        if attr not in comm.__dict__:
            comm.__dict__[attr] = RingCommState(handle.group_for(comm._process_group), handle)
        return comm.__dict__[attr]

    def build(method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
            @_eager
            def replacement(self: Any, *args: Any, **kwargs: Any) -> Any:
                st = state(self)
                if st is None:
                    return original(self, *args, **kwargs)
                return getattr(st, method)(self, original, *args, **kwargs)
            replacement.__name__ = method
            return replacement
        return wrap

    return [make_patch(owner, m, handle, build(m)) for m in ("send_recv", "commit", "wait")]


# ---------------------------------------------------------------------- yunchang's Ulysses

class _ModuleWith:
    """A module (``torch.distributed``, its functional collectives) as a patched caller
    sees it: the real one's attributes except the given replacements."""

    def __init__(self, real: Any, **replacements: Callable[..., Any]) -> None:
        self._real = real
        self.__dict__.update(replacements)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def install_yunchang_ulysses(handle: XDiTCompression, module: Any) -> list[Patch]:
    """``yunchang.comm.all_to_all`` calls ``dist.all_to_all_single(output, input, group=)``
    on ``(P, ..., head dim)`` tensors; its ``dist`` becomes one whose equal-split,
    synchronous all-to-all is compressed along dim 0 (one stream per chunk)."""
    owner = resolve_owner(HOOK_POINTS["yunchang_ulysses"], module)

    def build(real: Any) -> Any:
        @_eager
        def all_to_all_single(output: torch.Tensor, input: torch.Tensor,
                              output_split_sizes: Any = None, input_split_sizes: Any = None,
                              group: Any = None, async_op: bool = False) -> Any:
            compressed = handle.group_for(group)
            if (output_split_sizes is not None or input_split_sizes is not None or async_op
                    or input.dim() < 3 or not compressible(input)
                    or input.shape[0] % compressed.world_size or output.shape != input.shape):
                return real.all_to_all_single(output, input, output_split_sizes,
                                              input_split_sizes, group, async_op)
            output.copy_(compressed.all_to_all(input.contiguous(),
                                               stream=handle.stream_name("a2a")))
            return None
        return _ModuleWith(real, all_to_all_single=all_to_all_single)

    return [make_patch(owner, "dist", handle, build)]


# ---------------------------------------------------------------------- PipeFusion

def install_pipefusion(handle: XDiTCompression, module: Any) -> list[Patch]:
    """``PipelineGroupCoordinator`` patches between pipeline stages, one stream per
    ``(name, patch index)``. The first transfer of each key still runs xDiT's shape
    handshake; payload sizes then follow from the shape."""
    owner = resolve_owner(HOOK_POINTS["pipefusion"], module)

    def groups(coord: Any) -> tuple[CompressedGroup, CompressedGroup]:
        """The groups xDiT sends and receives on (two directed ones for 2 stages)."""
        if coord.world_size == 2:
            return (handle.group_for(coord.device_groups[coord.rank_in_group % 2]),
                    handle.group_for(coord.device_groups[(coord.rank_in_group + 1) % 2]))
        g = handle.group_for(coord.device_group)
        return g, g

    def stream(name: str | None, idx: int) -> str:
        return f"pipefusion.{name or 'latent'}[{idx}]"

    def start_send(coord: Any, tensor: torch.Tensor, name: str, segment_idx: int) -> Any:
        tensor = tensor.contiguous()
        coord._check_shape_and_buffer(tensor_send_to_next=tensor, name=name,
                                      segment_idx=segment_idx)
        send, _ = groups(coord)
        return send.isend(tensor, (coord.rank_in_group + 1) % coord.world_size,
                          stream=stream(name, segment_idx))

    def start_recv(coord: Any, idx: int, name: str) -> tuple[Any, torch.Tensor]:
        name = name or "latent"
        coord._check_shape_and_buffer(recv_prev=True, name=name, segment_idx=idx)
        buf = coord.recv_buffer[name][idx]
        _, recv = groups(coord)
        h = recv.irecv(buf, (coord.rank_in_group - 1) % coord.world_size,
                       stream=stream(name, idx))
        return h, buf

    def compress(coord: Any, tensor: torch.Tensor | None = None) -> bool:
        dtype = tensor.dtype if tensor is not None else coord.dtype
        return dtype in SUPPORTED_DTYPES and coord.world_size > 1

    def build_send(blocking: bool) -> Callable[[Callable[..., None]], Callable[..., Any]]:
        def wrap(original: Callable[..., None]) -> Callable[..., Any]:
            @_eager
            def send(self: Any, tensor: torch.Tensor, name: str = "latent",
                     segment_idx: int = -1) -> None:
                if not compress(self, tensor):
                    return original(self, tensor, name, segment_idx)
                sent = start_send(self, tensor, name, segment_idx)
                if blocking:
                    sent.wait()
                else:  # xDiT drops the send's Work; keep ours
                    handle.keep_until_session_end(sent)
            send.__name__ = original.__name__
            return send
        return wrap

    def build_recv(original: Callable[..., torch.Tensor]) -> Callable[..., Any]:
        @_eager
        def pipeline_recv(self: Any, idx: int = -1, name: str = "latent") -> torch.Tensor:
            if not compress(self):
                return original(self, idx, name)
            h, buf = start_recv(self, idx, name)
            return buf.copy_(h.wait())
        return pipeline_recv

    def build_recv_next(original: Callable[[Any], None]) -> Callable[..., Any]:
        @_eager
        def recv_next(self: Any) -> None:
            if not compress(self):
                return original(self)
            if not self.recv_tasks_queue:
                raise ValueError("No more tasks to receive")
            name, idx = self.recv_tasks_queue.pop(0)
            h, _ = start_recv(self, idx, name)
            self.receiving_tasks.append((h, name, idx))
        return recv_next

    def build_get(original: Callable[..., torch.Tensor]) -> Callable[..., Any]:
        @_eager
        def get_pipeline_recv_data(self: Any, idx: int = -1,
                                   name: str = "latent") -> torch.Tensor:
            if not compress(self):
                return original(self, idx, name)
            if not self.receiving_tasks:
                raise RuntimeError("No tasks to receive, call add_pipeline_recv_task first")
            h, got_name, got_idx = self.receiving_tasks.pop(0)
            if (got_name, got_idx) != (name, idx):
                raise RuntimeError(f"received patch {got_name}[{got_idx}] but "
                                   f"{name}[{idx}] was requested")
            return self.recv_buffer[name][idx].copy_(h.wait())
        return get_pipeline_recv_data

    return [make_patch(owner, "pipeline_send", handle, build_send(blocking=True)),
            make_patch(owner, "pipeline_isend", handle, build_send(blocking=False)),
            make_patch(owner, "pipeline_recv", handle, build_recv),
            make_patch(owner, "recv_next", handle, build_recv_next),
            make_patch(owner, "get_pipeline_recv_data", handle, build_get)]


# ---------------------------------------------------------------------- diffusers' Ulysses

def install_diffusers_ulysses(handle: XDiTCompression, module: Any) -> list[Patch]:
    """``attention_dispatch._all_to_all_single(x, group)``: diffusers' Ulysses all-to-all
    (``TemplatedUlyssesAttention``) of Q/K/V ``(P, S/P, B, H/P, D)`` and of the output
    ``(P, H/P, B, S/P, D)``; compressed along dim 0, one stream per chunk. The log-sum-exp
    ``(P, H/P, B, S/P)`` (4-D, only with ring attention on top) passes through exact: it is
    small and the ring's merge weights its blocks by its exponential."""
    owner = resolve_owner(HOOK_POINTS["diffusers_ulysses"], module)

    def build(original: Callable[..., torch.Tensor]) -> Callable[..., Any]:
        @_eager
        def _all_to_all_single(x: torch.Tensor, group: Any) -> torch.Tensor:
            compressed = handle.group_for(group)
            if x.dim() != 5 or not compressible(x) or x.shape[0] != compressed.world_size:
                return original(x, group)
            return compressed.all_to_all(x.contiguous(), stream=handle.stream_name("a2a"))
        return _all_to_all_single

    return [make_patch(owner, "_all_to_all_single", handle, build)]


# ---------------------------------------------------------------------- diffusers' ring

#: the widest row a flat K||V buffer is viewed in (a head's channels, or several heads')
RING_ROW = 128


def ring_row(numel: int) -> int:
    """Row length of a flat ``K||V`` buffer of ``numel`` elements: the largest power of two
    up to :data:`RING_ROW` dividing it. The buffer is ``(B, S, H, D)`` K then V, flattened,
    so for head dims that are powers of two (64, 128) rows hold whole heads and columns are
    channels; 0 if no row of at least 8 fits."""
    row = RING_ROW
    while row >= 8 and numel % row:
        row //= 2
    return row if row >= 8 else 0


def install_diffusers_ring(handle: XDiTCompression, module: Any) -> list[Patch]:
    """``TemplatedRingAttention`` all-gathers every rank's flat ``K||V`` with
    ``funcol.all_gather_tensor(buf, gather_dim=0, group=ring group)``; compressed as an
    all-gather of the buffer viewed ``(-1, ring_row)`` (own slot exact, one stream per
    origin). With ``asynchronous`` the other ranks' K/V are those of the previous step
    (DistriFusion-style patch parallelism: this step's gather overlaps the attention). The
    backward pass (tensors that need gradients) goes through unchanged."""
    owner = resolve_owner(HOOK_POINTS["diffusers_ring"], module)

    def build(real: Any) -> Any:
        @_eager
        def all_gather_tensor(tensor: torch.Tensor, gather_dim: int, group: Any,
                              *args: Any, **kwargs: Any) -> Any:
            row = ring_row(tensor.numel())
            if gather_dim != 0 or tensor.dim() != 1 or not compressible(tensor) or not row:
                return real.all_gather_tensor(tensor, gather_dim, group, *args, **kwargs)
            compressed = handle.group_for(group)
            x, stream = tensor.contiguous().view(-1, row), handle.stream_name("kv")
            parts = (handle.stale_all_gather(compressed, x, stream) if handle.asynchronous
                     else compressed.all_gather(x, stream=stream))
            return torch.cat([p.reshape(-1) for p in parts])
        return _ModuleWith(real, all_gather_tensor=all_gather_tensor)

    return [make_patch(owner, "funcol", handle, build)]


def install_dtensor_reduce(handle: XDiTCompression, module: Any) -> list[Patch]:
    """DTensor's ``Partial`` placement reduces with ``funcol.all_reduce(tensor, reduceOp,
    group=(mesh, dim))`` (row-parallel outputs becoming replicated) and
    ``funcol.reduce_scatter_single(tensor, reduceOp, scatter_dim, group)`` (becoming
    sharded); sums and averages of float tensors over a mesh dimension are compressed
    (:meth:`~compressed_comm.CompressedGroup.all_reduce`, ``reduce_scatter``: one stream per
    ``(src, dst)`` block, every rank gets the same result); other reductions, groups given
    otherwise and tensors that need gradients go through unchanged."""
    owner = resolve_owner(HOOK_POINTS["dtensor_reduce"], module)

    def op_and_group(tensor: torch.Tensor, reduce_op: Any, group: Any
                     ) -> tuple[str, CompressedGroup] | None:
        op = str(reduce_op).lower()
        pg = _mesh_group(group)
        if op not in ("sum", "avg") or pg is None or not compressible(tensor):
            return None
        return op, handle.group_for(pg)

    def build(real: Any) -> Any:
        @_eager
        def all_reduce(tensor: torch.Tensor, reduceOp: str, group: Any,  # noqa: N803
                       *args: Any, **kwargs: Any) -> torch.Tensor:
            found = op_and_group(tensor, reduceOp, group)
            if found is None or args or kwargs:
                return real.all_reduce(tensor, reduceOp, group, *args, **kwargs)
            op, compressed = found
            return compressed.all_reduce(tensor, stream=handle.stream_name("reduce"), op=op)

        @_eager
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
        return _ModuleWith(real, all_reduce=all_reduce,
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


INSTALLERS: dict[str, Callable[[Any, Any], list[Patch]]] = {
    "ulysses": install_ulysses,
    "torch_ring": install_torch_ring,
    "yunchang_ring": install_yunchang_ring,
    "yunchang_ulysses": install_yunchang_ulysses,
    "pipefusion": install_pipefusion,
    "diffusers_ulysses": install_diffusers_ulysses,
    "diffusers_ring": install_diffusers_ring,
    "dtensor_reduce": install_dtensor_reduce,
}
