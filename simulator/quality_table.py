"""The quality table of a trained model: every codec, ``+async``, keyframes, three parallelisms.

``python -m simulator.quality_table --model photos`` runs, on ``--ranks`` virtual ranks and
``--steps`` Euler steps, each row of :func:`default_rows` with
:func:`~simulator.run.run_method` and compares its images and latents with the exact
parallel run (patch parallelism, raw K/V): PSNR, SSIM, relative L2 and the wire bytes all
ranks send per step (:func:`~simulator.metrics.quality`). It adds the two ablations of
:mod:`simulator.testbed` (own patch only, 5-step-stale K/V) and the issue's targets, prints
a Markdown table, and writes an image grid with difference maps (``--grid``).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from compressed_comm import Keyframes

from .metrics import Quality, quality
from .run import RunResult, add_run_arguments, make_methods, run_method
from .testbed import OwnPatchOnly, StaleBy
from .workloads import Workload, make_workload

__all__ = ["RowSpec", "TableRow", "default_rows", "run_table", "markdown", "targets",
           "write_grid", "main"]

#: every codec of the registry, in the form the table runs it
CODECS = ("identity", "fp8", "int8", "int4", "int2", "binary", "lowrank:8", "lowrankq:32",
          "topk:0.05")
ASYNC = ("binary+async", "int2+async", "lowrank:8+async")
#: the ablations of :mod:`simulator.testbed`, run as rows of their own
ABLATIONS = ("own patch only", "5-step-stale K/V")


@dataclass(frozen=True)
class RowSpec:
    """One row: a parallelism, a method (:mod:`simulator.methods`) and keyframes."""

    parallelism: str
    method: str
    keyframes: Keyframes = Keyframes()

    @property
    def keyframe_label(self) -> str:
        k = self.keyframes
        if k == Keyframes():
            return ""
        spread = f", spread {k.spread}" if k.spread > 1 else ""
        period = f"every {k.period}{spread}" if k.period else ""
        return ", ".join(p for p in (k.codec if k.codec != "identity" else "", period) if p)


@dataclass(frozen=True)
class TableRow:
    """One measured row."""

    spec: RowSpec
    bytes_per_step: float
    ratio: float          # raw (patch) bytes per step / this row's
    quality: Quality


def default_rows() -> list[RowSpec]:
    """Patch: raw, DistriFusion, every codec, three ``+async``, lossy and spread keyframes;
    ring and Ulysses: raw, binary, int2; then the two ablations."""
    rows = [RowSpec("patch", m) for m in ("raw", "distrifusion", *CODECS, *ASYNC)]
    rows += [RowSpec("patch", "binary", Keyframes(codec="int8")),
             RowSpec("patch", "int2", Keyframes(codec="int8")),
             RowSpec("patch", "binary", Keyframes(period=5)),
             RowSpec("patch", "binary", Keyframes(period=5, spread=5)),
             RowSpec("patch", "binary", Keyframes(codec="int8", period=5, spread=5))]
    for parallelism in ("ring", "ulysses"):
        rows += [RowSpec(parallelism, m) for m in ("raw", "binary", "int2")]
    rows += [RowSpec("patch", a) for a in ABLATIONS]
    return rows


def _run(workload: Workload, spec: RowSpec, world: int, steps: int) -> RunResult:
    if spec.method in ABLATIONS:
        (raw,) = make_methods("patch", [], distrifusion=False)
        wrap = OwnPatchOnly if spec.method == ABLATIONS[0] else (lambda g: StaleBy(g, 5))
        return run_method(workload, raw, world, steps, wrap_exchange=wrap)
    codecs = [] if spec.method in ("raw", "distrifusion") else [spec.method]
    methods = make_methods(spec.parallelism, codecs, keyframes=spec.keyframes,
                           distrifusion=spec.method == "distrifusion")
    method = next(m for m in methods if m.name == spec.method)
    return run_method(workload, method, world, steps)


def run_table(workload: Workload, rows: list[RowSpec], world: int = 4, steps: int = 20,
              *, progress: bool = False) -> tuple[list[TableRow], dict[str, RunResult]]:
    """Measure every row against the exact parallel run (patch, raw; run first whether or
    not ``rows`` lists it). Returns the rows and every run by its label (:func:`label`)."""
    exact = _run(workload, RowSpec("patch", "raw"), world, steps)
    runs: dict[str, RunResult] = {}
    out = []
    for spec in rows:
        run = exact if spec == RowSpec("patch", "raw") else _run(workload, spec, world, steps)
        runs[label(spec)] = run
        q = quality(run.images, exact.images, run.latents, exact.latents)
        out.append(TableRow(spec, run.total_bytes_per_step,
                            exact.total_bytes_per_step / max(run.total_bytes_per_step, 1e-9), q))
        if progress:
            print(f"{label(spec):40s} {q.psnr_db:6.1f} dB", file=sys.stderr, flush=True)
    runs["exact"] = exact
    return out, runs


def label(spec: RowSpec) -> str:
    """``method`` or ``parallelism method (keyframes)``: a row's name in the grid and logs."""
    name = spec.method if spec.parallelism == "patch" else f"{spec.parallelism} {spec.method}"
    return f"{name} (kf {spec.keyframe_label})" if spec.keyframe_label else name


