"""``python -m simulator``: parallel DiT inference with compressed K/V on N virtual ranks.

Default: the embedded digits model (a trained SD3 transformer, no download) on 4 virtual
ranks with patch parallelism, comparing raw (exact parallel), DistriFusion and residual
compression with binary, int2, int4, lowrank:8 and lowrankq:32. It prints wire bytes per
step, compression ratio, quality against the exact parallel output and the estimated step
time on two links, and writes an image grid and a quality plot (PSNR against wire bytes and
against the estimated step time on the slowest of those links).

``--what-if flux.1-dev`` (or ``cogvideox-2b``) instead estimates traffic and latency for a
real model on real GPUs from its published configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from adapters.dit import PARALLELISMS
from compressed_comm import Keyframes

from .methods import parse_methods
from .metrics import quality
from .network import LINKS, get_link
from .report import Row, SimulationReport
from .run import (
    check_memory,
    codec_seconds,
    estimate_memory,
    make_methods,
    run_method,
    run_reference,
    step_seconds,
)
from .whatif import MODEL_SPECS, best_methods, run_what_if
from .whatif import PARALLELISMS as WHATIF_PARALLELISMS
from .workloads import WORKLOADS, make_workload

__all__ = ["main", "build_parser", "simulate"]

DEFAULT_CODECS = "binary,int2,int4,lowrank:8,lowrankq:32"
DEFAULT_LINKS = "pcie4,10gbe"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


#: diffusers' own context parallelism: not on virtual ranks (see _validate)
DIFFUSERS_CP = ("diffusers-ulysses", "diffusers-ring")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simulator", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits",
                   help=f"workload: {', '.join(WORKLOADS)} (default: %(default)s)")
    p.add_argument("--parallelism", default="patch",
                   help=f"{', '.join(PARALLELISMS)} (default: %(default)s); diffusers' own "
                        f"{' and '.join(DIFFUSERS_CP)} need processes: see "
                        "examples/diffusers_cp_example.py")
    p.add_argument("--ranks", type=int, default=4, help="virtual ranks (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=None,
                   help="samples per run (default: 10 for digits, one per class; 2 otherwise)")
    p.add_argument("--codecs", default=DEFAULT_CODECS,
                   help="comma-separated methods besides raw and distrifusion: codec specs, "
                        "each with +async for DistriFusion-style overlap (patch only) "
                        "(default: %(default)s)")
    p.add_argument("--keyframe-codec", default="identity",
                   help="how warmup steps (keyframes) are sent: identity (lossless), int8, fp8, "
                        "int4, int2, binary (default: %(default)s)")
    p.add_argument("--keyframe-period", type=int, default=0,
                   help="also send a keyframe every this many steps (0: never; default: "
                        "%(default)s)")
    p.add_argument("--keyframe-spread", type=int, default=1,
                   help="send each periodic keyframe as this many row slices over as many "
                        "steps (default: %(default)s, whole)")
    p.add_argument("--warmup", type=int, default=1,
                   help="steps sent in full before compressing / going stale (default: 1)")
    p.add_argument("--links", default=None,
                   help=f"link presets for the step-time estimate: {', '.join(LINKS)} "
                        f"(default: {DEFAULT_LINKS}, unless --link is given)")
    p.add_argument("--link", action="append", default=[], metavar="RATE[,LATENCY]",
                   help="a link as you describe it, e.g. 800mbit,50us or 25gbit or 10GB/s,5us "
                        "(repeatable; per GPU and direction)")
    p.add_argument("--compute-ms", type=float, default=None,
                   help="compute time per step and rank for the step-time estimate (default: "
                        "the measured single-device step on this machine / ranks)")
    p.add_argument("--out", default="simulator_out", help="output folder (default: %(default)s)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also write the quality plot (PSNR against bytes and against the "
                        "estimated step time on the slowest link) here, e.g. "
                        "docs/quality_vs_bytes.png")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and noise")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--what-if", metavar="MODEL", default=None,
                   help=f"estimate a real model instead: {', '.join(MODEL_SPECS)}")
    p.add_argument("--gpu", default="l20", help="GPU preset for --what-if (default: l20)")
    return p


def _link_specs(args: argparse.Namespace) -> list[str]:
    """The presets of ``--links`` (default when no ``--link``) and then every ``--link``."""
    presets = args.links if args.links is not None else ("" if args.link else DEFAULT_LINKS)
    return _csv(presets) + list(args.link)


def _keyframes(args: argparse.Namespace) -> Keyframes:
    """The keyframe options (ValueError naming what is wrong)."""
    return Keyframes(codec=args.keyframe_codec, period=args.keyframe_period,
                     spread=args.keyframe_spread)


def _keyframe_setup(args: argparse.Namespace) -> dict:
    """The keyframe options as the report's setup shows them."""
    return dict(keyframe_codec=args.keyframe_codec, keyframe_period=args.keyframe_period,
                keyframe_spread=args.keyframe_spread)


