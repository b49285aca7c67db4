"""Classifier-free guidance as two transformer calls per step, against batched, on the
trained photos model: ``python -m simulator.guidance``.

A pipeline runs guidance either batched (the conditional and the unconditional sequence in
one call of twice the batch) or as two calls per step. Two calls must not share residual
streams: the unconditional call would be coded against the conditional call's reference.
:meth:`adapters.dit.DiTParallel.tag` gives each call its own streams. Three ways are
compared, each with patch parallelism on ``world`` virtual ranks and each codec:

* ``batched`` -- one call per step on ``[cond, uncond]``;
* ``two calls`` -- tagged ``"cond"`` and ``"uncond"``: streams of their own;
* ``two calls, shared streams`` -- untagged: both calls run through the same streams (each
  call is taken for a step of its own), what an unaware pipeline would do.

Every run is compared with the exact parallel run (raw, batched) by PSNR, SSIM and relative
L2 of the guided images; the guided velocity is ``u + scale * (c - u)``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapters.dit import parallelize
from compressed_comm.testing import run_ranks

from .digits import flow_sample
from .metrics import Quality, quality
from .photos import CHANNELS, NULL_LABEL, NUM_CLASSES, TOKENS, load_photos_model, to_images
from .run import ParallelMethod, add_run_arguments, make_methods

__all__ = ["MODES", "SCALE", "GuidedWorkload", "GuidedRun", "photos_guided", "guided_run",
           "guidance_table", "main"]

MODES = ("batched", "two calls", "two calls, shared streams")
#: the default guidance scale
SCALE = 3.0


@dataclass
class GuidedWorkload:
    """A label-conditioned transformer, its noise, and the kwargs of both branches."""

    transformer: torch.nn.Module
    noise: torch.Tensor                    # (B, tokens, channels)
    cond: dict[str, torch.Tensor]          # per-sample kwargs of the conditional branch
    uncond: dict[str, torch.Tensor]        # ... of the unconditional (null label) branch
    shared: dict[str, torch.Tensor]        # kwargs without a batch dimension (RoPE ids)
    scale: float

    def velocity(self, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                 branch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One transformer call on ``x`` with ``branch``'s conditioning."""
        return model(hidden_states=x, timestep=t, **branch, **self.shared, return_dict=False)[0]


def photos_guided(batch: int = 4, seed: int = 0, scale: float = SCALE) -> GuidedWorkload:
    """The trained photos model guided towards labels ``0, 1, ...`` away from its null
    label, from seeded noise."""
    model = load_photos_model()
    labels = torch.arange(batch) % NUM_CLASSES
    cond, uncond = model.condition(labels), model.condition(torch.full((batch,), NULL_LABEL))
    shared = {k: cond.pop(k) for k in ("img_ids", "txt_ids")}
    for k in shared:
        uncond.pop(k)
    noise = torch.randn(batch, TOKENS, CHANNELS, generator=torch.Generator().manual_seed(seed))
    return GuidedWorkload(model.transformer, noise, cond, uncond, shared, scale)


@dataclass
class GuidedRun:
    """One guided generation: rank 0's final latents and its images (B, H, W, 3) in [0, 1],
    and the bytes all ranks sent per denoising step (mean)."""

    latents: torch.Tensor
    images: torch.Tensor
    bytes_per_step: float


