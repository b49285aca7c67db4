"""End-to-end generation on N processes, raw vs compressed, optionally over a capped link.

    python bench/e2e.py [--world 4] [--model flux|photos] [--steps 6] [--tokens 1024]
        [--heads 8] [--head-dim 48]
        [--parallelisms patch,ring,ulysses,cp-ulysses,cp-ring] [--codecs binary,binary+async]
        [--keyframe-codec int8] [--keyframe-period 10] [--keyframe-spread 4]
        [--control on|off] [--rate 1gbit] [--rate-schedule 6:200mbit,12:1gbit] [--delay 1ms]
        [--json e2e.json] [--timeout 3600]

Each of ``--world`` processes (gloo on CPU, NCCL when CUDA is available) holds the same
random-weight diffusers ``FluxTransformer2DModel`` (``simulator.workloads.flux_workload``: 2
double and 2 single blocks, width ``heads x head-dim``, ``--tokens`` image tokens and 8 text
tokens; float32 on CPU, bfloat16 on GPUs; ``--model photos``: the trained Flux of
:mod:`simulator.photos` instead, so PSNR is measured on a model whose outputs are pictures)
and denoises the same noise for ``--steps``
flow-matching steps:

* ``single``: rank 0 alone, the whole model (the others wait);
* per parallelism -- ``patch``, ``ring``, ``ulysses`` through :mod:`adapters.dit`, and
  diffusers' own context parallelism ``cp-ulysses`` / ``cp-ring`` with
  :func:`adapters.xdit.enable_compression` -- ``raw`` (exact), ``distrifusion`` (patch:
  stale raw K/V) and every ``--codecs`` spec (``+async``: stale K/V, for patch and cp-ring);
  ``auto`` (``codec="auto"``) also prints, for the adapter's parallelisms, one line per
  step -- the link rate in force, the slowest rank's seconds, the most a rank sent and what
  rank 0's encoder streams sent (streams per codec) -- and the last decision with its
  estimates.

It first measures the link's latency with timed 4-byte all_gathers (seconds per hop, which
``bench/sim_vs_e2e.py`` gives the simulator), then prints, per run, the median seconds
per step of the slowest rank after the first step, the speedup against raw (same
parallelism) and against one process, the bytes each rank sends per step after the first,
and the PSNR of the final latents against raw; ``--json`` writes the same
(``bench/results.py``'s ``E2EResult``). With ``--rate`` the ranks share one link of that
rate (a fresh network namespace whose loopback is shaped by tc, see
``bench/shaped_link.py``; needs root, exits 2 otherwise); ``--delay`` adds a netem delay
where the kernel has netem.

``--rate-schedule STEP:RATE[,STEP:RATE...]`` (with ``--rate``) changes the link mid-run: at
the start of denoising step STEP (0-based, steps increasing and below ``--steps``) of every
parallel run the link's rate becomes RATE (a tc rate: ``200mbit``, ``1gbit``), and every run
starts again at ``--rate``; ``--rate 1gbit --rate-schedule 6:200mbit,12:1gbit`` runs steps
0-5 at 1gbit, 6-11 at 200mbit and 12 on at 1gbit. Rank 0 changes the namespace's token
bucket (``tc qdisc change``, same burst and latency) before the barrier that starts the step,
so the other ranks wait for it and no step's seconds include the change. With a schedule every
run (not only ``auto``) prints its per-step lines; ``--json`` records the schedule and every
run's steps (``E2EStep``: seconds, bytes, rate in force, what ``auto`` sent).

On CPU, diffusers' ring
needs the log-sum-exp that its CP backends do not return there: ``cp-ring`` then uses a
small math attention op (as ``examples/diffusers_cp_example.py`` does).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from results import E2EResult, E2ERow, E2EStep  # bench/ is this script's folder
from shaped_link import (
    SCHEDULE_FORM,
    change_rate,
    end_rank,
    parse_rate_schedule,
    rate_at,
    run_behind,
)

from compressed_comm.auto import is_auto
from simulator.methods import RAW, Method, method_list, parse_methods
from simulator.metrics import range_psnr
from simulator.workloads import Workload, flux_workload, photos_workload

TOOL = "e2e.py"
ADAPTER = ("patch", "ring", "ulysses")
DIFFUSERS_CP = ("cp-ulysses", "cp-ring")


def _workload(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Workload:
    if args.model == "photos":
        return photos_workload(1, 0, device=device, dtype=dtype)
    return flux_workload(1, 0, tokens=args.tokens, heads=args.heads, head_dim=args.head_dim,
                         device=device, dtype=dtype)


@dataclass
class _Run:
    """One parallel run on this rank: final latents, seconds and bytes sent per step, and
    for ``codec="auto"`` what this rank's encoder streams sent per step and the last
    decision of one of them."""

    latents: torch.Tensor
    seconds: list[float]
    sent: list[int]
    choices: list[dict[str, int]] | None = None
    decision: str | None = None


def _denoise(workload: Workload, model: torch.nn.Module, steps: int, counter: Any,
             together: bool = True, observe: Any = None,
             at_step: Callable[[int], None] | None = None
             ) -> tuple[torch.Tensor, list[float], list[int]]:
    """Latents after ``steps`` steps, this rank's seconds and bytes sent per step
    (``together``: all ranks start each step at a barrier; ``at_step(step)``, if given, is
    called before that barrier, untimed; ``observe()``, if given, after every step)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    latents, seconds, sent = workload.noise.clone(), [], []
    with torch.no_grad():
        for step, t in enumerate(scheduler.timesteps):
            if at_step is not None:
                at_step(step)
            if together:
                dist.barrier()
            before, t0 = counter(), time.perf_counter()
            v = workload.forward(model, latents, (t / 1000).expand(latents.shape[0]))
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
            if latents.is_cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t0)
            sent.append(counter() - before)
            if observe is not None:
                observe()
    return latents, seconds, sent


