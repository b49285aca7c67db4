"""The what-if's report: one row per method, the table, the JSON and the assumptions."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from compressed_comm.group import handshake_nbytes

from ..network import GPU, Link
from .efficiency import Efficiency
from .models import WIRE_DTYPE, ModelSpec
from .traffic import Traffic

__all__ = ["MethodRow", "WhatIfReport", "not_applicable", "general_assumptions"]


@dataclass(frozen=True)
class MethodRow:
    """One method's estimate; the numeric fields are None where the method does not apply."""

    method: str
    applies: bool
    bytes_per_step: int | None      # bytes one rank sends in a steady (post-warmup) step
    ratio: float | None             # raw bytes / wire bytes of one steady-step message
    compute_s: float | None         # per step, codec kernels included
    comm_s: float | None            # all communication of a steady step
    exposed_comm_s: float | None    # the part of it the step waits for
    step_s: float | None            # steady step time
    total_s: float | None           # all steps, warmup included
    speedup: float | None           # raw total_s / this total_s
    held_bytes: int | None = None   # per rank, kept between steps (references, stale K/V)
    codec_s: float | None = None    # of compute_s: encode/decode kernels per step
    warmup_share: float | None = None  # of total_s: warmup, keyframe and spread-slice steps
    max_step_s: float | None = None    # the slowest step of the generation
    fits: bool | None = None        # weights + held bytes within the GPU's memory
    note: str = ""