def markdown(rows: list[TableRow]) -> str:
    """The rows as a Markdown table."""
    lines = ["| parallelism | method | keyframes | wire KB/step | vs raw | PSNR dB | SSIM "
             "| rel. L2 |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        psnr = "inf" if math.isinf(r.quality.psnr_db) else f"{r.quality.psnr_db:.1f}"
        ratio = f"{r.ratio:.1f}x" if r.bytes_per_step else "-"
        lines.append(f"| {r.spec.parallelism} | {r.spec.method} | {r.spec.keyframe_label or '-'} "
                     f"| {r.bytes_per_step / 1e3:,.0f} | {ratio} | {psnr} "
                     f"| {r.quality.ssim:.4f} | {r.quality.rel_l2:.1e} |")
    return "\n".join(lines)


def targets(rows: list[TableRow]) -> list[str]:
    """The issue's targets (PSNR against the exact parallel run, patch), met or not."""
    by = {label(r.spec): r for r in rows}
    need = ("distrifusion", "binary", "int2", "lowrank:8", "binary (kf int8)")
    if any(n not in by for n in need):
        return []
    p = {n: by[n].quality.psnr_db for n in need}
    lr = by["lowrank:8"]
    mark = {True: "met", False: "MISSED"}
    order = p["distrifusion"] < p["binary"] < p["int2"]
    beats = lr.quality.psnr_db > p["distrifusion"]
    return [
        f"DistriFusion < binary < int2: {p['distrifusion']:.1f} < {p['binary']:.1f} < "
        f"{p['int2']:.1f} dB: {mark[order]}",
        f"lowrank:8 at >= 60x fewer bytes than raw beats DistriFusion: {lr.ratio:.1f}x fewer, "
        f"{lr.quality.psnr_db:.1f} vs {p['distrifusion']:.1f} dB: "
        f"{mark[lr.ratio >= 60 and beats]} (beats it: {'yes' if beats else 'no'}; "
        f"60x: {'yes' if lr.ratio >= 60 else 'no'})",
        f"int8 keyframes within 1 dB of identity keyframes (binary): {p['binary (kf int8)']:.1f}"
        f" vs {p['binary']:.1f} dB: {mark[abs(p['binary (kf int8)'] - p['binary']) <= 1]}",
    ]


def write_grid(runs: dict[str, RunResult], columns: list[str], path: Path | str,
               gain: float = 8.0) -> Path:
    """Each sample's image for the exact run and each of ``columns``, and below each its
    absolute difference from the exact image, times ``gain`` (grey, black = equal)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exact = runs["exact"].images
    names = ["exact parallel", *columns]
    images = [exact, *(runs[c].images for c in columns)]
    samples = exact.shape[0]
    fig, axes = plt.subplots(2 * samples, len(names), squeeze=False,
                             figsize=(1.25 * len(names), 2.5 * samples + 0.5))
    for c, (name, imgs) in enumerate(zip(names, images)):
        for s in range(samples):
            diff = ((imgs[s] - exact[s]).abs().mean(-1) * gain).clamp(0, 1)
            axes[2 * s][c].imshow(imgs[s].clamp(0, 1).numpy())
            axes[2 * s + 1][c].imshow(diff.numpy(), cmap="gray", vmin=0, vmax=1)
        axes[0][c].set_title(name, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for s in range(samples):
        axes[2 * s + 1][0].set_ylabel(f"|diff| x{gain:g}", fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return Path(path)


GRID_COLUMNS = ("distrifusion", "binary", "int2", "lowrank:8", "binary+async", "ring binary",
                "ulysses binary", *ABLATIONS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulator.quality_table",
                                     description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--rows", default=None,
                        help="comma-separated patch methods instead of the default rows")
    parser.add_argument("--grid", type=Path, default=Path("photos_grid.png"),
                        help="image grid with difference maps (%(default)s)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    workload = make_workload(args.model, args.batch, args.seed)
    specs = (default_rows() if args.rows is None else
             [RowSpec("patch", m.strip()) for m in args.rows.split(",") if m.strip()])
    rows, runs = run_table(workload, specs, args.ranks, args.steps, progress=True)
    print(f"{workload.description}; {args.ranks} ranks, {args.steps} steps, batch "
          f"{args.batch}, seed {args.seed}; quality against the exact parallel run (patch, raw)")
    print(markdown(rows))
    for line in targets(rows):
        print(f"* {line}")
    columns = [c for c in GRID_COLUMNS if c in runs] or [c for c in runs if c != "exact"][:6]
    print(f"wrote {write_grid(runs, columns, args.grid)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