def _hop_latency(world: int, device: torch.device, repeat: int = 7) -> float:
    """Seconds per hop of this group's link: the median of timed raw all_gathers of 4
    bytes, over the ``world - 1`` hops of one."""
    x = torch.zeros(1, device=device)
    out = [torch.empty_like(x) for _ in range(world)]
    secs = []
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_gather(out, x)
        secs.append(time.perf_counter() - t0)
    return statistics.median(secs) / (world - 1)


def _methods(parallelism: str, codecs: list[Method]) -> list[Method]:
    """raw, distrifusion (patch) and every method of ``codecs`` that ``parallelism`` runs:
    stale ones where :mod:`simulator.methods` allows them, and on diffusers' own CP only
    compressed ones (its raw run is diffusers' own, unhooked)."""
    return [m for m in method_list(codecs, distrifusion=parallelism == "patch")
            if m.runs_on(parallelism)
            and (parallelism in ADAPTER or m.codec is not None or m == RAW)]


def _rate_changer(args: argparse.Namespace) -> Callable[[int], None] | None:
    """With ``--rate-schedule``, what runs before each step of a parallel run: rank 0 sets
    the link to the rate in force at that step where it differs from the current one (the
    barrier that starts the step holds the other ranks meanwhile)."""
    if not args.rate_schedule:
        return None
    current = args.rate

    def before(step: int) -> None:
        nonlocal current
        rate = rate_at(args.rate, args.rate_schedule, step)
        if dist.get_rank() == 0 and rate != current:
            change_rate(rate)
            current = rate
    return before


