"""``enable_compression``: residual compression of an unmodified xDiT's communication."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Sequence
from contextvars import ContextVar, Token
from typing import Any

import torch
import torch.distributed as dist

from compressed_comm import (
    CompressedGroup,
    CompressionConfig,
    SessionStats,
    TorchDistTransport,
    ops,
)
from compressed_comm.group import DEFAULT_TIMEOUT, Handle

from ..calls import StepCalls
from ..dit import ParallelConfig, parallelize
from ..hooks import HOOK_POINTS, INSTALLERS
from ..hooks.points import HookPointError, Patch, load_module
from ..stale import StaleGather

__all__ = ["XDiTCompression", "enable_compression"]

log = logging.getLogger(__name__)


class XDiTCompression:
    """The compression bound to one xDiT pipeline; created by :func:`enable_compression`.

    * :meth:`disable` -- put every hook point and hook back (idempotent);
    * :meth:`stats` -- traffic of every stream of the current generation, all groups;
    * :meth:`new_session` / :meth:`step` -- generation and step boundaries, for code that
      drives a bare transformer (a pipeline's own calls mark both automatically);
    * :meth:`tag` -- the streams of the transformer calls inside, for a bare transformer
      run several times per step (``"cond"``, ``"uncond"``).

    Streams are named ``[cfg<r>/][<call>/]<layer>.<kind><n>``: xDiT's CFG-parallel rank,
    the transformer call of this step (:mod:`adapters.calls`: a pipeline's second call of a
    step is ``call1``, a tagged call its tag; the first untagged call has no prefix), the
    attention module running (from forward pre-hooks), the kind of transfer (``a2a``,
    ``kv``, ``ring``) and its index among such transfers of that layer in this call.
    PipeFusion streams are named ``pipefusion.<name>[<patch>]``.
    """

    def __init__(self, config: CompressionConfig, timeout: float, prefix: str,
                 asynchronous: bool = False, reduce: bool = False) -> None:
        self.config = config
        self.timeout = timeout
        #: DTensor's reductions (tensor parallelism) are compressed too
        self.reduce = reduce
        #: DistriFusion-style: all-gathers return the other ranks' tensors of the last step
        self.asynchronous = asynchronous
        self._stale = StaleGather()
        self.points: tuple[str, ...] = ()
        self._prefix = prefix
        self._groups: dict[int, tuple[Any, CompressedGroup]] = {}
        self._patches: list[Patch] = []
        self._hooks: list[Any] = []
        self._restore: list[tuple[Any, str, Any]] = []
        self._layer: ContextVar[str] = ContextVar("layer", default="")
        self._layer_tokens: dict[int, list[Token[str]]] = {}  # per attention module
        self._counts: dict[tuple[str, str], int] = {}
        #: the transformer calls of the current step (steps are marked by the scheduler's
        #: step() where the pipeline has one)
        self.calls = StepCalls()
        self.calls.on_step_end(self._step_ended)
        self._patch: Any = None
        self._sends: list[Handle[None]] = []
        self.enabled = False
        #: how compiled graphs reach this handle (:func:`compressed_comm.ops.bind`)
        self.key = ops.bind(self)

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return (f"XDiTCompression({state}, codec={self.config.codec!r}, "
                f"points={list(self.points)}, groups={len(self._groups)})")

    # ------------------------------------------------------------------ public

    @property
    def groups(self) -> list[CompressedGroup]:
        """The compressed groups created so far (one per process group used)."""
        return [g for _, g in self._groups.values()]

    @property
    def steps(self) -> int:
        """Step boundaries passed in the current generation (scheduler steps, or transformer
        calls after the first for a bare transformer, and :meth:`step` calls)."""
        return self.calls.step

    @property
    def patch_parallel(self) -> Any:
        """The :class:`~adapters.dit.DiTParallel` of patch parallelism, if enabled."""
        return self._patch

    def stats(self) -> SessionStats:
        """Per-stream traffic and accuracy of the current generation, over all groups."""
        streams = [s for g in self.groups for s in g.stats().streams]
        patch = self._patch.stats() if self._patch is not None else None
        return SessionStats(tuple(streams + list(patch.streams if patch else ())))

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank sent through the compressed exchanges in this generation."""
        own = sum(g.bytes_sent for g in self.groups)
        return own + (self._patch.exchange.bytes_sent if self._patch is not None else 0)

    def step(self) -> None:
        """Mark a step boundary (done by the scheduler's ``step()`` of a pipeline, and for a
        bare transformer before each untagged call)."""
        self.calls.end_step()

    def tag(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Transformer calls inside run on streams of their own, named ``name``: tag each
        call of a step (``"cond"``, ``"uncond"``) where a bare transformer runs several
        times per step; a tag seen again starts the next step."""
        return self.calls.tagged(name)

    def _step_ended(self) -> None:
        self._counts.clear()
        for g in self.groups:
            g.step()

    def new_session(self) -> None:
        """Start a new generation: drop all residual state (every rank together)."""
        self._counts.clear()
        self._stale.clear()
        self.calls.reset()
        sends, self._sends = self._sends, []
        for h in sends:
            h.wait()
        for g in self.groups:
            g.new_session()
        if self._patch is not None:
            self._patch.new_generation()

    def disable(self) -> None:
        """Restore the original hook points, scheduler and hooks; safe to call twice."""
        for patch in reversed(self._patches):
            patch.revert()
        for h in self._hooks:
            h.remove()
        for obj, attr, value in reversed(self._restore):
            if value is None:
                obj.__dict__.pop(attr, None)
            else:
                object.__setattr__(obj, attr, value)
        if self._patch is not None:
            self._patch.remove()
            self._patch = None
        self._patches, self._hooks, self._restore, self._sends = [], [], [], []
        self._stale.clear()
        self.enabled = False

    # ------------------------------------------------------------------ for the hooks

    def group_for(self, pg: dist.ProcessGroup | None) -> CompressedGroup:
        """The compressed group over process group ``pg`` (None: the default group)."""
        if pg is None:
            pg = dist.group.WORLD
        entry = self._groups.get(id(pg))
        if entry is None or entry[0] is not pg:
            group = CompressedGroup(TorchDistTransport(pg), self.config, timeout=self.timeout)
            entry = self._groups[id(pg)] = (pg, group)
        return entry[1]

    def stale_all_gather(self, group: CompressedGroup, x: torch.Tensor,
                         stream: str) -> list[torch.Tensor]:
        """DistriFusion-style all-gather: ``x`` itself in this rank's slot and the other
        ranks' tensors of the previous step, while this step's all-gather is in flight
        (completed at the stream's next call). The first call of a session is synchronous."""
        return self._stale(group, x, stream)

    def keep_until_session_end(self, send: Handle[None]) -> None:
        """Hold a fire-and-forget send (PipeFusion's ``pipeline_isend``) until the next
        session starts, so its buffer outlives the transfer on every backend."""
        self._sends.append(send)

    def stream_name(self, kind: str) -> str:
        """The next stream name of ``kind`` for the attention layer now running."""
        layer = self._layer.get() or "model"
        n = self._counts.get((layer, kind), 0)
        self._counts[(layer, kind)] = n + 1
        return f"{self._prefix}{self.calls.prefix}{layer}.{kind}{n}"

    # ------------------------------------------------------------------ installation

    def _install_points(self, points: Sequence[str] | str, *, optional: bool,
                        diffusers_cp: bool = False) -> None:
        """Bind ``points``; ``optional``: binding none is fine (patch parallelism only).
        ``"auto"`` binds diffusers' own points only if ``diffusers_cp`` (the model has a
        parallel config)."""
        required = points != "auto"
        names = ([n for n, p in HOOK_POINTS.items()
                  if (p.library != "diffusers" or diffusers_cp)
                  and (n != "dtensor_reduce" or self.reduce)]
                 if points == "auto" else list(points))
        unknown = [n for n in names if n not in HOOK_POINTS]
        if unknown:
            raise ValueError(f"unknown hook points {unknown}; known: {', '.join(HOOK_POINTS)}")
        if not names and not optional:
            raise ValueError("points is empty and patch is None: nothing to compress")
        bound = []
        try:
            for name in names:
                module = load_module(HOOK_POINTS[name], required=required)
                if module is None:
                    continue
                patches = INSTALLERS[name](self, module)
                for p in patches:
                    p.apply()
                    self._patches.append(p)
                bound.append(name)
        except BaseException:
            self.disable()
            raise
        if not bound and not optional:  # "auto" found none of the libraries
            raise HookPointError("no hook point could be bound: xfuser is not imported and "
                                 "neither torch's ring nor yunchang is available")
        self.points = tuple(bound)

    def _install_model_hooks(self, transformer: torch.nn.Module, scheduler: Any | None) -> None:
        # first among the pre-hooks: patch parallelism's reads the step this call is in
        self._hooks.append(transformer.register_forward_pre_hook(self._begin_call, prepend=True))
        for name, module in transformer.named_modules():
            if name and "Attention" in type(module).__name__:
                self._hooks.append(module.register_forward_pre_hook(self._enter_layer(name)))
                self._hooks.append(module.register_forward_hook(self._leave_layer,
                                                                always_call=True))
        if scheduler is not None and hasattr(scheduler, "set_timesteps"):
            original = scheduler.set_timesteps
            # the diffusers scheduler itself, also behind xDiT's scheduler wrapper
            inner = getattr(original, "__self__", scheduler)
            self._restore.append((inner, "set_timesteps", inner.__dict__.get("set_timesteps")))

            @functools.wraps(original)  # diffusers inspects its parameters (sigmas=...)
            def set_timesteps(*args: Any, **kwargs: Any) -> Any:
                self.new_session()
                return original(*args, **kwargs)
            inner.set_timesteps = set_timesteps
            self._wrap_step(scheduler)

    def _wrap_step(self, scheduler: Any) -> None:
        """The ``step()`` the pipeline calls ends each denoising step, whatever the number of
        transformer calls in it (guidance as two calls, skip-layer guidance as a third).
        xDiT's scheduler wrapper has a ``step`` of its own that, under sequence or pipeline
        parallelism, does not call the diffusers scheduler's: the wrapper's is wrapped."""
        original = getattr(scheduler, "step", None)
        if not callable(original):
            return
        owner = getattr(original, "__self__", scheduler)
        self._restore.append((owner, "step", owner.__dict__.get("step")))

        @functools.wraps(original)
        def step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self.step()
            return out
        # past xDiT's wrapper's __setattr__, which would forward to the wrapped scheduler
        object.__setattr__(owner, "step", step)
        self.calls.marked = True

    @torch.compiler.disable
    def _begin_call(self, module: Any, args: Any) -> None:
        self.calls.begin_call()
        self._counts.clear()

    def _enter_layer(self, name: str) -> Any:
        def hook(module: Any, args: Any) -> None:
            if torch.compiler.is_compiling():  # see stream_name
                return
            self._layer_tokens.setdefault(id(module), []).append(self._layer.set(name))
        return hook

    def _leave_layer(self, module: Any, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        tokens = self._layer_tokens.get(id(module))
        if tokens:
            self._layer.reset(tokens.pop())


def _parts(target: Any) -> tuple[torch.nn.Module, Any | None]:
    """(transformer, scheduler or None) of a pipeline, an xDiT wrapper or a model."""
    pipes = [target]
    inner = getattr(target, "module", None)  # xDiT's xFuser*Pipeline wraps the diffusers one
    if inner is not None and not isinstance(target, torch.nn.Module):
        pipes.append(inner)
    for p in pipes:
        transformer = getattr(p, "transformer", None)
        if isinstance(transformer, torch.nn.Module):
            return transformer, getattr(p, "scheduler", None)
    if isinstance(target, torch.nn.Module):
        return target, None
    raise TypeError(f"expected a diffusers/xDiT pipeline (with a .transformer) or a "
                    f"torch.nn.Module; got {type(target).__name__}")


def _compiled(module: torch.nn.Module) -> bool:
    return (type(module).__name__ == "OptimizedModule"
            or getattr(module, "_compiled_call_impl", None) is not None)


def _cfg_prefix() -> str:
    """``cfg<r>/`` when xDiT runs classifier-free guidance in parallel, else ``""``."""
    if "xfuser" not in sys.modules:
        return ""
    try:
        from xfuser.core.distributed import (
            get_classifier_free_guidance_rank,
            get_classifier_free_guidance_world_size,
        )
        parallel_cfg = get_classifier_free_guidance_world_size() > 1
    except AssertionError:  # xDiT's parallel state is not initialised: no CFG parallelism
        return ""
    return f"cfg{get_classifier_free_guidance_rank()}/" if parallel_cfg else ""


def enable_compression(target: Any, config: CompressionConfig | None = None, *,
                       points: Sequence[str] | str = "auto",
                       patch: ParallelConfig | None = None,
                       patch_group: dist.ProcessGroup | None = None,
                       asynchronous: bool = False, reduce: bool = False,
                       timeout: float = DEFAULT_TIMEOUT) -> XDiTCompression:
    """Compress the activations an xDiT pipeline sends between ranks; returns the handle.

    ``target`` is an xDiT or diffusers pipeline (its transformer and scheduler are found)
    or a bare transformer. ``points`` names the hook points to bind
    (:data:`~adapters.xdit.HOOK_POINTS`); ``"auto"`` binds every point whose library is
    in use: torch's ring and yunchang's when importable, xfuser's when xfuser is imported,
    diffusers' context parallelism when the transformer has a parallel config (call
    ``transformer.enable_parallelism(...)`` first), and DTensor's reductions (tensor
    parallelism: ``parallelize_module``, diffusers' ``TensorParallelConfig``) when
    ``reduce`` is set (off by default: code often relies on an all-reduce being exact).
    A point whose attribute moved raises :class:`~adapters.xdit.HookPointError` naming it
    and the versions known to work.

    ``patch`` adds patch parallelism, which xDiT does not have, through
    :func:`adapters.dit.parallelize` over ``patch_group`` (default: the world group), e.g.
    ``ParallelConfig("patch", compression=config, asynchronous=True)`` for compressed
    DistriFusion-style exchange; run xDiT itself without sequence or pipeline parallelism
    then.

    ``asynchronous`` makes diffusers' ring all-gather DistriFusion-style: each rank attends
    to its own fresh K/V and the other ranks' K/V of the previous step, and this step's
    gather runs during the attention (the first step of a generation is exact). With
    diffusers' ``ContextParallelConfig(ring_degree=N)`` that is patch parallelism with
    stale K/V for every model diffusers can parallelise.

    Call it on every rank, after the pipeline is built and before generating. Each
    ``scheduler.step()`` of a pipeline ends a step, whatever the number of transformer calls
    in it (guidance as two calls: each call of a step has its own streams, see
    :mod:`adapters.calls`); for a bare transformer each untagged call is a step
    (:meth:`~XDiTCompression.tag` the calls of a step otherwise). Each
    ``scheduler.set_timesteps`` (the start of every generation, xDiT's ``prepare_run``
    warm-up included) starts a new session.

    * Enabling twice without :meth:`~XDiTCompression.disable` raises ``HookPointError``.
    * Compiled blocks (``transformer.compile_repeated_blocks(fullgraph=True)``, or
      ``block.compile(fullgraph=True)``), before or after enabling: diffusers' context
      parallelism compresses inside their graphs with no graph break
      (:mod:`compressed_comm.ops`; streams there are named in call order, ``model.<kind><n>``).
      A transformer compiled as a whole is refused; compile it *after* enabling (the call's
      start is then a graph break).
    """
    config = config or CompressionConfig()
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"config must be a CompressionConfig, got {type(config).__name__}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout}")
    transformer, scheduler = _parts(target)
    if _compiled(transformer):
        raise RuntimeError(
            f"{type(transformer).__name__} is compiled as a whole (torch.compile or "
            ".compile()): hooks added to it now would not run in its graphs. Call "
            "enable_compression(...) on the uncompiled transformer, then compile it; or "
            "compile only its blocks (transformer.compile_repeated_blocks(fullgraph=True), "
            "or block.compile(fullgraph=True) per block), before or after enabling")
    if patch is not None and not isinstance(patch, ParallelConfig):
        raise TypeError(f"patch must be an adapters.dit.ParallelConfig, got "
                        f"{type(patch).__name__}")
    handle = XDiTCompression(config, float(timeout), _cfg_prefix(), asynchronous,
                             reduce or config.legacy_reduce)
    handle._install_points(points, optional=patch is not None,
                           diffusers_cp=getattr(transformer, "_parallel_config", None) is not None)
    try:
        if patch is not None:
            handle._patch = parallelize(transformer, TorchDistTransport(patch_group), patch,
                                        calls=handle.calls)
        handle._install_model_hooks(transformer, scheduler)
    except BaseException:
        handle.disable()
        raise
    handle.enabled = True
    log.info("compressed_comm: xDiT hook points %s bound (codec %s)", handle.points,
             config.codec)
    return handle
