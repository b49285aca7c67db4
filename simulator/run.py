"""Run a workload on one device and on N virtual ranks with each method; measure everything.

A *method* (:mod:`simulator.methods`) is one way to exchange K/V: ``raw`` (exact
parallel), ``distrifusion`` (one-step-stale K/V, patch parallelism only), a codec spec
(residual compression, e.g. ``binary``) or ``<codec>+async`` (both). Each parallel run uses
N threads, each with its own copy of the model (see :mod:`adapters.dit`), over an
in-process transport; every rank counts the bytes and messages it sends in every step.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from adapters.dit import ParallelConfig, parallelize
from compressed_comm import (
    Collectives,
    CompressionConfig,
    Keyframes,
    SessionStats,
    StreamDecoder,
    StreamEncoder,
)
from compressed_comm.testing import run_ranks

from .methods import DISTRIFUSION, Method, method_list, parse_methods
from .network import Link, estimate_step
from .workloads import WORKLOADS, Workload, sample

__all__ = ["ParallelMethod", "make_methods", "Reference", "RunResult", "run_reference",
           "run_method", "estimate_memory", "check_memory", "available_memory", "step_seconds",
           "codec_seconds", "add_run_arguments"]


@dataclass(frozen=True)
class ParallelMethod:
    """A method (:mod:`simulator.methods`) and the parallel configuration that runs it."""

    method: Method
    config: ParallelConfig

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def asynchronous(self) -> bool:
        return self.config.asynchronous


def make_methods(parallelism: str, codecs: Iterable[str], *, warmup: int = 1,
                 timeout: float = 120.0, distrifusion: bool = True,
                 keyframes: Keyframes = Keyframes()) -> list[ParallelMethod]:
    """``raw``, ``distrifusion`` (patch only) and every method of ``codecs``
    (:func:`~simulator.methods.parse_methods`; the codecs' ``keyframes``); ``ValueError``
    for a method that ``parallelism`` cannot run."""
    methods = method_list(parse_methods(codecs),
                          distrifusion=distrifusion and DISTRIFUSION.runs_on(parallelism))
    out = []
    for method in methods:
        method.check(parallelism)
        compression = None if method.codec is None else CompressionConfig(
            codec=method.codec, warmup_steps=warmup, keyframes=keyframes)
        out.append(ParallelMethod(method, ParallelConfig(parallelism, compression, method.stale,
                                                         warmup, timeout)))
    return out


@dataclass
class Reference:
    """The exact single-device run."""

    latents: torch.Tensor
    images: torch.Tensor
    step_seconds: float   # median wall time of one forward of the full model, this machine


@dataclass
class RunResult:
    """One method's parallel run."""

    method: ParallelMethod
    latents: torch.Tensor
    images: torch.Tensor
    bytes_per_step: list[list[int]]      # [rank][step] bytes sent
    messages_per_step: list[list[int]]   # [rank][step] messages sent
    wall_seconds: float
    stats: SessionStats | None = None    # rank 0's compressed streams
    #: [rank][step] of those messages, the control plane's (waited for: its exchanges block)
    handshakes_per_step: list[list[int]] | None = None

    @property
    def steps(self) -> int:
        return len(self.bytes_per_step[0])

    @property
    def total_bytes_per_step(self) -> float:
        """Bytes all ranks send per step, averaged over the run."""
        return sum(map(sum, self.bytes_per_step)) / self.steps

    def bottleneck(self, step: int) -> tuple[int, int, int]:
        """(bytes, messages, control messages) of the rank that sends most in ``step``."""
        hs = self.handshakes_per_step or [[0] * self.steps for _ in self.bytes_per_step]
        return max((b[step], m[step], h[step]) for b, m, h in zip(
            self.bytes_per_step, self.messages_per_step, hs))


def run_reference(workload: Workload, steps: int) -> Reference:
    """Sample on one device with the unmodified model, timing each forward."""
    times: list[float] = []

    def timed(model, x, t):
        t0 = time.perf_counter()
        out = workload.forward(model, x, t)
        times.append(time.perf_counter() - t0)
        return out
    ref_workload = copy.copy(workload)
    ref_workload.forward = timed
    latents = sample(ref_workload, workload.model, steps)
    return Reference(latents, workload.to_images(latents), sorted(times)[len(times) // 2])


def run_method(workload: Workload, method: ParallelMethod, world: int, steps: int, *,
               on_step: Callable[[], None] | None = None, timeout: float = 600.0,
               wrap_exchange: Callable[[Collectives], Collectives] | None = None) -> RunResult:
    """Sample with ``method`` on ``world`` virtual ranks; rank 0's latents are returned
    (every rank ends with the same full latents). ``wrap_exchange`` replaces each rank's K/V
    exchange by what it returns for it (:mod:`simulator.testbed`'s ablations)."""

    def body(transport):
        torch.set_num_threads(1)
        model = copy.deepcopy(workload.model)
        par = parallelize(model, transport, method.config)
        if wrap_exchange is not None:
            par.exchange = wrap_exchange(par.exchange)
        sent_bytes, sent_msgs, sent_handshakes = [], [], []

        def forward(m, x, t):
            ex = par.exchange
            b0, m0, h0 = ex.bytes_sent, ex.messages_sent, ex.handshake_messages_sent
            out = workload.forward(m, x, t)
            sent_bytes.append(ex.bytes_sent - b0)
            sent_msgs.append(ex.messages_sent - m0)
            sent_handshakes.append(ex.handshake_messages_sent - h0)
            if on_step is not None and transport.rank == 0:
                on_step()
            return out
        run_workload = copy.copy(workload)
        run_workload.forward = forward
        latents = sample(run_workload, model, steps)
        par.finish()
        stats = par.stats()
        return latents, sent_bytes, sent_msgs, stats, sent_handshakes

    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        results = run_ranks(world, body, timeout=timeout)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - t0
    latents, _, _, stats, _ = results[0]
    for r, (other, *_rest) in enumerate(results[1:], start=1):
        if not torch.equal(other, latents):
            raise AssertionError(f"{method.name}: rank {r} ended with other latents than rank 0")
    return RunResult(method, latents, workload.to_images(latents),
                     [r[1] for r in results], [r[2] for r in results], wall, stats,
                     [r[4] for r in results])


def step_seconds(result: RunResult, compute_s: float, link: Link, after: int = 0
                 ) -> tuple[float, float]:
    """Estimated mean (step time, exposed communication) on ``link``, in seconds, over the
    steps from ``after`` on (0: all of them).

    Per step the busiest rank's traffic costs ``messages * latency + bytes / bandwidth``;
    asynchronous methods hide it behind compute after their synchronous warmup steps, all but
    the latency of their control exchanges (they block).
    """
    if not 0 <= after < result.steps:
        raise ValueError(f"after must be in [0, {result.steps}), got {after}")
    step_total = exposed_total = 0.0
    for step in range(after, result.steps):
        nbytes, messages, handshakes = result.bottleneck(step)
        comm = messages * link.latency + nbytes / link.bandwidth
        overlap = result.method.asynchronous and step >= result.method.config.warmup
        estimate = estimate_step(compute_s, comm, overlap, handshakes * link.latency)
        step_total += estimate.step_s
        exposed_total += estimate.exposed_comm_s
    n = result.steps - after
    return step_total / n, exposed_total / n


def codec_seconds(stats: SessionStats | None, config: CompressionConfig | None) -> float:
    """Seconds rank 0 spends per step in its streams' codec kernels, measured on this
    machine with one thread: for every stream, one steady-state message of its size
    (float32, viewed ``(rows, gcd(numel, 64))``) encoded if rank 0 sends it, decoded if it
    receives it. 0 for raw exchanges."""
    if stats is None or config is None:
        return 0.0
    timed: dict[tuple[str, int], float] = {}
    total = 0.0
    for st in stats.streams:
        if st.steps == 0:
            continue
        key = (st.role, st.raw_bytes // st.steps)
        if key not in timed:
            timed[key] = _time_message(config, *key)
        total += timed[key]
    return total


def _time_message(config: CompressionConfig, role: str, nbytes: int, repeat: int = 5) -> float:
    numel = max(1, nbytes // 4)
    cols = math.gcd(numel, 64)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(numel // cols, cols, generator=gen) * (1 + 0.01 * i)
          for i in range(repeat + 2)]
    enc = StreamEncoder("timed", xs[0], config)
    dec = StreamDecoder("timed", xs[0], config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for x in xs[:2]:  # the keyframe and one message: kernels compiled and warm
            dec.decode(enc.encode(x))
        times = []
        for x in xs[2:]:
            t0 = time.perf_counter()
            payload = enc.encode(x)
            t1 = time.perf_counter()
            dec.decode(payload)
            t2 = time.perf_counter()
            times.append(t1 - t0 if role == "encoder" else t2 - t1)
        return sorted(times)[len(times) // 2]
    finally:
        torch.set_num_threads(threads)


def estimate_memory(workload: Workload, world: int, steps: int) -> int:
    """Bytes a run is expected to need at its peak: one model copy per virtual rank, the
    sampler's latents, and per rank the K/V references of every origin (an upper bound
    based on the model's hidden size and token count)."""
    params = workload.parameter_bytes()
    latents = workload.noise.numel() * 4 * 4
    cfg = workload.model.config
    hidden = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
    layers = sum(1 for n, _ in workload.model.named_modules() if n.endswith(("attn", "attn1")))
    tokens = workload.noise[0].numel()  # an upper bound on image tokens per sample
    kv = 2 * layers * workload.noise.shape[0] * tokens * hidden * 4
    return world * (params + 2 * kv) + latents


def available_memory() -> int:
    """Physical memory currently available to this process, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_memory(needed: int, available: int | None = None) -> None:
    """Raise MemoryError before a run that would not fit."""
    available = available_memory() if available is None else available
    if needed > available:
        raise MemoryError(f"this run needs about {needed / 2**30:.1f} GiB but only "
                          f"{available / 2**30:.1f} GiB are available; use fewer ranks, a "
                          "smaller batch or the what-if mode")



def add_run_arguments(parser: argparse.ArgumentParser, *, model: str | None = "photos",
                      batch: int = 2) -> None:
    """The options of a run on virtual ranks that the simulator's side commands share:
    ``--model`` (left out where ``model`` is None), ``--ranks``, ``--steps``, ``--batch``
    and ``--seed``."""
    if model is not None:
        parser.add_argument("--model", default=model, help=f"{', '.join(WORKLOADS)} "
                            "(default: %(default)s)")
    parser.add_argument("--ranks", type=int, default=4,
                        help="virtual ranks (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20,
                        help="denoising steps (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=batch,
                        help="samples per run (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