def _run(parallelism: str, method: Method, workload: Workload, args: argparse.Namespace,
         at_step: Callable[[int], None] | None = None) -> _Run:
    from adapters.dit import ParallelConfig, parallelize
    from adapters.xdit import enable_compression
    from compressed_comm import TorchDistTransport

    model = copy.deepcopy(workload.model)
    if parallelism in ADAPTER:
        compression = None if method.codec is None else _config(method.codec, args)
        par = parallelize(model, TorchDistTransport(), ParallelConfig(
            parallelism, compression=compression, asynchronous=method.stale,
            timeout=args.op_timeout))
        observe, choices = None, None
        if method.codec is not None and is_auto(method.codec):
            choices = []

            def observe() -> None:  # what codec="auto" sent this step, by stream count
                picks = Counter(s.codec.removeprefix("auto:") for s in par.stats().streams
                                if s.role == "encoder")
                choices.append(dict(sorted(picks.items())))
        try:
            run = _Run(*_denoise(workload, model, args.steps, lambda: par.exchange.bytes_sent,
                                 observe=observe, at_step=at_step), choices=choices)
            if choices is not None:
                last = next((s for s in par.stats().streams if s.role == "encoder"), None)
                run.decision = None if last is None else f"{last.name}: {last.choice}"
            return run
        finally:
            par.remove()
    from diffusers import ContextParallelConfig

    from adapters.hooks.diffusers_cp import lse_attention_on_cpu

    world = dist.get_world_size()
    mode = parallelism.removeprefix("cp-")
    with mock.patch.object(torch.accelerator, "device_count",
                           return_value=max(1, torch.accelerator.device_count())):
        model.enable_parallelism(config=ContextParallelConfig(**{f"{mode}_degree": world}))
    on_cpu = not workload.noise.is_cuda
    lse = lse_attention_on_cpu() if mode == "ring" and on_cpu else nullcontext()
    with lse:
        if method == RAW:
            return _Run(*_denoise(workload, model, args.steps, lambda: 0, at_step=at_step))
        handle = enable_compression(model, _config(method.codec, args), asynchronous=method.stale,
                                    timeout=args.op_timeout)
        try:
            return _Run(*_denoise(workload, model, args.steps, lambda: handle.bytes_sent,
                                  at_step=at_step))
        finally:
            handle.disable()


def _config(codec: str, args: argparse.Namespace) -> Any:
    from compressed_comm import CompressionConfig, Keyframes

    return CompressionConfig(codec=codec, handshake=args.control == "on", keyframes=Keyframes(
        codec=args.keyframe_codec, period=args.keyframe_period, spread=args.keyframe_spread))


def _worker(rank: int, args: argparse.Namespace, init: str) -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init}", rank=rank,
                            world_size=args.world, timeout=datetime.timedelta(seconds=600))
    try:
        torch.set_num_threads(1)
        device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else \
            torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        workload = _workload(args, device, torch.bfloat16 if cuda else torch.float32)
        latency = _hop_latency(args.world, device)
        if rank == 0:
            print(f"link latency (4-byte all_gather): {latency * 1e6:.0f} us per hop",
                  flush=True)
        rows: list[E2ERow] = []
        secs = (_denoise(workload, workload.model, args.steps, lambda: 0, together=False)[1]
                if rank == 0 else [])  # one process alone; the others wait below
        times: list[Any] = [None] * args.world
        dist.all_gather_object(times, secs)
        single = statistics.median(times[0][1:])
        rows.append(E2ERow("-", "single", single))
        if rank == 0:
            _print_row(rows[-1])
        at_step = _rate_changer(args)
        for parallelism in args.parallelisms:
            raw_latents, raw_seconds = None, None
            for method in _methods(parallelism, args.codecs):
                run = _run(parallelism, method, workload, args, at_step)
                latents = run.latents
                gathered: list[Any] = [None] * args.world
                dist.all_gather_object(gathered, (run.seconds, run.sent))
                slowest = [max(g[0][i] for g in gathered) for i in range(args.steps)]
                seconds = statistics.median(slowest[1:])
                if method == RAW:
                    raw_latents, raw_seconds = latents, seconds
                nbytes = max(statistics.mean(g[1][1:]) for g in gathered)
                per_step = tuple(E2EStep(
                    i, slowest[i], max(g[1][i] for g in gathered),
                    rate=rate_at(args.rate, args.rate_schedule, i),
                    sent=None if run.choices is None else run.choices[i])
                    for i in range(args.steps))
                rows.append(E2ERow(
                    parallelism, method.name, seconds, speedup_vs_raw=raw_seconds / seconds,
                    speedup_vs_single=single / seconds,
                    bytes_per_step=None if parallelism in DIFFUSERS_CP and method == RAW
                    else nbytes,
                    psnr_vs_raw=range_psnr(latents.float().cpu(), raw_latents.float().cpu()),
                    per_step=per_step))
                if rank == 0:
                    _print_row(rows[-1])
                    if run.choices is not None or args.rate_schedule:
                        _print_steps(rows[-1], run.decision)
        if rank == 0 and args.json:
            options = {k: v for k, v in vars(args).items() if k not in ("inner", "codecs")}
            E2EResult({**options, "codecs": [m.name for m in args.codecs]}, latency,
                      tuple(rows), rate=args.rate,
                      rate_schedule=args.rate_schedule).write(args.json)
            print(f"wrote {args.json}")
    finally:
        dist.destroy_process_group()
    end_rank()


