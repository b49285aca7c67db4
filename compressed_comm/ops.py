"""Compressed collectives as ``torch.library`` custom ops, which ``torch.compile`` keeps as
opaque nodes of its graphs: compressing inside a compiled region breaks no graph.

* ``compressed_comm::all_to_all(x, binding, group, kind)``: all-to-all along dim 0;
* ``compressed_comm::all_gather(x, binding, group, kind, stale)``: every rank's ``x``
  concatenated along dim 0 in rank order (``stale``: the other ranks' of the previous call,
  DistriFusion-style);
* ``compressed_comm::ring_pass(x, binding, group, kind)``: the same result, by passing
  every block around the ring (packets forwarded unchanged, decoded once).

A graph holds only strings: the key of a :class:`Binding` (:func:`bind`) and the process
group's name (``ProcessGroup.group_name``; ``""`` is the default group). Both are resolved
each time the op runs, and the binding names the stream then, so per-call stream names
advance on every execution of a compiled graph, and codecs or sessions change without
recompiling. The ops return new tensors and mutate none of their arguments; the streams'
references are the binding's state, outside any graph, which is why the ops are registered
as effectful (ordered): compilers keep every call, in program order.
"""

from __future__ import annotations

import uuid
import weakref
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch._library.effects import EffectType

from .group import CompressedGroup

__all__ = ["Binding", "all_gather", "all_to_all", "bind", "bound", "ring_pass"]


class Binding(Protocol):
    """What the ops reach at run time: the compressed groups and the stream names."""

    def group_for(self, pg: Any) -> CompressedGroup:
        """The compressed group over process group ``pg``."""
        ...

    def stream_name(self, kind: str) -> str:
        """The next stream name of ``kind`` (a call-scoped counter: advances per call)."""
        ...

    def stale_all_gather(self, group: CompressedGroup, x: torch.Tensor,
                         stream: str) -> list[torch.Tensor]:
        """``x`` in this rank's slot and the other ranks' tensors of the stream's last call."""
        ...


#: The one process-wide table of live bindings, by key (as torch keeps its process groups
#: by name): weak, so a binding lives as long as its owner holds it.
_BINDINGS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def bind(binding: object) -> str:
    """Register ``binding`` (a :class:`Binding` for the ops here; any object for ops defined
    elsewhere, which check its type) for the ops; returns the key a graph refers to it by
    (unique in the process, never reused)."""
    key = f"{type(binding).__name__}-{uuid.uuid4().hex[:12]}"
    _BINDINGS[key] = binding
    return key


def bound(key: str) -> Binding:
    """The live binding registered as ``key``."""
    binding = _BINDINGS.get(key)
    if binding is None:
        raise RuntimeError(
            f"compressed_comm: binding {key!r} is gone (its handle was garbage collected) but "
            "a compiled graph still calls it; keep the handle returned by enable_compression "
            "alive, or disable() it before dropping it")
    return binding


def _process_group(name: str) -> Any:
    if not name:
        return dist.group.WORLD
    from torch.distributed.distributed_c10d import GroupName, _resolve_process_group
    return _resolve_process_group(GroupName(name))


@torch.library.custom_op("compressed_comm::all_to_all", mutates_args=())
def all_to_all(x: torch.Tensor, binding: str, group: str, kind: str) -> torch.Tensor:
    """All-to-all of ``x`` along dim 0 (one chunk per rank) on the group named ``group``,
    compressed on the next stream of ``kind`` of binding ``binding``."""
    b = bound(binding)
    out = b.group_for(_process_group(group)).all_to_all(x.contiguous(),
                                                       stream=b.stream_name(kind))
    return out.clone() if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() \
        else out


@all_to_all.register_fake
def _(x: torch.Tensor, binding: str, group: str, kind: str) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("compressed_comm::all_gather", mutates_args=())
def all_gather(x: torch.Tensor, binding: str, group: str, kind: str,
               stale: bool = False) -> torch.Tensor:
    """Every rank's ``x`` on the group named ``group``, concatenated along dim 0 in rank
    order (own slot exact), compressed on the next stream of ``kind`` of ``binding``;
    ``stale``: the other ranks' ``x`` of the stream's previous call."""
    b = bound(binding)
    compressed, stream = b.group_for(_process_group(group)), b.stream_name(kind)
    x = x.contiguous()
    parts = (b.stale_all_gather(compressed, x, stream) if stale
             else compressed.all_gather(x, stream=stream))
    return torch.cat(parts)


@all_gather.register_fake
def _(x: torch.Tensor, binding: str, group: str, kind: str,
      stale: bool = False) -> torch.Tensor:
    return _gathered_like(x, group)


@torch.library.custom_op("compressed_comm::ring_pass", mutates_args=())
def ring_pass(x: torch.Tensor, binding: str, group: str, kind: str) -> torch.Tensor:
    """Every rank's ``x`` on the group named ``group`` by passing each around the ring,
    concatenated along dim 0 in rank order (own slot exact), compressed on the next stream
    of ``kind`` of ``binding`` (one reference per origin: hops add no error)."""
    b = bound(binding)
    compressed = b.group_for(_process_group(group))
    return torch.cat(compressed.ring_pass(x.contiguous(), stream=b.stream_name(kind)))


@ring_pass.register_fake
def _(x: torch.Tensor, binding: str, group: str, kind: str) -> torch.Tensor:
    return _gathered_like(x, group)


def _gathered_like(x: torch.Tensor, group: str) -> torch.Tensor:
    size = dist.get_world_size(_process_group(group))
    return x.new_empty((size * x.shape[0], *x.shape[1:]))


torch.library._register_effectful_op("compressed_comm::all_to_all", EffectType.ORDERED)
torch.library._register_effectful_op("compressed_comm::all_gather", EffectType.ORDERED)
torch.library._register_effectful_op("compressed_comm::ring_pass", EffectType.ORDERED)
