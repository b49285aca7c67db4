"""One generation priced phase by phase: compute, codec kernels, the wire (what of it the
step waits for), warmup and keyframe steps, and the bytes a rank holds between steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from compressed_comm import CompressionConfig, Keyframes
from compressed_comm.auto import Candidate, Cost, decide, is_auto, parse_auto
from compressed_comm.auto import Link as AutoLink
from compressed_comm.messages import MessageLayout

from ..methods import ASYNC, RAW, Method, method_list, parse_method, parse_methods
from ..network import GPU, Link, StepEstimate, collective_seconds, estimate_step, get_gpu, get_link
from .efficiency import CALIBRATED, Efficiency, split_step_s
from .models import WIRE_DTYPE, ModelSpec, compute_seconds, get_model, step_flops
from .report import MethodRow, WhatIfReport, general_assumptions, not_applicable
from .traffic import CODEC_PASSES, PARALLELISMS, Traffic, step_traffic

__all__ = ["run_what_if", "best_methods"]


@dataclass(frozen=True)
class _Setup:
    """What every phase is priced against."""

    model: ModelSpec
    gpu: GPU
    link: Link
    world: int
    parallelism: str
    traffic: Traffic
    warmup: int
    keyframes: Keyframes
    efficiency: Efficiency

    @property
    def hides(self) -> float:
        """Share of an overlapped exchange that can hide: ring's hops or stale K/V."""
        eff = self.efficiency
        return 1.0 - eff.ring_exposed if self.parallelism == "ring" else eff.async_hidden


@dataclass(frozen=True)
class _Timing:
    """One method's generation."""

    steady: StepEstimate    # a step after the warmup
    total_s: float          # all steps
    keyed_s: float          # of total_s: warmup, keyframe and spread-slice steps
    slowest_s: float        # the slowest step


def _compute_s(setup: _Setup) -> float:
    """Seconds of model compute in one step on the busiest rank (PipeFusion: one stage,
    its ``layers / world`` blocks called once per patch), block overhead included."""
    model, world = setup.model, setup.world
    single = compute_seconds(model, setup.gpu, 1)
    if setup.parallelism == "pipefusion":
        calls = model.layers * setup.traffic.count / world
        return split_step_s(single, model.layers, 1 / world, calls, setup.efficiency)
    share = step_flops(model, world) / step_flops(model, 1)
    return split_step_s(single, model.layers, share, model.layers, setup.efficiency)


def _codec_s(setup: _Setup, codec: str | None) -> float:
    """Seconds of one step's codec kernels (0 for raw tensors)."""
    return setup.traffic.codec_seconds(codec, setup.gpu.memory_bandwidth)


def _wire_s(setup: _Setup, codec: str | None, first: bool = False,
            nbytes: int | None = None) -> tuple[float, float]:
    """(communication, of it control exchanges) seconds of one step, each message
    ``nbytes`` (default: the steady message of ``codec``); an all-to-all's data slowed
    by its rounds' contention (:attr:`Efficiency.all_to_all_efficiency`)."""
    traffic, link = setup.traffic, setup.link
    control = traffic.control_seconds(link, codec, first)
    data = traffic.seconds(link, codec, first, nbytes) - control
    if traffic.collective == "all_to_all":
        eff = setup.efficiency
        data *= (setup.world - 1) ** eff.all_to_all_contention / eff.all_to_all_efficiency
    return data + control, control


def _overlaps(setup: _Setup, method: Method, steady: bool = True) -> bool:
    """Whether a step's exchange runs during its compute: ring attention's hops always,
    stale K/V after the warmup."""
    return setup.parallelism == "ring" or (method.stale and steady)


def _steady_step(setup: _Setup, method: Method, compute_s: float) -> StepEstimate:
    """A step after the warmup: stale methods hide their transfers behind compute."""
    comm, control = _wire_s(setup, method.codec)
    return estimate_step(compute_s + _codec_s(setup, method.codec), comm,
                         _overlaps(setup, method), control, setup.hides)


