"""A drop-in process group: plain ``torch.distributed`` calls, compressed traffic.

``wrapped = wrap_process_group(pg, config)`` returns a process group that existing code
passes as ``group=`` to ``dist.all_gather``, ``dist.all_gather_into_tensor``,
``dist.send``/``recv``/``isend``/``irecv``, ``dist.batch_isend_irecv`` and
``dist.all_to_all_single`` -- and, with ``wrap_process_group(..., reduce=True)``,
``dist.all_reduce``, ``dist.all_reduce_coalesced`` and ``dist.reduce_scatter_tensor`` with
SUM or AVG. Floating-point tensors (float16, bfloat16, float32) go through a
:class:`~compressed_comm.CompressedGroup`; everything else (other dtypes and reductions,
broadcast, barrier, ...) passes through to ``pg`` untouched.

Streams are keyed by (operation, peers, call order within the step), so the same sequence
of calls in every denoising step maps to the same residual streams, whatever their shapes.
A call whose tensors differ in shape or dtype from that call's in the last step (all-to-all
splits that follow token routing, a new resolution) renews its streams on every rank: a
keyframe, and the old state is freed, so memory stays bounded however often shapes change.
Call
``wrapped.step()`` at the end of each denoising step and ``wrapped.new_session()`` at the
start of each request, on every rank. Without ``step()`` every call would open a new
stream: past ``max_calls_per_step`` calls in one step the group warns once and passes
further calls through uncompressed until the next ``step()``, so memory stays bounded. A
rank whose steps disagree with its peers' raises the same
:class:`~compressed_comm.WireFormatError` as they do (the size handshake), and
``new_session()`` on every rank recovers. What passes through uncompressed (other dtypes,
calls past the cap) goes straight to the wrapped group: ``new_session()`` does not drain it.

How it plugs in: a Python subclass of ``torch.distributed.ProcessGroup``, created through a
registered backend (``dist.new_group(backend="compressed_comm")``) so that torch knows its
ranks -- which ``dist.send``/``recv`` require. Consequently ``wrap_process_group`` is a
collective over the default group, like ``dist.new_group``: every process must call it.
"""

from __future__ import annotations

import datetime
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.futures import Future

from .config import CompressionConfig
from .group import DEFAULT_TIMEOUT, CompressedGroup
from .session import SessionStats
from .transport import TorchDistTransport
from .wire import SUPPORTED_DTYPES

__all__ = ["wrap_process_group", "CompressedProcessGroup", "BACKEND_NAME"]

BACKEND_NAME = "compressed_comm"
#: compressed calls in one step after which the group assumes step() is not being called
DEFAULT_MAX_CALLS_PER_STEP = 1024

#: Operations forwarded unchanged to the wrapped group.
PASSTHROUGH = ("broadcast", "barrier", "monitored_barrier", "reduce", "reduce_scatter",
               "gather", "scatter", "alltoall", "allgather_coalesced",
               "allgather_into_tensor_coalesced", "reduce_scatter_tensor_coalesced")


@dataclass(frozen=True)
class _Options:
    inner: dist.ProcessGroup
    config: CompressionConfig
    timeout: float
    max_calls_per_step: int
    reduce: bool


class _Work(dist.Work):
    """A work handle completed by ``finish()`` on the first wait."""

    def __init__(self, finish: Callable[[], Any]) -> None:
        super().__init__()
        self._finish: Callable[[], Any] | None = finish

    def _complete(self) -> None:
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()

    def wait(self, timeout: datetime.timedelta = datetime.timedelta(0)) -> bool:
        self._complete()
        return True

    def is_completed(self) -> bool:
        return self._finish is None

    def get_future(self) -> Future:
        self._complete()
        fut: Future = Future()
        fut.set_result(None)
        return fut


def _compressible(t: torch.Tensor) -> bool:
    return t.dtype in SUPPORTED_DTYPES


def _reduction(opts: Any) -> str | None:
    """``"sum"`` or ``"avg"`` for the reductions a compressed group performs, else None."""
    op = getattr(opts, "reduceOp", dist.ReduceOp.SUM)
    return "sum" if op == dist.ReduceOp.SUM else "avg" if op == dist.ReduceOp.AVG else None