def _print_row(r: E2ERow) -> None:
    nbytes = "-" if r.bytes_per_step is None else f"{r.bytes_per_step:,.0f}"
    psnr = r.psnr_vs_raw
    psnr = "-" if psnr is None else "inf" if psnr == math.inf else f"{psnr:.1f}"
    vs_raw = 1.0 if r.speedup_vs_raw is None else r.speedup_vs_raw
    vs_single = 1.0 if r.speedup_vs_single is None else r.speedup_vs_single
    print(f"{r.parallelism:<11} {r.method:<14} {r.seconds:>8.3f} {vs_raw:>7.2f}x "
          f"{vs_single:>9.2f}x {nbytes:>14} {psnr:>7}", flush=True)


def _print_steps(r: E2ERow, decision: str | None) -> None:
    """The row's per-step lines: link rate in force, the slowest rank's seconds, the most a
    rank sent and, for ``auto``, what rank 0's encoder streams sent (``6 binary, 2 int8``:
    streams per codec); then ``decision``, auto's last one."""
    print(f"  {r.parallelism} {r.method}, per step: link rate, s (slowest rank), bytes sent "
          "(most of a rank)" + (", streams of rank 0 per codec sent" if decision is not None or any(
              s.sent is not None for s in r.per_step) else ""), flush=True)
    for s in r.per_step:
        sent = "" if s.sent is None else "  " + (
            ", ".join(f"{n} {k}" for k, n in s.sent.items()) or "-")
        print(f"    step {s.step:>3}  {s.rate or 'uncapped':<9} {s.seconds:>8.3f} s "
              f"{s.bytes_sent:>14,.0f} B{sent}", flush=True)
    if decision is not None:
        print(f"  {decision}", flush=True)