def _raw_generation(setup: _Setup, method: Method, compute_s: float) -> _Timing:
    """Raw tensors: DistriFusion's warmup steps synchronous, every other step steady."""
    steady = _steady_step(setup, method, compute_s)
    n_warm = setup.warmup if method.stale else 0
    warm = estimate_step(compute_s, _wire_s(setup, None)[0], _overlaps(setup, method, False),
                         hides=setup.hides)
    warm_s = n_warm * warm.step_s
    slowest = warm.step_s if n_warm else steady.step_s
    return _Timing(steady, warm_s + (setup.model.steps - n_warm) * steady.step_s, warm_s,
                   slowest)


def _keyed_generation(setup: _Setup, method: Method, compute_s: float) -> _Timing:
    """A codec: every step priced with the payload a stream of this config sends (warmup
    and keyframe steps whole in the keyframe codec, spread keyframes a slice each)."""
    layout = MessageLayout.of(CompressionConfig(codec=method.codec, warmup_steps=setup.warmup,
                                                keyframes=setup.keyframes),
                              setup.traffic.shape, WIRE_DTYPE)
    schedule = layout.schedule
    total_s = keyed_s = slowest = 0.0
    for t in range(setup.model.steps):
        comm, control = _wire_s(setup, method.codec, t == 0, layout.payload_nbytes(t))
        codec = setup.keyframes.codec if schedule.is_keyframe(t) else method.codec
        step = estimate_step(compute_s + _codec_s(setup, codec), comm,
                             _overlaps(setup, method, t >= setup.warmup), control,
                             setup.hides).step_s
        total_s += step
        slowest = max(slowest, step)
        if schedule.is_keyframe(t) or layout.slice_rows(t) is not None:
            keyed_s += step
    return _Timing(_steady_step(setup, method, compute_s), total_s, keyed_s, slowest)


def _pipefusion_generation(setup: _Setup, method: Method, stage_s: float) -> _Timing:
    """PipeFusion's generation (``world`` stages, ``M`` patches).

    A stage computes its ``layers / world`` layers for every patch of a step (one GPU's
    step / world) and sends each patch on while it computes the next, so a steady step
    takes ``max(stage compute, M messages)``. The ``warmup`` steps run the full image
    through the stages one after another (no stale K/V yet): one GPU's step plus
    ``world - 1`` full-image hops. Filling the pipeline once costs ``world - 1`` patch
    stages (the bubble)."""
    model, world, warmup = setup.model, setup.world, setup.warmup
    image = model.batch * model.image_tokens * model.hidden * WIRE_DTYPE.itemsize
    warm_step = (compute_seconds(model, setup.gpu, 1)
                 + (world - 1) * collective_seconds("p2p", image, world, setup.link))
    bubble = (world - 1) * stage_s / setup.traffic.count
    comm, work = _wire_s(setup, method.codec)[0], stage_s + _codec_s(setup, method.codec)
    step = StepEstimate(compute_s=work, comm_s=comm, exposed_comm_s=max(0.0, comm - work),
                        step_s=max(work, comm), overlap=True)
    warm = warmup * warm_step
    slowest = max(warm_step if warmup else 0.0, step.step_s)
    return _Timing(step, warm + (model.steps - warmup) * step.step_s + bubble, warm, slowest)


def _generation(setup: _Setup, method: Method, compute_s: float) -> _Timing:
    if setup.parallelism == "pipefusion":
        return _pipefusion_generation(setup, method, compute_s)
    if method.codec is None:
        return _raw_generation(setup, method, compute_s)
    return _keyed_generation(setup, method, compute_s)


