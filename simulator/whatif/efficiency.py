"""How far each parallel method falls short of ideal: the what-if's efficiency terms.

Every term is fitted on one published source (the PipeFusion paper's FLUX.1-dev figure on
L40 PCIe GPUs) and checked on others (xDiT's FLUX.1-dev tables and figures on H100 and
A100); :mod:`.calibration` holds the figures and recomputes the fit.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Efficiency", "CALIBRATED", "IDEAL", "split_step_s"]


@dataclass(frozen=True)
class Efficiency:
    """The efficiency terms every method is priced with."""

    #: Seconds each transformer block's forward costs on top of its kernels, whatever its
    #: tokens: eager PyTorch launch and host overhead, which does not shrink when a rank
    #: runs fewer tokens. It is the per-patch kernel loss of PipeFusion (each of a stage's
    #: blocks is called once per patch) and the split-compute loss of patch, ring and
    #: Ulysses (a rank runs every block on 1/world of the tokens). Fitted on PipeFusion's
    #: 2 and 4 L40 points of FLUX.1-dev (calibration.FIT).
    block_overhead_s: float = 0.0
    #: Share of ring attention's K/V passes the step waits for (the rest hides behind the
    #: attention of the block in hand). Fitted on ring's 2 and 4 L40 points.
    ring_exposed: float = 1.0
    #: Share of the link's bandwidth one round of an all-to-all (Ulysses) achieves, its
    #: ``world - 1`` pairwise rounds contending for the same switch (each round runs at
    #: this share / (world - 1)): in the fit source Ulysses slows from 2 to 4 GPUs while
    #: ring, which moves more bytes, speeds up. Fitted on Ulysses' 2 and 4 L40 points.
    all_to_all_efficiency: float = 1.0
    #: Exponent of that contention: an all-to-all's data takes ``(world - 1) **
    #: contention / all_to_all_efficiency`` times its alpha-beta time (0: rounds in
    #: parallel, the ideal; 1: rounds serialised on a shared switch, assumed).
    all_to_all_contention: float = 0.0
    #: Share of a one-step-stale exchange (DistriFusion, ``+async``) that really hides
    #: behind the step's compute. Assumed equal to ring's hidden share: the PipeFusion
    #: paper's PixArt figure on L40 PCIe shows DistriFusion and ring attention, which move
    #: the same K/V bytes, within 2-20 % of each other at 2 to 8 GPUs.
    async_hidden: float = 1.0


#: Ideal methods: no overhead, every overlap complete (the what-if before calibration).
IDEAL = Efficiency()

#: The shipped terms, as :func:`.calibration.fit` recomputes them from calibration.FIT.
CALIBRATED = Efficiency(
    block_overhead_s=1.6e-3,
    ring_exposed=0.45,
    all_to_all_efficiency=0.54,
    all_to_all_contention=1.0,
    async_hidden=0.55,
)


def split_step_s(single_step_s: float, layers: int, work_share: float, calls: float,
                 efficiency: Efficiency) -> float:
    """Seconds of one rank's step: the one-GPU step's kernel time scaled by the rank's
    share of the FLOPs (``work_share``), plus the block overhead of its ``calls`` block
    calls. The one-GPU step (``layers`` calls) keeps its measured total: its overhead
    comes out of its kernel time, never below zero."""
    overhead = min(layers * efficiency.block_overhead_s, single_step_s)
    per_call = overhead / layers
    return (single_step_s - overhead) * work_share + calls * per_call
