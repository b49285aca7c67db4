"""Published measurements of parallel DiT inference, the what-if's estimate of each, and
the fit of the efficiency terms (:mod:`.efficiency`) on one source.

:data:`FIT` (the PipeFusion paper's FLUX.1-dev figure on L40 PCIe GPUs) sets the terms;
:data:`CHECK` (xDiT's FLUX.1-dev table on H100 and figure on A100, both NVLink) stays out
of the fit and only tests it. :func:`fit` recomputes the terms from :data:`FIT`;
:func:`compare` sets each figure beside the what-if's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from ..network import GB, GIB, GPU, LINKS, TFLOPS, Link
from .efficiency import CALIBRATED, IDEAL, Efficiency
from .models import MODEL_SPECS, ModelSpec
from .pricing import run_what_if

__all__ = ["Published", "FIT", "CHECK", "XDIT_FLUX", "L40", "NVLINK3", "speedup", "compare",
           "fit", "sources_table"]

_PAPER = ("arXiv 2405.14430v4 (PipeFusion), figure 'Flux.1-dev Latency on 2x8xL40 "
          "(1024px)', 28 steps, PyTorch; as published in xdit-project/xdit_assets "
          "performance/scalability/Flux-16L40-crop.png")
_H100 = ("xdit-project/xDiT docs/performance/flux.md, table 'Scalability of Flux.1 Dev', "
         "4xH100, PyTorch column (commit 175e0bf)")
_A100 = ("xdit-project/xDiT docs/performance/flux.md, figure 'Flux.1-dev Latency on 8xA100 "
         "(1024px)' (xdit_assets performance/scalability/Flux-A100-crop.png)")
_READ = "; read off the plot (+-0.2 s)"
_LABEL = "; printed on the plot"


@dataclass(frozen=True)
class Published:
    """One published latency of a parallel run and the one-GPU latency it is set against."""

    source: str         # document, table or figure, and how the number was read
    model: str          # the what-if workload (:data:`XDIT_FLUX`)
    gpu: str            # GPU preset, or "l40" (:data:`L40`)
    link: str           # link preset, or "nvlink3" (:data:`NVLINK3`)
    world: int
    method: str         # parallelism as the what-if names it: pipefusion, ring, ulysses
    latency_s: float    # end to end, this many GPUs
    single_s: float     # end to end, one GPU, same source

    @property
    def speedup(self) -> float:
        """One-GPU latency / this latency."""
        return self.single_s / self.latency_s


#: FLUX.1-dev as xDiT runs it: the 512 text tokens are split across ranks with the image
#: tokens (xDiT's USP and PipeFusion shard the joint sequence), so they count as split
#: tokens here; otherwise :data:`~.models.MODEL_SPECS` ``flux.1-dev``.
XDIT_FLUX = replace(MODEL_SPECS["flux.1-dev"], name="flux.1-dev (xDiT)",
                    image_tokens=4096 + 512, text_tokens=0)

#: NVIDIA L40 (the fit source's GPU): 181.05 TFLOPS dense fp16 (xDiT
#: docs/performance/hunyuandit.md), 48 GB GDDR6 at 864 GB/s. Achieved fraction: one
#: L40 runs FLUX.1-dev in 18.36 s (the fit source), which this model's FLOP count reaches
#: at 0.63 of peak.
L40 = GPU("l40", peak_bf16_flops=181.05 * TFLOPS, achieved_fraction=0.63,
          memory_bytes=48 * GIB, description="NVIDIA L40 PCIe, 48 GB (calibration only)",
          memory_bandwidth=0.864e12 * 0.8)

#: A100 SXM NVLink 3 through NVSwitch: 300 GB/s per direction nominal; 240 GB/s assumed
#: achieved (the same 80 % NCCL reaches on NVLink 4).
NVLINK3 = Link("nvlink3", "A100 NVLink 3 through NVSwitch (calibration only)",
               bandwidth=240 * GB, latency=3e-6)

_GPUS = {"l40": L40}
_LINKS = {"nvlink3": NVLINK3}


def _flux(source: str, gpu: str, link: str, world: int, method: str, latency: float,
          single: float) -> Published:
    return Published(source, "flux.1-dev (xDiT)", gpu, link, world, method, latency, single)


#: The fit set: one source, FLUX.1-dev at 1024 px on L40 PCIe GPUs (pcie4: 4 GPUs on one
#: socket's PCIe 4.0 switch with peer-to-peer). PipeFusion's points lie under the
#: 'hybrid' line, whose labels are printed.
FIT: tuple[Published, ...] = (
    _flux(_PAPER + _LABEL, "l40", "pcie4", 2, "pipefusion", 11.03, 18.36),
    _flux(_PAPER + _LABEL, "l40", "pcie4", 4, "pipefusion", 7.05, 18.36),
    _flux(_PAPER + _READ, "l40", "pcie4", 2, "ring", 11.3, 18.36),
    _flux(_PAPER + _READ, "l40", "pcie4", 4, "ring", 7.9, 18.36),
    _flux(_PAPER + _READ, "l40", "pcie4", 2, "ulysses", 12.2, 18.36),
    _flux(_PAPER + _READ, "l40", "pcie4", 4, "ulysses", 16.8, 18.36),
)

#: The check set: other sources, other GPUs and links, never fitted.
CHECK: tuple[Published, ...] = (
    _flux(_H100, "h100", "nvlink4", 2, "ulysses", 4.38, 6.71),
    _flux(_H100, "h100", "nvlink4", 2, "ring", 5.31, 6.71),
    _flux(_H100, "h100", "nvlink4", 4, "ulysses", 4.24, 6.71),
    _flux(_H100, "h100", "nvlink4", 4, "ring", 5.11, 6.71),
    _flux(_A100 + _LABEL, "a100", "nvlink3", 4, "ulysses", 5.55, 12.77),
    _flux(_A100 + _READ, "a100", "nvlink3", 4, "ring", 5.9, 12.77),
    _flux(_A100 + _READ, "a100", "nvlink3", 4, "pipefusion", 6.3, 12.77),
)


def _spec(figure: Published) -> ModelSpec:
    return XDIT_FLUX if figure.model == XDIT_FLUX.name else MODEL_SPECS[figure.model]


def _gpu(figure: Published, single_s: float) -> GPU:
    """The figure's GPU with its achieved fraction set so that one GPU takes the source's
    own one-GPU latency (every speedup is then against the source's baseline)."""
    from ..network import get_gpu
    gpu = _GPUS.get(figure.gpu) or get_gpu(figure.gpu)
    ideal = run_what_if(_spec(figure), gpu, 1, "patch", "pcie4", ()).single_gpu_total_s
    return replace(gpu, achieved_fraction=gpu.achieved_fraction * ideal / single_s)


def speedup(figure: Published, efficiency: Efficiency = CALIBRATED) -> float:
    """The what-if's speedup of ``figure``'s run (raw method, xDiT's warmup of 1 step)."""
    link = _LINKS.get(figure.link) or LINKS[figure.link]
    report = run_what_if(_spec(figure), _gpu(figure, figure.single_s), figure.world,
                         figure.method, link, (), efficiency=efficiency)
    return report.single_gpu_total_s / report.row("raw").total_s


def compare(figures: Sequence[Published],
            efficiency: Efficiency = CALIBRATED) -> list[tuple[Published, float]]:
    """``(figure, the what-if's speedup)`` for each of ``figures``."""
    return [(f, speedup(f, efficiency)) for f in figures]


def _log_error(figures: Sequence[Published], efficiency: Efficiency) -> float:
    return sum(math.log(s / f.speedup) ** 2 for f, s in compare(figures, efficiency))


def _best(values: Sequence[float], make: Callable[[float], Efficiency],
          figures: Sequence[Published]) -> float:
    return min(values, key=lambda v: _log_error(figures, make(v)))


def fit(figures: Sequence[Published] = FIT) -> Efficiency:
    """The efficiency terms that best match ``figures`` (least squares of log speedup),
    one term at a time on the figures it governs, on a grid of round values: the block
    overhead on PipeFusion's (its K/V never cross the link: compute alone), then ring's
    exposed share on ring's, then the all-to-all efficiency on Ulysses' (its contention
    assumed serial). The async hidden share follows ring's (:class:`.Efficiency`)."""
    def of(method: str) -> list[Published]:
        return [f for f in figures if f.method == method]

    overhead = _best([i * 1e-4 for i in range(0, 41)],
                     lambda v: replace(IDEAL, block_overhead_s=v), of("pipefusion"))
    eff = replace(IDEAL, block_overhead_s=overhead, all_to_all_contention=1.0)
    exposed = _best([i / 20 for i in range(0, 21)],
                    lambda v: replace(eff, ring_exposed=v), of("ring"))
    eff = replace(eff, ring_exposed=exposed)
    a2a = _best([i / 100 for i in range(5, 101)],
                lambda v: replace(eff, all_to_all_efficiency=v), of("ulysses"))
    return replace(eff, all_to_all_efficiency=a2a, async_hidden=1.0 - exposed)


def sources_table(efficiency: Efficiency = CALIBRATED) -> str:
    """Every published figure beside the what-if's, before (ideal) and after calibration."""
    lines = [f"{'set':<6}{'gpu':<6}{'link':<9}{'world':>6} {'method':<11}{'1 GPU s':>8}"
             f"{'published s':>12}{'speedup':>8}{'ideal':>8}{'calibr.':>8}{'ratio':>7}  source"]
    for name, figures in (("fit", FIT), ("check", CHECK)):
        for f in figures:
            ideal, calibrated = speedup(f, IDEAL), speedup(f, efficiency)
            lines.append(f"{name:<6}{f.gpu:<6}{f.link:<9}{f.world:>6} {f.method:<11}"
                         f"{f.single_s:>8.2f}{f.latency_s:>12.2f}{f.speedup:>7.2f}x"
                         f"{ideal:>7.2f}x{calibrated:>7.2f}x{calibrated / f.speedup:>7.2f}"
                         f"  {f.source}")
    return "\n".join(lines)