def _held_bytes(setup: _Setup, method: Method) -> int:
    """Bytes one rank keeps between steps: references or stale K/V, and for PipeFusion the
    stage's K and V of every image token (stale for the other patches)."""
    model = setup.model
    kv_cache = 0
    if setup.parallelism == "pipefusion":
        kv_cache = (math.ceil(model.layers / setup.world) * 2 * model.batch
                    * model.image_tokens * model.hidden * WIRE_DTYPE.itemsize)
    return setup.traffic.held_bytes(method.codec, method.stale) + kv_cache


def _row(setup: _Setup, method: Method, compute_s: float, raw_total_s: float) -> MethodRow:
    if not method.runs_on(setup.parallelism):
        return not_applicable(method.name, setup.parallelism)
    timing = _generation(setup, method, compute_s)
    traffic, steady = setup.traffic, timing.steady
    held = _held_bytes(setup, method)
    return MethodRow(
        method=method.name,
        applies=True,
        bytes_per_step=traffic.bytes_per_step(method.codec),
        ratio=traffic.message_bytes(None) / traffic.message_bytes(method.codec),
        compute_s=steady.compute_s,
        comm_s=steady.comm_s,
        exposed_comm_s=steady.exposed_comm_s,
        step_s=steady.step_s,
        total_s=timing.total_s,
        speedup=raw_total_s / timing.total_s,
        held_bytes=held,
        codec_s=_codec_s(setup, method.codec),
        warmup_share=timing.keyed_s / timing.total_s,
        max_step_s=timing.slowest_s,
        fits=setup.model.params * 2 + held <= setup.gpu.memory_bytes,
    )


def _auto(setup: _Setup, method: Method) -> tuple[Method, str]:
    """The method ``codec="auto"`` would run here, and a note saying why: its choice for a
    steady step (:func:`compressed_comm.auto.decide`; wire at the link's bandwidth and
    latency, codec kernels from :data:`CODEC_PASSES` at the GPU's memory bandwidth -- an
    assumption, these kernels have not run on that GPU)."""
    traffic, gpu = setup.traffic, setup.gpu
    cands = [Candidate(c, traffic.message_bytes(None if c == "identity" else c))
             for c in parse_auto(method.codec or "auto")]
    costs = {c.spec: Cost(*(p / gpu.memory_bandwidth
                            for p in CODEC_PASSES[c.spec.split(":")[0]])) for c in cands}
    decision = decide(cands, AutoLink(setup.link.bandwidth, setup.link.latency), costs,
                      raw_bytes=traffic.message_bytes(None), fan=traffic.peers)
    spec = decision.spec
    codec = None if spec == "identity" else spec
    name = f"{method.name}={'raw' if codec is None else spec}"
    note = (f"{method.name}: a steady step would send {spec} ({decision.reason}); codec "
            f"kernels assumed at {gpu.name}'s memory bandwidth, never run there; per "
            f"message: " + "; ".join(str(e) for e in decision.estimates))
    return Method(name, codec, method.stale), note


def _keyframe_assumptions(setup: _Setup) -> tuple[str, ...]:
    keyframes = setup.keyframes
    if not keyframes.period:
        return ()
    return (f"codecs also send a keyframe ({keyframes.codec}) every {keyframes.period} steps"
            + (f", spread over {keyframes.spread} steps (each a slice of the rows plus "
               "residuals of the rest)" if keyframes.spread > 1 else "")
            + ("; not modelled for pipefusion" if setup.parallelism == "pipefusion" else ""),)


def _what_if_methods(codecs: Sequence[str], async_combos: bool) -> list[Method]:
    """raw, distrifusion, every method of ``codecs`` and (``async_combos``) every codec's
    ``+async`` too."""
    methods = parse_methods(codecs)
    if async_combos:
        methods += [parse_method(m.codec + ASYNC) for m in list(methods)
                    if m.codec is not None and not m.stale]
    return method_list(methods)