class CompressedProcessGroup(dist.ProcessGroup):
    """A process group whose p2p, all-gather and all-to-all traffic is residual-compressed.

    Create it with :func:`wrap_process_group`. ``compressed`` is the underlying
    :class:`~compressed_comm.CompressedGroup` and ``inner`` the wrapped group.
    """

    def __init__(self, inner: dist.ProcessGroup, config: CompressionConfig | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT,
                 max_calls_per_step: int = DEFAULT_MAX_CALLS_PER_STEP,
                 reduce: bool = False) -> None:
        super().__init__(inner.rank(), inner.size())
        if max_calls_per_step < 1:
            raise ValueError(f"max_calls_per_step must be positive, got {max_calls_per_step}")
        self.inner = inner
        self.compressed = CompressedGroup(TorchDistTransport(inner), config, timeout=timeout,
                                          renew_streams=True)
        self.max_calls_per_step = max_calls_per_step
        #: whether SUM/AVG reductions of float tensors are compressed too
        self.reduce = reduce
        self._calls: dict[tuple[Any, ...], int] = {}
        self._calls_this_step = 0
        self._warned = False

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return BACKEND_NAME

    # ------------------------------------------------------------------ steps and sessions

    def step(self) -> None:
        """Mark the end of a denoising step (every rank)."""
        self._calls.clear()
        self._calls_this_step = 0
        self.compressed.step()

    def new_session(self, *, rebuild: bool = False) -> None:
        """Start a new request (every rank): drop all residual state, cancel and drain what
        is in flight; also the way back after a failed call (``rebuild``: after a timeout,
        on fresh connections; see :meth:`CompressedGroup.new_session`)."""
        self._calls.clear()
        self._calls_this_step = 0
        self.compressed.new_session(rebuild=rebuild)

    def stats(self) -> SessionStats:
        """Traffic and accuracy of every stream of the current session."""
        return self.compressed.stats()

    def _stream(self, *parts: Any) -> str | None:
        """The stream name of this call, or None past ``max_calls_per_step`` (uncompressed)."""
        if self._calls_this_step >= self.max_calls_per_step:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"compressed process group: {self._calls_this_step} compressed calls "
                    "without step(); further calls pass through uncompressed until step(). "
                    "Call step() at the end of every denoising step (on every rank), or "
                    "raise max_calls_per_step", RuntimeWarning, stacklevel=3)
            return None
        self._calls_this_step += 1
        n = self._calls.get(parts, 0)
        self._calls[parts] = n + 1
        return "/".join(str(p) for p in (*parts, n))

    # ------------------------------------------------------------------ compressed ops

    def allgather(self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor],
                  opts: Any = None) -> dist.Work:
        x = input_tensors[0]
        outs = output_tensors[0]
        if len(input_tensors) != 1 or not _compressible(x) or any(o.dtype != x.dtype for o in outs):
            return self.inner.allgather(output_tensors, input_tensors, *_opts(opts))
        shapes = [tuple(o.shape) for o in outs]
        stream = self._stream("all_gather")
        if stream is None:
            return self.inner.allgather(output_tensors, input_tensors, *_opts(opts))
        handle = self.compressed.all_gather_async(x, stream=stream, shapes=shapes)
        return _Work(lambda: [o.copy_(r) for o, r in zip(outs, handle.wait())])

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor,
                          opts: Any = None) -> dist.Work:
        if not _compressible(input) or output.dtype != input.dtype:
            return _inner_method(self.inner, "all_gather_single", "_allgather_base")(
                output, input, *_opts(opts))
        outs = list(output.chunk(self.size(), dim=0))
        return self.allgather([outs], [input], opts)

    _allgather_base = all_gather_single  # torch < 2.13

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> dist.Work:
        x = tensors[0]
        if len(tensors) != 1 or not _compressible(x):
            return self.inner.send(tensors, dst, tag)
        stream = self._stream("p2p", self.rank(), dst, tag)
        if stream is None:
            return self.inner.send(tensors, dst, tag)
        handle = self.compressed.isend(x, dst, stream=stream)
        return _Work(handle.wait)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> dist.Work:
        out = tensors[0]
        if len(tensors) != 1 or not _compressible(out):
            return self.inner.recv(tensors, src, tag)
        stream = self._stream("p2p", src, self.rank(), tag)
        if stream is None:
            return self.inner.recv(tensors, src, tag)
        handle = self.compressed.irecv(out, src, stream=stream)
        return _Work(lambda: out.copy_(handle.wait()))

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int = 0) -> dist.Work:
        if all(not _compressible(t) for t in tensors):
            return self.inner.recv_anysource(tensors, tag)
        raise ValueError("the compressed process group cannot receive a floating-point tensor "
                         "from any source: residual streams are per sender; pass src")

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
                          output_split_sizes: list[int], input_split_sizes: list[int],
                          opts: Any = None) -> dist.Work:
        if not _compressible(input) or output.dtype != input.dtype:
            return _inner_method(self.inner, "all_to_all_single", "alltoall_base")(
                output, input, output_split_sizes, input_split_sizes, *_opts(opts))
        world = self.size()
        in_sizes = list(input_split_sizes) or [input.shape[0] // world] * world
        out_sizes = list(output_split_sizes) or [output.shape[0] // world] * world
        # each (src, dst) chunk's stream has the shape both of them know; a changed split
        # renews that chunk's stream on both
        stream = self._stream("all_to_all")
        if stream is None:
            return _inner_method(self.inner, "all_to_all_single", "alltoall_base")(
                output, input, output_split_sizes, input_split_sizes, *_opts(opts))
        handle = self.compressed.all_to_all_async(
            input, stream=stream, input_split_sizes=in_sizes, output_split_sizes=out_sizes)
        return _Work(lambda: output.copy_(handle.wait()))

    alltoall_base = all_to_all_single  # torch < 2.13

    def _reducing(self, tensors: list[torch.Tensor], opts: Any) -> str | None:
        """The reduction to compress (``reduce=True``, float tensors, SUM or AVG), or None."""
        if not self.reduce or not all(map(_compressible, tensors)):
            return None
        return _reduction(opts)

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        if len(tensors) != 1:  # one tensor per device of this process: not ours to split
            return self.inner.allreduce(tensors, *_opts(opts))
        return self._all_reduce_each(tensors, opts, self.inner.allreduce)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        return self._all_reduce_each(tensors, opts, self.inner.allreduce_coalesced)

    def _all_reduce_each(self, tensors: list[torch.Tensor], opts: Any,
                         passthrough: Callable[..., dist.Work]) -> dist.Work:
        """All-reduce every tensor in place on its own stream, or ``passthrough`` them all."""
        op = self._reducing(tensors, opts)
        streams = [] if op is None else [self._stream("all_reduce", op) for _ in tensors]
        if op is None or None in streams:
            return passthrough(tensors, *_opts(opts))
        for x, stream in zip(tensors, streams):
            x.copy_(self.compressed.all_reduce(x, stream=stream, op=op))
        return _Work(lambda: None)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor,
                              opts: Any = None) -> dist.Work:
        op = self._reducing([output, input], opts)
        stream = None if op is None or output.dtype != input.dtype else self._stream(
            "reduce_scatter", op)
        if stream is None:
            return _inner_method(self.inner, "reduce_scatter_single", "_reduce_scatter_base")(
                output, input, *_opts(opts))
        output.copy_(self.compressed.reduce_scatter(input, stream=stream, op=op).view(
            output.shape))
        return _Work(lambda: None)

    _reduce_scatter_base = reduce_scatter_single  # torch < 2.13


def _opts(opts: Any) -> tuple[Any, ...]:
    return () if opts is None else (opts,)


def _inner_method(inner: dist.ProcessGroup, name: str, old_name: str) -> Callable[..., dist.Work]:
    return getattr(inner, name, None) or getattr(inner, old_name)


def _delegate(name: str) -> Callable[..., dist.Work]:
    def method(self: CompressedProcessGroup, *args: Any, **kwargs: Any) -> dist.Work:
        return getattr(self.inner, name)(*args, **kwargs)
    method.__name__ = name
    method.__doc__ = f"``{name}`` of the wrapped group, uncompressed."
    return method


for _name in PASSTHROUGH:
    setattr(CompressedProcessGroup, _name, _delegate(_name))
del _name


def _create(backend_options: Any, options: _Options) -> CompressedProcessGroup:
    return CompressedProcessGroup(options.inner, options.config, timeout=options.timeout,
                                  max_calls_per_step=options.max_calls_per_step,
                                  reduce=options.reduce)


def wrap_process_group(pg: dist.ProcessGroup | None = None,
                       config: CompressionConfig | None = None, *,
                       timeout: float = DEFAULT_TIMEOUT,
                       max_calls_per_step: int = DEFAULT_MAX_CALLS_PER_STEP,
                       reduce: bool = False) -> CompressedProcessGroup:
    """A process group over ``pg``'s ranks (default: the world) that compresses its traffic.

    A collective over the default group, like ``dist.new_group``: every process calls it
    (processes outside ``pg`` get ``GroupMember.NON_GROUP_MEMBER``). ``timeout`` (seconds)
    bounds every compressed wait; ``max_calls_per_step`` caps the streams one step opens
    (see the module docstring). ``reduce``: also compress ``all_reduce``,
    ``all_reduce_coalesced`` and ``reduce_scatter_tensor`` of float tensors with SUM or AVG
    (a compressed reduce-scatter, then an all-gather: every rank gets the same bits). Off by
    default: code often relies on an all-reduce being exact. The explicit
    :meth:`~compressed_comm.CompressedGroup.all_reduce` needs no switch.
    """
    if not dist.is_initialized():
        raise RuntimeError("wrap_process_group needs torch.distributed to be initialised "
                           "(dist.init_process_group) first")
    inner = pg if pg is not None else dist.group.WORLD
    config = config or CompressionConfig()
    reduce = reduce or config.legacy_reduce
    dist.Backend.register_backend(BACKEND_NAME, _create, extended_api=True,
                                  devices=["cpu", "cuda"])
    return dist.new_group(ranks=dist.get_process_group_ranks(inner), backend=BACKEND_NAME,
                          pg_options=_Options(inner, config, timeout, max_calls_per_step,
                                              reduce))