def guided_run(work: GuidedWorkload, mode: str, method: ParallelMethod, world: int = 4,
               steps: int = 20, timeout: float = 600.0) -> GuidedRun:
    """Guided sampling with ``method`` on ``world`` virtual ranks, guidance run as ``mode``
    (one of :data:`MODES`); every rank must end with the same latents."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    both = {k: torch.cat([work.cond[k], work.uncond[k]]) for k in work.cond}

    def body(transport):
        torch.set_num_threads(1)
        model = copy.deepcopy(work.transformer)
        par = parallelize(model, transport, method.config)

        def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if mode == "batched":
                c, u = work.velocity(model, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
            elif mode == "two calls":
                with par.tag("cond"):
                    c = work.velocity(model, x, t, work.cond)
                with par.tag("uncond"):
                    u = work.velocity(model, x, t, work.uncond)
            else:
                c = work.velocity(model, x, t, work.cond)
                u = work.velocity(model, x, t, work.uncond)
            return u + work.scale * (c - u)

        latents = flow_sample(forward, work.noise, steps)
        par.finish()
        return latents, par.exchange.bytes_sent

    threads = torch.get_num_threads()
    try:
        results = run_ranks(world, body, timeout=timeout)
    finally:
        torch.set_num_threads(threads)
    latents = results[0][0]
    for r, (other, _) in enumerate(results[1:], start=1):
        if not torch.equal(other, latents):
            raise AssertionError(f"{method.name}, {mode}: rank {r} ended with other latents "
                                 f"than rank 0")
    return GuidedRun(latents, to_images(latents), sum(b for _, b in results) / steps)


@dataclass(frozen=True)
class GuidanceRow:
    """One line of :func:`guidance_table`."""

    method: str
    mode: str
    bytes_per_step: float
    quality: Quality


def guidance_table(work: GuidedWorkload, codecs: Sequence[str], world: int = 4,
                   steps: int = 20, *, progress: bool = False
                   ) -> tuple[list[GuidanceRow], Quality]:
    """Every codec in every mode against the exact parallel run (patch, raw, batched); also
    the exact run with guidance off (the conditional branch alone) against it, which says
    how much the unconditional branch changes the output."""
    methods = {m.name: m for m in make_methods("patch", codecs, distrifusion=False)}
    exact = guided_run(work, "batched", methods["raw"], world, steps)
    unguided = guided_run(dataclasses.replace(work, scale=1.0), "batched",
                          methods["raw"], world, steps)
    rows = []
    for name, method in methods.items():
        for mode in MODES if name != "raw" else MODES[1:2]:
            run = guided_run(work, mode, method, world, steps)
            q = quality(run.images, exact.images, run.latents, exact.latents)
            rows.append(GuidanceRow(name, mode, run.bytes_per_step, q))
            if progress:
                print(f"{name:10s} {mode:28s} {q.psnr_db:6.1f} dB", file=sys.stderr,
                      flush=True)
    return rows, quality(unguided.images, exact.images, unguided.latents, exact.latents)


def markdown(rows: Sequence[GuidanceRow]) -> str:
    """The rows as a Markdown table."""
    lines = ["| method | guidance | wire KB/step | PSNR dB | SSIM | rel. L2 |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        psnr = "inf" if math.isinf(r.quality.psnr_db) else f"{r.quality.psnr_db:.1f}"
        lines.append(f"| {r.method} | {r.mode} | {r.bytes_per_step / 1e3:,.0f} | {psnr} "
                     f"| {r.quality.ssim:.4f} | {r.quality.rel_l2:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulator.guidance",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", default="binary,int2",
                        help="comma-separated codecs to compare (%(default)s)")
    add_run_arguments(parser, model=None, batch=4)  # the photos model: it has a null label
    parser.add_argument("--scale", type=float, default=SCALE,
                        help="guidance scale (%(default)s)")
    args = parser.parse_args(argv)

    work = photos_guided(args.batch, args.seed, args.scale)
    rows, unguided = guidance_table(work, [c for c in args.codecs.split(",") if c],
                                    args.ranks, args.steps, progress=True)
    print(f"photos model, {args.batch} images, {args.ranks} ranks, patch, {args.steps} steps, "
          f"guidance scale {args.scale:g}; PSNR against the exact parallel run (raw, batched)\n")
    print(markdown(rows))
    print(f"\nguidance off (conditional branch alone) against guided: "
          f"{unguided.psnr_db:.1f} dB PSNR, SSIM {unguided.ssim:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