def run_what_if(
    model: str | ModelSpec,
    gpu: str | GPU,
    world: int,
    parallelism: str,
    link: str | Link,
    codecs: Sequence[str],
    warmup: int = 1,
    *,
    async_combos: bool = False,
    keyframes: Keyframes = Keyframes(),
    efficiency: Efficiency = CALIBRATED,
) -> WhatIfReport:
    """Estimate one generation of ``model`` on ``world`` x ``gpu`` over ``link``.

    Methods (:mod:`simulator.methods`): ``raw`` (synchronous, bf16 tensors),
    ``distrifusion`` (patch parallelism only: asynchronous after ``warmup`` synchronous
    steps), each codec spec in ``codecs`` (synchronous residual compression, the first
    ``warmup`` steps sent in full) and ``<spec>+async`` combinations (listed in ``codecs``,
    or for every codec with ``async_combos=True``; patch parallelism only). Unknown names
    raise ``ValueError`` listing the choices; ``ulysses`` needs ``world`` to divide the
    attention heads. ``gpu`` and ``link`` are preset names or :class:`GPU` / :class:`Link`
    objects. ``keyframes`` are the codecs' (:class:`~compressed_comm.Keyframes`; every step
    priced with the payload a stream of that config sends; PipeFusion: warmup only).
    ``model`` is a preset name or a :class:`ModelSpec`; ``efficiency`` the methods'
    efficiency terms (:data:`~simulator.whatif.efficiency.CALIBRATED`).
    """
    spec = model if isinstance(model, ModelSpec) else get_model(model)
    gpu_ = gpu if isinstance(gpu, GPU) else get_gpu(gpu)
    link_ = link if isinstance(link, Link) else get_link(link)
    traffic = step_traffic(spec, world, parallelism)
    parallelism = parallelism.strip().lower()
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= spec.steps:
        raise ValueError(f"warmup must be an integer in [0, {spec.steps}], got {warmup!r}")
    if not isinstance(keyframes, Keyframes):
        raise ValueError(f"keyframes must be a Keyframes; got {keyframes!r}")
    methods = _what_if_methods(codecs, async_combos)
    setup = _Setup(spec, gpu_, link_, world, parallelism, traffic, warmup, keyframes,
                   efficiency)
    notes: list[str] = []
    for i, m in enumerate(methods):
        if m.codec is not None and is_auto(m.codec):
            methods[i], note = _auto(setup, m)
            notes.append(note)
    compute = _compute_s(setup)
    raw_total = _generation(setup, RAW, compute).total_s
    return WhatIfReport(
        model=spec, gpu=gpu_, link=link_, world=world, parallelism=parallelism,
        warmup=warmup, traffic=traffic, raw_message_bytes=traffic.message_bytes(None),
        compute_s=compute, single_gpu_total_s=spec.steps * compute_seconds(spec, gpu_, 1),
        rows=tuple(_row(setup, m, compute, raw_total) for m in methods),
        assumptions=(spec.assumptions
                     + general_assumptions(spec, gpu_, link_, world, parallelism, warmup,
                                           efficiency)
                     + _keyframe_assumptions(setup) + tuple(notes)),
    )


def best_methods(model: str | ModelSpec, gpu: str | GPU, world: int, link: str | Link,
                 codecs: Sequence[str], warmup: int = 1,
                 keyframes: Keyframes = Keyframes(),
                 efficiency: Efficiency = CALIBRATED) -> list[tuple[str, str, float]]:
    """``(parallelism, method, total seconds)``: the fastest method of every parallelism
    that applies to ``model`` on ``world`` ranks (Ulysses only where ``world`` divides the
    heads), fastest first."""
    out = []
    for parallelism in PARALLELISMS:
        try:
            report = run_what_if(model, gpu, world, parallelism, link, codecs, warmup,
                                 keyframes=keyframes, efficiency=efficiency)
        except ValueError:  # e.g. Ulysses with a world that does not divide the heads
            continue
        best = min((r for r in report.rows if r.applies), key=lambda r: r.total_s)
        out.append((parallelism, best.method, best.total_s))
    return sorted(out, key=lambda row: row[2])