def _fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def _validate(args: argparse.Namespace) -> None:
    if args.parallelism in DIFFUSERS_CP:
        _fail(f"{args.parallelism}: diffusers' own context parallelism builds a torch "
              "DeviceMesh and calls torch.distributed's functional collectives on it, which "
              "need real process groups; the simulator's ranks are threads of one process "
              "without one. Run it over gloo instead: torchrun --nproc_per_node 2 "
              "examples/diffusers_cp_example.py --tiny --mode "
              f"{args.parallelism.split('-')[1]} (compressed vs uncompressed, bytes and PSNR)")
    known = WHATIF_PARALLELISMS if args.what_if is not None else PARALLELISMS
    if args.parallelism not in known:
        _fail(f"unknown parallelism {args.parallelism!r}; expected one of {', '.join(known)}"
              + ("" if args.what_if is not None else " (the what-if also knows pipefusion)"))
    if args.ranks < 1 or args.steps < 1 or args.warmup < 0:
        _fail("--ranks and --steps must be at least 1 and --warmup at least 0")
    try:
        parse_methods(args.codecs)
        _keyframes(args)
    except ValueError as e:
        _fail(str(e))
    for name in _link_specs(args):
        try:
            get_link(name)
        except ValueError as e:
            _fail(str(e))
    if args.what_if is None and args.model not in WORKLOADS:
        _fail(f"unknown model {args.model!r}; expected one of {', '.join(WORKLOADS)}")