def _parse_codecs(text: str) -> list[Method]:
    """The ``--codecs`` methods: :func:`~simulator.methods.parse_methods`, plus ``auto`` and
    ``auto+async`` (``codec="auto"``, its default candidates: a candidate list has commas)."""
    out = []
    for name in _csv(text):
        codec = name.lower().removesuffix("+async")
        if codec == "auto":
            out.append(Method(name.lower(), codec, name.lower().endswith("+async")))
        elif is_auto(codec):
            raise ValueError(f"--codecs {name!r}: only the default candidates ('auto') here")
        else:
            out.extend(parse_methods(name))
    return out


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4, help="gloo processes (default: 4)")
    p.add_argument("--model", choices=("flux", "photos"), default="flux",
                   help="flux: random weights of --tokens/--heads/--head-dim; photos: the "
                        "trained Flux of simulator.photos (1024 tokens, width 64; ignores them)")
    p.add_argument("--steps", type=int, default=6, help="denoising steps (default: 6)")
    p.add_argument("--tokens", type=int, default=1024, help="image tokens (a square number)")
    p.add_argument("--heads", type=int, default=8, help="attention heads of the flux model")
    p.add_argument("--head-dim", type=int, default=48, help="width of one head (flux model)")
    p.add_argument("--parallelisms", type=_csv, default=list(ADAPTER + DIFFUSERS_CP),
                   help=f"comma-separated, of {','.join(ADAPTER + DIFFUSERS_CP)} (default: all)")
    p.add_argument("--codecs", default="binary,binary+async",
                   help="methods besides raw and distrifusion: codec specs, each with +async "
                        "for stale K/V (patch and cp-ring) (default: %(default)s)")
    p.add_argument("--keyframe-codec", default="identity",
                   help="how the codecs' keyframes are sent (CompressionConfig.keyframe_codec)")
    p.add_argument("--keyframe-period", type=int, default=0,
                   help="a keyframe every this many steps (0: only the warmup step)")
    p.add_argument("--keyframe-spread", type=int, default=1,
                   help="each periodic keyframe in this many row slices over as many steps")
    p.add_argument("--control", choices=("on", "off"), default="on",
                   help="the codecs' control plane (CompressionConfig.handshake): on, the "
                        "default, or off (no agreement between ranks: cheapest, unsafe)")
    p.add_argument("--rate", help="cap the ranks' shared link at this tc rate (1gbit, 200mbit)")
    p.add_argument("--rate-schedule", default="", metavar="STEP:RATE[,...]",
                   help="change the --rate link mid-run: STEP:RATE[,STEP:RATE...] (e.g. "
                        "6:200mbit,12:1gbit): from the start of 0-based denoising step STEP "
                        "of every parallel run the link sends at RATE; each run starts at "
                        "--rate (needs --rate)")
    p.add_argument("--delay", help="netem delay per packet (1ms), where the kernel has netem")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--timeout", type=float, default=3600.0, help="kill the run after (s)")
    p.add_argument("--op-timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.world < 2 or args.steps < 2 or math.isqrt(args.tokens) ** 2 != args.tokens:
        p.error("--world and --steps must be at least 2 and --tokens a square number")
    if args.rate_schedule and not args.rate:
        p.error(f"--rate-schedule {args.rate_schedule!r} needs --rate (the rate each run "
                f"starts at); expected e.g. --rate 1gbit --rate-schedule {SCHEDULE_FORM}")
    try:
        _config("binary", args)
        args.codecs = _parse_codecs(args.codecs)
        args.rate_schedule = (parse_rate_schedule(args.rate_schedule, args.steps)
                              if args.rate_schedule else ())
    except ValueError as e:
        p.error(str(e))
    unknown = set(args.parallelisms) - set(ADAPTER + DIFFUSERS_CP)
    if unknown:
        p.error(f"unknown parallelisms {sorted(unknown)}; expected {ADAPTER + DIFFUSERS_CP}")
    if args.inner:
        shape = ("trained photos model, 1024 image tokens, width 64" if args.model == "photos"
                 else f"{args.tokens} image tokens, width {args.heads * args.head_dim}")
        link = args.rate or "loopback (uncapped)"
        if args.rate_schedule:
            link += ", then " + ", ".join(f"{r} from step {s}" for s, r in args.rate_schedule)
            link += " (0-based, every parallel run)"
        print(f"{args.world} ranks, {shape}, {args.steps} steps, link {link}; median s/step "
              "of the slowest rank after step 1; bytes sent per rank and step after step 1")
        print(f"{'parallelism':<11} {'method':<14} {'s/step':>8} {'vs raw':>8} {'vs single':>10} "
              f"{'bytes/step':>14} {'PSNR':>7}")
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(args, os.path.join(tmp, "store")), nprocs=args.world)
        return
    run_behind(TOOL, sys.argv[1:], __file__, args.rate, args.delay, args.timeout)


if __name__ == "__main__":
    main()
