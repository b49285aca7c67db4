"""yunchang (xDiT's long-context attention): its ring's K/V hops and its Ulysses
all-to-all, compressed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from compressed_comm import CompressedGroup, ops

from .base import HookHandle, ModuleWith, compressible, group_name, replace_method
from .points import HookPoint, Patch, make_patch, resolve_owner

__all__ = ["YUNCHANG_RING", "YUNCHANG_ULYSSES", "RingCommState", "install_yunchang_ring",
           "install_yunchang_ulysses"]

YUNCHANG_RING = HookPoint(
    "yunchang_ring", "yunchang", "yunchang.ring.utils", "RingComm",
    ("send_recv", "commit", "wait"), "yunchang's ring (xDiT's long-context attention): K/V hops")

YUNCHANG_ULYSSES = HookPoint(
    "yunchang_ulysses", "yunchang", "yunchang.comm.all_to_all", "", ("dist",),
    "yunchang's Ulysses all-to-all (SeqAllToAll4D/5D; xDiT's long-context attention)")


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

    def __init__(self, group: CompressedGroup, handle: HookHandle) -> None:
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


def install_yunchang_ring(handle: HookHandle, module: Any) -> list[Patch]:
    """``RingComm.send_recv/commit/wait`` (class methods, so every importer is covered)."""
    owner = resolve_owner(YUNCHANG_RING, module)
    attr = "_compressed_comm_state"

    def state(comm: Any) -> RingCommState | None:
        if comm.world_size < 2:
            return None
        if attr not in comm.__dict__:
            comm.__dict__[attr] = RingCommState(handle.group_for(comm._process_group), handle)
        return comm.__dict__[attr]

    def body(method: str) -> Callable[..., Any]:
        def run(original: Callable[..., Any], comm: Any, *args: Any, **kwargs: Any) -> Any:
            st = state(comm)
            if st is None:
                return original(comm, *args, **kwargs)
            return getattr(st, method)(comm, original, *args, **kwargs)
        return run

    return [make_patch(owner, m, handle, replace_method(m, body(m)))
            for m in YUNCHANG_RING.attrs]


def install_yunchang_ulysses(handle: HookHandle, module: Any) -> list[Patch]:
    """``yunchang.comm.all_to_all`` calls ``dist.all_to_all_single(output, input, group=)``
    on ``(P, ..., head dim)`` tensors; its ``dist`` becomes one whose equal-split,
    synchronous all-to-all is compressed along dim 0 (one stream per chunk) by
    ``compressed_comm::all_to_all`` (:mod:`compressed_comm.ops`)."""
    owner = resolve_owner(YUNCHANG_ULYSSES, module)
    key = handle.key

    def build(real: Any) -> Any:
        def all_to_all_single(output: torch.Tensor, input: torch.Tensor,
                              output_split_sizes: Any = None, input_split_sizes: Any = None,
                              group: Any = None, async_op: bool = False) -> Any:
            if (output_split_sizes is not None or input_split_sizes is not None or async_op
                    or input.dim() < 3 or not compressible(input)
                    or input.shape[0] % real.get_world_size(group)
                    or output.shape != input.shape):
                return real.all_to_all_single(output, input, output_split_sizes,
                                              input_split_sizes, group, async_op)
            # a compressed_comm:: op: traced into compiled graphs, no graph break
            output.copy_(ops.all_to_all(input, key, group_name(group), "a2a"))
            return None
        return ModuleWith(real, all_to_all_single=all_to_all_single)

    return [make_patch(owner, "dist", handle, build)]
