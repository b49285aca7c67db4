"""The simulator's predicted step time next to ``bench/e2e.py``'s measured one: same model,
ranks, parallelism, methods and link.

    python bench/sim_vs_e2e.py [--rates 100mbit,200mbit,1gbit] [--world 2] [--steps 6]
        [--tokens 1024] [--heads 8] [--head-dim 48] [--codecs binary,binary+async]
        [--judge raw,distrifusion,binary] [--json sim_vs_e2e.json]

For every rate, ``bench/e2e.py`` runs patch parallelism (raw, DistriFusion and every codec)
on ``--world`` gloo processes behind a link shaped to that rate (needs root). The default of
2 processes gives each its own core of this 2-core machine, as each rank has its own GPU in
the settings the simulator models (with more processes than cores the ranks also wait for
each other's time slices, which no GPU setting has). The simulator then predicts each method's seconds
per step with the functions ``python -m simulator`` uses:

* bytes and messages of the busiest rank per step: its own run of the same model on
  ``--world`` virtual ranks (:func:`simulator.run.run_method`);
* link: the rate shared by the ranks (``rate / world`` per rank: one token bucket carries
  all of their traffic, see ``bench/shaped_link.py``) and the seconds per hop e2e measured
  with 4-byte all_gathers. Rates above what loopback carries on this machine (about
  1 Gbit/s between processes on 2 busy cores) measure the machine, not the link;
* compute: the single-device step measured here (one thread) divided by the ranks that run
  at once, ``min(world, cores)``: ``W`` processes on ``C < W`` cores get ``C / W`` of a core
  each, so they take ``single / C``, not ``single / W``;
* codec: :func:`simulator.run.codec_seconds` (one thread, rank 0's streams), times
  ``W / min(W, C)`` for the same reason.

It prints measured and predicted seconds per step after the first step, the error, and
with ``--judge raw,distrifusion,binary``, whether those methods' predictions are within
``--tolerance`` (default 25%) of their measurements, exiting 1 if not (without ``--judge``
it only reports: timings on a loaded machine vary). The other rows (``+async``) are left
unjudged: their transfers and decodes run beside compute on the same
two cores here, a contention the simulator does not model (GPUs copy with their own
engines). ``--json`` writes the same.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from results import E2EResult  # bench/ is this script's folder

from simulator.methods import parse_methods
from simulator.network import Link, parse_link
from simulator.run import codec_seconds, make_methods, run_method, run_reference, step_seconds
from simulator.workloads import flux_workload

E2E = Path(__file__).resolve().parent / "e2e.py"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def measure(args: argparse.Namespace, rate: str) -> E2EResult:
    """``bench/e2e.py``'s result for patch parallelism behind ``rate``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "e2e.json"
        cmd = [sys.executable, str(E2E), "--world", str(args.world), "--steps", str(args.steps),
               "--tokens", str(args.tokens), "--heads", str(args.heads), "--head-dim",
               str(args.head_dim), "--parallelisms", "patch", "--codecs", ",".join(args.codecs),
               "--rate", rate, "--json", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
            sys.exit(done.returncode)
        return E2EResult.read(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=_csv, default=["100mbit", "200mbit", "1gbit"],
                   help="link rates to shape loopback to, as tc reads them "
                        "(default: 100mbit,200mbit,1gbit)")
    p.add_argument("--world", type=int, default=2, help="gloo processes and virtual ranks")
    p.add_argument("--steps", type=int, default=6, help="denoising steps per run")
    p.add_argument("--tokens", type=int, default=1024, help="image tokens of the Flux model")
    p.add_argument("--heads", type=int, default=8, help="attention heads of the Flux model")
    p.add_argument("--head-dim", type=int, default=48, help="width of one attention head")
    p.add_argument("--codecs", type=_csv, default=["binary", "binary+async"],
                   help="methods beside raw and distrifusion (default: binary,binary+async)")
    p.add_argument("--tolerance", type=float, default=0.25,
                   help="largest relative error of a judged prediction (default: 0.25)")
    p.add_argument("--judge", type=_csv, default=[],
                   help="methods whose predictions must be within --tolerance, e.g. "
                        "raw,distrifusion,binary: exit 1 if one is not (default: report only)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    for rate in args.rates:
        parse_link(rate)  # a rate the simulator reads as tc does: fail before any run
    try:
        args.codecs = [m.name for m in parse_methods(args.codecs)]
        args.judge = [m.name for m in parse_methods(args.judge)]
    except ValueError as e:
        p.error(str(e))
    methods = [m.name for m in make_methods("patch", args.codecs)]
    if not set(args.judge) <= set(methods):
        p.error(f"--judge {sorted(set(args.judge) - set(methods))}: not among the methods "
                f"run ({', '.join(methods)})")

    cores = len(os.sched_getaffinity(0))
    share = args.world / min(args.world, cores)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    workload = flux_workload(1, 0, tokens=args.tokens, heads=args.heads, head_dim=args.head_dim)
    single = run_reference(workload, args.steps).step_seconds
    runs = {m.name: run_method(workload, m, args.world, args.steps)
            for m in make_methods("patch", args.codecs)}
    codec = {name: codec_seconds(run.stats, run.method.config.compression)
             for name, run in runs.items()}
    print(f"simulator: {args.world} virtual ranks, single-device step {single:.3f} s (one "
          f"thread), {cores} cores -> compute {single / min(args.world, cores):.3f} s per rank "
          f"and step, codec time x{share:.1f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    rows: list[dict[str, Any]] = []
    print(f"{'rate':<9} {'method':<14} {'measured':>9} {'predicted':>10} {'error':>7} "
          f"{'codec s':>8} {'bytes/step (sim / e2e)':>26}")
    for rate in args.rates:
        measured = measure(args, rate)
        link = Link(f"{rate} shared by {args.world}", "tbf-shaped loopback",
                    bandwidth=parse_link(rate).bandwidth / args.world,
                    latency=measured.latency_s)
        print(f"{rate}: {link.bandwidth / 1e6:.2f} MB/s per rank (the rate shared by "
              f"{args.world}), {link.latency * 1e6:.0f} us per hop (measured)", flush=True)
        for r in measured.rows:
            if r.parallelism != "patch":
                continue
            run = runs[r.method]
            codec_s = codec[r.method] * share
            predicted = step_seconds(run, single / min(args.world, cores) + codec_s, link,
                                     after=1)[0]
            sim_bytes = max(sum(b[1:]) / (run.steps - 1) for b in run.bytes_per_step)
            error = predicted / r.seconds - 1
            rows.append({"rate": rate, "method": r.method, "measured_s": r.seconds,
                         "predicted_s": predicted, "error": error, "codec_s": codec_s,
                         "bytes_per_step_sim": sim_bytes,
                         "bytes_per_step_e2e": r.bytes_per_step,
                         "link_bytes_per_s": link.bandwidth,
                         "link_latency_s": link.latency})
            mark = " (not judged)" if args.judge and r.method not in args.judge else ""
            print(f"{rate:<9} {r.method:<14} {r.seconds:>9.3f} {predicted:>10.3f} "
                  f"{100 * error:>+6.1f}% {codec_s:>8.3f} "
                  f"{sim_bytes:>12,.0f} / {r.bytes_per_step:>11,.0f}{mark}", flush=True)
    judged = [row for row in rows if row["method"] in args.judge]
    ok = True
    if judged:
        worst = max(judged, key=lambda row: abs(row["error"]))
        ok = abs(worst["error"]) <= args.tolerance
        print(f"{', '.join(args.judge)}: {'all' if ok else 'NOT all'} predictions within "
              f"+-{100 * args.tolerance:.0f}% (worst: {worst['method']} at {worst['rate']}, "
              f"{100 * worst['error']:+.1f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "cores": cores, "single_s": single, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