def simulate(args: argparse.Namespace, progress: bool = True) -> SimulationReport:
    """Run the reference and every method; return the report (images written to ``--out``)."""
    batch = args.batch if args.batch is not None else (10 if args.model == "digits" else 2)
    workload = make_workload(args.model, batch=batch, seed=args.seed)
    if args.parallelism == "ulysses" and workload.heads % args.ranks:
        _fail(f"ulysses needs the head count ({workload.heads}) to be a multiple of --ranks "
              f"({args.ranks})")
    check_memory(estimate_memory(workload, args.ranks, args.steps))
    try:
        methods = make_methods(args.parallelism, _csv(args.codecs), warmup=args.warmup,
                               keyframes=_keyframes(args))
    except ValueError as e:
        _fail(str(e))
    links = {name: get_link(name) for name in _link_specs(args)}

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=args.steps * (len(methods) + 1), desc="simulating", unit="step",
                   file=sys.stderr, leave=False)
    reference = run_reference(workload, args.steps)
    if bar is not None:
        bar.update(args.steps)
    compute_s = (reference.step_seconds / args.ranks if args.compute_ms is None
                 else args.compute_ms / 1e3)
    runs = []
    for method in methods:
        if bar is not None:
            bar.set_postfix_str(method.name)
        runs.append(run_method(workload, method, args.ranks, args.steps,
                               on_step=(lambda: bar.update(1)) if bar is not None else None))
    if bar is not None:
        bar.close()

    exact = runs[0]
    rows = []
    for run in runs:
        # codec kernels on this CPU: only when compute is this CPU's too (not --compute-ms)
        codec_s = (codec_seconds(run.stats, run.method.config.compression)
                   if args.compute_ms is None else 0.0)
        times = {k: step_seconds(run, compute_s + codec_s, link) for k, link in links.items()}
        rows.append(Row(method=run.method.name, bytes_per_step=run.total_bytes_per_step,
                        ratio=exact.total_bytes_per_step / max(run.total_bytes_per_step, 1e-9),
                        quality=quality(run.images, exact.images, run.latents, exact.latents),
                        step_ms={k: 1e3 * t[0] for k, t in times.items()},
                        comm_ms={k: 1e3 * t[1] for k, t in times.items()},
                        wall_s=run.wall_seconds,
                        reference_bytes=None if run.stats is None else run.stats.reference_bytes,
                        codec_ms=1e3 * codec_s))
    parallel_error = float((exact.latents - reference.latents).abs().max())
    setup = {"model": workload.name, "description": workload.description, "ranks": args.ranks,
             "parallelism": args.parallelism, "steps": args.steps, "batch": batch,
             "warmup": args.warmup, **_keyframe_setup(args),
             "compute_ms_per_step": 1e3 * compute_s,
             "single_device_ms_per_step": 1e3 * reference.step_seconds,
             "exact_parallel_vs_single_device_max_abs": parallel_error,
             "links": {k: {"bandwidth_GBps": v.bandwidth / 1e9, "latency_us": v.latency * 1e6}
                       for k, v in links.items()}}
    notes = [
        "quality: PSNR/SSIM of the images and relative L2 of the latents against the exact "
        "parallel (raw) run; LPIPS is not reported (its weights need a download)",
        "wire bytes: K/V exchange of all ranks per step (warmup steps included); the exact "
        "all-gather of each step's output patches is the same for every method and not counted",
        "step time = compute + communication not hidden (in parentheses); compute = "
        + (f"the measured single-device step on this machine / {args.ranks} ranks"
           if args.compute_ms is None else f"{args.compute_ms} ms (--compute-ms)")
        + "; communication = messages x latency + bytes / bandwidth for the busiest rank; "
        + ("codec ms = rank 0's encode and decode kernels per step, measured on this machine "
           "(one thread, one message per stream), added to compute"
           if args.compute_ms is None else
           "codec kernel time is not modelled with --compute-ms (it was not measured on the "
           "device that compute is)"),
    ]
    report = SimulationReport(setup, rows, notes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_images(out, reference.images, exact.images,
                        {r.method.name: r.images for r in runs[1:]})
    report.write_plot(out)
    if getattr(args, "plot", None):
        report.write_plot(out, Path(args.plot))
    (out / "results.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _validate(args)
    if args.what_if is not None:
        links = _link_specs(args)
        try:
            report = run_what_if(args.what_if, args.gpu, args.ranks, args.parallelism, links[0],
                                 _csv(args.codecs), warmup=args.warmup,
                                 keyframes=_keyframes(args))
        except ValueError as e:
            _fail(str(e))
        if args.json:
            print(json.dumps(report.to_dict(), indent=2))
            return 0
        ranked = best_methods(args.what_if, args.gpu, args.ranks, links[0], _csv(args.codecs),
                              warmup=args.warmup, keyframes=_keyframes(args))
        print("Fastest on this GPU and link: " + ", ".join(
            f"{p}/{m} {t:.1f} s" for p, m, t in ranked[:4]) + "\n")
        print(report.table())
        return 0
    torch.manual_seed(args.seed)
    report = simulate(args, progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    s = report.setup
    print(f"{s['model']}: {s['description']}")
    print(f"{s['ranks']} virtual ranks, {s['parallelism']} parallelism, {s['steps']} steps, "
          f"batch {s['batch']}, warmup {s['warmup']}; exact parallel vs single device: max abs "
          f"diff {s['exact_parallel_vs_single_device_max_abs']:.1e}")
    print(report.table())
    for note in report.notes:
        print(f"* {note}")
    out = Path(args.out)
    print(f"wrote {out / 'images.png'}, {out / 'quality_vs_bytes.png'}, {out / 'results.json'}"
          + (f", {args.plot}" if args.plot else ""))
    return 0