@dataclass(frozen=True)
class WhatIfReport:
    """Estimates of every method for one model, GPU, link, world and parallelism."""

    model: ModelSpec
    gpu: GPU
    link: Link
    world: int
    parallelism: str
    warmup: int
    traffic: Traffic
    raw_message_bytes: int
    compute_s: float                # per step per rank
    single_gpu_total_s: float       # the whole generation on one GPU, no communication
    rows: tuple[MethodRow, ...]
    assumptions: tuple[str, ...]

    def row(self, method: str) -> MethodRow:
        """The row of ``method``; ``KeyError`` if the report has none."""
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(f"no method {method!r}; have {', '.join(r.method for r in self.rows)}")

    def table(self) -> str:
        """A fixed-width text table: a header naming the setup, one line per method, the
        notes of methods that do not apply, and the assumptions."""
        m, t = self.model, self.traffic
        lines = [
            f"What-if: {m.name} ({m.steps} steps) on {self.world} x {self.gpu.name.upper()} "
            f"over {self.link.name} ({self.link.bandwidth / 1e9:g} GB/s, "
            f"{self.link.latency * 1e6:g} us per message), {self.parallelism} parallelism, "
            f"warmup {self.warmup}",
            f"per rank and step: {t.count} x {t.collective} of {t.shape} bf16 "
            f"({self.raw_message_bytes:,} B raw per message), "
            f"{self.compute_s * self.gpu.achieved_flops / 1e12:.1f} TFLOP -> "
            f"{self.compute_s:.3f} s compute; "
            f"1 GPU: {self.single_gpu_total_s:.1f} s end to end",
        ]
        head = (f"{'method':<18}{'bytes/step/rank':>16}{'ratio':>9}{'compute s':>11}"
                f"{'codec s':>9}"
                f"{'comm s':>9}{'exposed s':>11}{'step s':>9}{'total s':>9}{'speedup':>9}"
                f"{'max s':>8}{'held GB':>9}{'key %':>7}")
        lines += [head, "-" * len(head)]
        notes = []
        for r in self.rows:
            if not r.applies:
                lines.append(f"{r.method:<18}{'n/a':>16}" + "".join(
                    f"{'n/a':>{w}}" for w in (9, 11, 9, 9, 11, 9, 9, 9, 8, 9, 7)))
                notes.append(f"{r.method}: {r.note}")
                continue
            lines.append(
                f"{r.method:<18}{r.bytes_per_step:>16,}{r.ratio:>8.1f}x{r.compute_s:>11.3f}"
                f"{r.codec_s:>9.3f}"
                f"{r.comm_s:>9.3f}{r.exposed_comm_s:>11.3f}{r.step_s:>9.3f}{r.total_s:>9.2f}"
                f"{r.speedup:>8.2f}x{r.max_step_s:>8.3f}{r.held_bytes / 1e9:>8.2f}"
                f"{' ' if r.fits else '!'}{100 * r.warmup_share:>6.0f}%")
            if not r.fits:
                notes.append(f"{r.method}: weights ({self.model.params * 2 / 1e9:.1f} GB "
                             f"bf16) + {r.held_bytes / 1e9:.2f} GB held exceed the "
                             f"{self.gpu.memory_bytes / 2**30:.0f} GiB of one "
                             f"{self.gpu.name.upper()} (activations not counted)")
        if notes:
            lines += ["", "Not applicable or not fitting (!):"] + [f"  {n}" for n in notes]
        lines.append("max s: the slowest step; held GB: references (codecs), stale K/V "
                     "(DistriFusion) or the stage's K/V cache (PipeFusion) one rank keeps "
                     "between steps; key %: the share of total s in warmup, keyframe and "
                     "spread-keyframe steps")
        lines += ["", "Assumptions:"] + [f"  {i}. {a}" for i, a in enumerate(self.assumptions, 1)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-serialisable data."""
        return _plain({
            "model": asdict(self.model),
            "gpu": asdict(self.gpu),
            "link": asdict(self.link),
            "world": self.world,
            "parallelism": self.parallelism,
            "warmup": self.warmup,
            "traffic": {**asdict(self.traffic), "raw_message_bytes": self.raw_message_bytes},
            "compute_s": self.compute_s,
            "single_gpu_total_s": self.single_gpu_total_s,
            "rows": [asdict(r) for r in self.rows],
            "assumptions": self.assumptions,
        })


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def not_applicable(name: str, parallelism: str) -> MethodRow:
    note = (f"does not apply to {parallelism} parallelism: DistriFusion's one-step-stale K/V "
            "overlap is a patch-parallel (all-gather) method")
    if parallelism == "pipefusion":
        note = ("does not apply to pipefusion: PipeFusion is asynchronous by design (its "
                "stages attend to one-step-stale K/V of the other patches)")
    return MethodRow(name, False, None, None, None, None, None, None, None, None, note=note)


def general_assumptions(model: ModelSpec, gpu: GPU, link: Link, world: int,
                         parallelism: str, warmup: int,
                         efficiency: Efficiency) -> tuple[str, ...]:
    weights = model.params * WIRE_DTYPE.itemsize
    fits = "fits" if weights <= gpu.memory_bytes else "does NOT fit"
    out = [
        "compute = FLOPs / (peak bf16 * achieved fraction); FLOPs = linear layers on the "
        "rank's tokens (2*(4+2*mlp_ratio)*hidden^2 per token and layer) + attention from "
        "them to all tokens (4*local*tokens*hidden per layer); norms, modulation, "
        "embeddings, text encoder and VAE not counted",
        f"image tokens split {world} ways (the busiest rank, ceil({model.image_tokens}/"
        f"{world}), sets the pace); text tokens replicated on every rank and never sent",
        f"the split is not ideal (calibrated, simulator.whatif.efficiency): every block "
        f"call costs {efficiency.block_overhead_s * 1e3:g} ms of overhead whatever its "
        "tokens, taken out of the one-GPU step's kernel time; a rank's kernel time is the "
        "one-GPU kernel time x its share of the FLOPs",
        "messages are bf16; a codec's message is exactly "
        "get_codec(spec).payload_nbytes((rows, cols), bfloat16), header included; the ratio "
        "column is raw bytes / that payload",
        "collectives: (world-1) hops of latency + bytes/bandwidth each, bandwidth per "
        "direction per GPU, all ranks sending at once with no further contention; "
        "collectives of a step run one after another",
        "synchronous methods (raw, codecs): the step waits for its communication "
        "(compute + comm); async (distrifusion, +async): step t's exchange runs during "
        f"step t's compute and {efficiency.async_hidden:.0%} of it can hide (calibrated), "
        "no more than the compute; the overlapped exchange is assumed to take no compute or "
        "memory bandwidth from the step",
        f"the control plane (CompressionConfig(handshake=True), the default) exchanges one "
        f"block of {handshake_nbytes(world)} bytes per rank (an all-gather) at the end of every "
        "step, and on a generation's first step one before every compressed collective too; "
        "counted in comm s and exposed even when async; handshake=False removes it",
        f"the first {warmup} step(s) of distrifusion and of every codec are synchronous and "
        f"send the full tensor (codecs: the keyframe codec's payload, header included)",
        f"codec kernels run at the GPU's memory bandwidth ({gpu.memory_bandwidth / 1e9:.0f} "
        "GB/s achieved), moving per message the multiples of its raw bytes in CODEC_PASSES "
        "(binary/int-k: 5 to encode, 2 to decode), serially with compute (codec s, included "
        "in compute s); quality is not modelled: stale or lossy activations cost nothing here",
        f"weights replicated on every rank: {weights / 1e9:.1f} GB bf16 {fits} in "
        f"{gpu.memory_bytes / 1024**3:g} GiB",
    ]
    if parallelism == "ring":
        out.append(f"ring: {efficiency.ring_exposed:.0%} of the hops' time is exposed, the "
                   "rest hides behind the attention of the block in hand (calibrated)")
    if parallelism == "ulysses":
        out.append(f"ulysses: one all-to-all round achieves "
                   f"{efficiency.all_to_all_efficiency:.0%} of the link, its world-1 rounds "
                   "contending (calibrated)")
    if parallelism == "pipefusion":
        out.append(
            f"pipefusion (xDiT): {world} stages of the layers, M = {world} image patches; a "
            "stage's step is one GPU's step / world (each token through its layers once, the "
            "text tokens included), sends overlap the next patch's compute (step = max(stage, "
            f"M messages)); warmup steps run the full image through the stages in sequence; "
            "the pipeline fills once per generation ((world-1)/M stage steps); each of a "
            "stage's blocks is called once per patch, each call with the block overhead "
            "(calibrated); weights are split, not replicated, in reality (the weights line "
            "above overstates its memory)")
    out.append("measured (published): the one-GPU times behind the GPU presets' achieved "
               "fractions, and the figures in simulator.whatif.calibration; calibrated on "
               "the PipeFusion paper's FLUX.1-dev L40 PCIe figure (fit) and checked on "
               "xDiT's FLUX.1-dev H100 and A100 figures: block overhead "
               f"{efficiency.block_overhead_s * 1e3:g} ms, ring exposed "
               f"{efficiency.ring_exposed:.0%}, all-to-all {efficiency.all_to_all_efficiency:.0%}"
               "; assumed: the async hidden share (= ring's), link rates and latencies, codec "
               "kernel times (CODEC_PASSES at the GPU's memory bandwidth, until a GPU run "
               "measures them), the FLOP count")
    out.append(f"GPU {gpu.name}: {gpu.description}")
    out.append(f"link {link.name}: {link.description}")
    return tuple(out)


