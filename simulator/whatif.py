"""What-if estimates: parallel DiT inference on GPUs and links this machine does not have.

:func:`run_what_if` prices one denoising step of a published DiT (:data:`MODEL_SPECS`) on
``world`` GPUs (:data:`~simulator.network.GPUS`) joined by a link
(:data:`~simulator.network.LINKS`) for each communication method: raw synchronous
exchange, DistriFusion's asynchronous stale K/V, and residual compression with each codec.
Compute comes from a FLOP count and the GPU's achieved throughput, communication from the
exact wire size of every message (``Codec.payload_nbytes`` at the real message shape) and
the link's alpha-beta model. The report lists every assumption it rests on.

Speed only: reconstruction quality of a codec or of stale activations is not modelled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import torch

from compressed_comm import CompressionConfig, StreamEncoder, get_codec
from compressed_comm.group import handshake_nbytes

from .network import (GPU, Link, StepEstimate, choose, collective_seconds, estimate_step, get_gpu,
                      get_link)

__all__ = [
    "ModelSpec",
    "MODEL_SPECS",
    "PARALLELISMS",
    "get_model",
    "local_image_tokens",
    "step_flops",
    "compute_seconds",
    "Traffic",
    "step_traffic",
    "MethodRow",
    "WhatIfReport",
    "run_what_if",
]

#: Parallelisms priced here and the collective each one runs per exchange.
PARALLELISMS: Mapping[str, str] = MappingProxyType(
    {"patch": "all_gather", "ring": "ring", "ulysses": "all_to_all", "pipefusion": "p2p"}
)
WIRE_DTYPE = torch.bfloat16
_ASYNC = "+async"
#: Device-memory traffic of a codec in units of one raw message: (encode, decode), for
#: residual order 1 with the fused kernels. Encode reads the tensor and the reference for
#: the scale pass and again for the quantise pass and writes the reference (5); decode
#: reads the reference and writes it back (2; the payload is small). Low-rank's subspace
#: step reads the residual twice more (7); the identity keyframe copies (3, 2).
CODEC_PASSES: Mapping[str, tuple[int, int]] = MappingProxyType({
    "identity": (3, 2), "fp8": (3, 2), "int8": (5, 2), "int4": (5, 2), "int2": (5, 2),
    "binary": (5, 2), "lowrank": (7, 2), "lowrankq": (7, 2), "topk": (6, 2)})


@dataclass(frozen=True)
class ModelSpec:
    """The published configuration of a DiT and one generation's workload."""

    name: str
    description: str
    steps: int              # denoising steps of one generation
    layers: int             # attention layers; each one's K and V are exchanged
    hidden: int             # model width (= heads * head_dim, checked)
    heads: int
    head_dim: int
    mlp_ratio: float        # MLP hidden width / model width
    image_tokens: int       # image/video tokens: split across ranks
    text_tokens: int        # text tokens: replicated on every rank, never sent
    batch: int              # sequences per forward pass (2 = CFG cond + uncond batched)
    params: float           # transformer parameters
    sources: tuple[str, ...]
    assumptions: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.heads * self.head_dim != self.hidden:
            raise ValueError(f"{self.name}: heads * head_dim = {self.heads * self.head_dim} "
                             f"!= hidden {self.hidden}")

    @property
    def tokens(self) -> int:
        """Sequence length attention runs over: image and text tokens."""
        return self.image_tokens + self.text_tokens


MODEL_SPECS: Mapping[str, ModelSpec] = MappingProxyType({
    # FLUX.1-dev. Sources: black-forest-labs/FLUX.1-dev transformer/config.json, identical
    # to diffusers 0.42 FluxTransformer2DModel defaults (num_layers=19,
    # num_single_layers=38, num_attention_heads=24, attention_head_dim=128) and to BFL's
    # flux-dev params (hidden_size 3072, mlp_ratio 4.0, depth 19, depth_single_blocks 38);
    # FluxPipeline defaults: num_inference_steps=28, max_sequence_length=512,
    # default_sample_size 128 (x VAE factor 8 = 1024 px), latents packed in 2x2 patches:
    # (1024/8/2)^2 = 4096 image tokens. 11.90e9 parameters counted from the diffusers
    # model on the meta device (model card: "12 billion parameter").
    "flux.1-dev": ModelSpec(
        name="flux.1-dev",
        description="FLUX.1-dev, 1024x1024, 28 steps: 19 double-stream + 38 single-stream "
                    "blocks, hidden 3072, 24 heads x 128",
        steps=28,
        layers=19 + 38,
        hidden=3072,
        heads=24,
        head_dim=128,
        mlp_ratio=4.0,
        image_tokens=(1024 // 8 // 2) ** 2,
        text_tokens=512,
        batch=1,
        params=11.9e9,
        sources=(
            "huggingface.co/black-forest-labs/FLUX.1-dev transformer/config.json "
            "(= diffusers 0.42 FluxTransformer2DModel defaults)",
            "diffusers 0.42 FluxPipeline defaults: 28 steps, 512 text tokens, 1024 px",
        ),
        assumptions=(
            "FLUX.1-dev is guidance-distilled: one sequence per step (no CFG batch)",
            "every block costs 12*hidden^2 MACs per token (double-stream: separate "
            "image/text weights, each token through one set; single-stream: fused "
            "QKV+MLP-in 7h, out 5h)",
            "all 512 T5 text tokens present (max_sequence_length=512, padded)",
        ),
    ),
    # CogVideoX-2b. Sources: THUDM/CogVideoX-2b transformer/config.json, identical to
    # diffusers 0.42 CogVideoXTransformer3DModel defaults (num_layers=30,
    # num_attention_heads=30, attention_head_dim=64, sample_frames=49, sample_height=60,
    # sample_width=90, patch_size=2, temporal_compression_ratio=4,
    # max_text_seq_length=226, FeedForward mult 4); CogVideoXPipeline defaults: 50 steps,
    # guidance_scale=6 (CFG), 480x720 (60x90 latent x 8), 49 frames -> (49-1)/4+1 = 13
    # latent frames; 13 * 30 * 45 = 17550 video tokens. Model card: 720x480, 6 s at 8 fps,
    # 226-token prompts; one A100 ~90 s, one H100 ~45 s per video. 1.69e9 parameters
    # counted from the diffusers model on the meta device.
    "cogvideox-2b": ModelSpec(
        name="cogvideox-2b",
        description="CogVideoX-2b, 49 frames at 480x720, 50 steps: 30 layers, hidden 1920, "
                    "30 heads x 64",
        steps=50,
        layers=30,
        hidden=1920,
        heads=30,
        head_dim=64,
        mlp_ratio=4.0,
        image_tokens=((49 - 1) // 4 + 1) * (480 // 8 // 2) * (720 // 8 // 2),
        text_tokens=226,
        batch=2,
        params=1.69e9,
        sources=(
            "huggingface.co/THUDM/CogVideoX-2b transformer/config.json "
            "(= diffusers 0.42 CogVideoXTransformer3DModel defaults)",
            "diffusers 0.42 CogVideoXPipeline defaults: 50 steps, guidance_scale 6, "
            "226 text tokens; CogVideoX-2b model card",
        ),
        assumptions=(
            "classifier-free guidance (scale 6) batches the conditional and unconditional "
            "sequences on every rank: batch 2 doubles compute and messages (no CFG "
            "parallelism)",
            "full 3D attention over 226 text + 17550 video tokens in all 30 layers",
        ),
    ),
})


def get_model(name: str) -> ModelSpec:
    """The :data:`MODEL_SPECS` preset ``name``; ``ValueError`` listing the choices if unknown."""
    return choose(MODEL_SPECS, name, "model")


def _check_world(model: ModelSpec, world: int) -> None:
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive integer, got {world!r}")
    if world > model.image_tokens:
        raise ValueError(f"world {world} exceeds the {model.image_tokens} image tokens of "
                         f"{model.name}")


def local_image_tokens(model: ModelSpec, world: int) -> int:
    """Image tokens on the busiest rank when they are split ``world`` ways."""
    _check_world(model, world)
    return math.ceil(model.image_tokens / world)


def step_flops(model: ModelSpec, world: int) -> float:
    """FLOPs of one denoising step on the busiest rank of ``world``.

    Linear layers run on the rank's tokens (its share of the image tokens plus all text
    tokens): ``2 * (4 + 2 * mlp_ratio) * hidden^2`` FLOPs per token and layer (Q, K, V,
    output projections and the MLP). Attention runs from those tokens to all tokens:
    ``4 * local * tokens * heads * head_dim`` per layer (``QK^T`` and ``PV``). Norms,
    modulation, embeddings, text encoder and VAE are not counted.
    """
    local = model.batch * (local_image_tokens(model, world) + model.text_tokens)
    linear = 2 * (4 + 2 * model.mlp_ratio) * model.hidden**2 * local
    attention = 4 * local * model.tokens * model.heads * model.head_dim
    return model.layers * (linear + attention)


def compute_seconds(model: ModelSpec, gpu: GPU, world: int) -> float:
    """Seconds of compute in one step on one rank: FLOPs / (peak * achieved fraction)."""
    return step_flops(model, world) / gpu.achieved_flops


@dataclass(frozen=True)
class Traffic:
    """The collectives one rank takes part in during one step: ``count`` of one shape."""

    collective: str             # network.COLLECTIVES
    count: int                  # collectives per step
    shape: tuple[int, int]      # one message (rows, cols), as the codec sees it
    world: int

    def message_bytes(self, codec: str | None) -> int:
        """Bytes of one message: raw bf16 (``codec=None``) or the codec's exact payload."""
        if codec is None:
            return self.shape[0] * self.shape[1] * WIRE_DTYPE.itemsize
        return get_codec(codec).payload_nbytes(self.shape, WIRE_DTYPE)

    @property
    def peers(self) -> int:
        """Messages one rank sends per collective: one for a p2p hop, ``world - 1`` else."""
        return 1 if self.collective == "p2p" else self.world - 1

    def bytes_per_step(self, codec: str | None) -> int:
        """Bytes one rank sends in one step (:attr:`peers` messages per collective)."""
        return self.count * self.peers * self.message_bytes(codec)

    def held_bytes(self, codec: str | None, overlap: bool) -> int:
        """Bytes one rank keeps from one step to the next: for a codec (residual order 1)
        a reference per stream -- every other rank's message of every collective, plus its
        own encoder's (one per collective; one per peer for all-to-all); for raw stale
        K/V (DistriFusion) every other rank's message; nothing for synchronous raw."""
        raw = self.message_bytes(None)
        if self.collective == "p2p":  # PipeFusion: one stream out and one in per patch
            return 0 if codec is None else 2 * self.count * raw
        others = self.count * (self.world - 1) * raw
        if codec is None:
            return others if overlap else 0
        own = self.count * raw * ((self.world - 1) if self.collective == "all_to_all" else 1)
        return others + own

    def codec_seconds(self, codec: str | None, bandwidth: float) -> float:
        """Seconds one rank spends in codec kernels per step at ``bandwidth`` bytes/s of
        device memory: per collective one encode (one per peer for all-to-all) and one
        decode per message received (:data:`CODEC_PASSES`); 0 for raw tensors."""
        if codec is None or self.world == 1:  # one rank sends nothing, encodes nothing
            return 0.0
        enc, dec = CODEC_PASSES[codec.split(":")[0]]
        encodes = self.peers if self.collective == "all_to_all" else 1
        decodes = self.peers
        return self.count * (enc * encodes + dec * decodes) * self.message_bytes(None) / bandwidth

    def seconds(self, link: Link, codec: str | None, first: bool = False) -> float:
        """Communication seconds of one step, collectives run one after another, the
        control plane's exchanges (:meth:`control_seconds`) included."""
        one = collective_seconds(self.collective, self.message_bytes(codec), self.world, link)
        return self.count * one + self.control_seconds(link, codec, first)

    def control_seconds(self, link: Link, codec: str | None, first: bool = False) -> float:
        """Seconds of one step's control exchanges (``CompressionConfig(handshake=True)``,
        the default), each an all-gather of :func:`~compressed_comm.group.handshake_nbytes`
        per rank: one at the end of every step, and on a generation's ``first`` step a size
        handshake before every collective too (later steps repeat the agreed ones); none
        for raw tensors and point-to-point messages."""
        if codec is None or self.collective == "p2p":
            return 0.0
        block = collective_seconds("all_gather", handshake_nbytes(self.world), self.world,
                                   link)
        return (1 + (self.count if first else 0)) * block


def step_traffic(model: ModelSpec, world: int, parallelism: str,
                 patches: int | None = None) -> Traffic:
    """The per-step collectives of ``parallelism`` for ``model`` on ``world`` ranks.

    * ``patch``: per layer, an all-gather of K and one of V, each the rank's local image
      tokens x hidden;
    * ``ring``: the same blocks passed around the ring (``world - 1`` hops);
    * ``ulysses``: per layer, four all-to-alls (Q, K, V, attention output), each sending
      every other rank the local image tokens x ``hidden / world`` (its heads);
    * ``pipefusion``: ``world`` pipeline stages of ``layers / world`` layers; each step,
      every stage sends each of the ``patches`` (default ``world``) image patches' hidden
      states to the next stage: ``patches`` point-to-point messages of
      ``image tokens / patches`` x ``hidden``.

    Text tokens are replicated and never sent; the CFG batch multiplies the rows.
    """
    collective = choose(PARALLELISMS, parallelism, "parallelism")
    parallelism = parallelism.strip().lower()
    _check_world(model, world)
    if parallelism == "pipefusion":
        m = patches or world
        if m < 1 or model.image_tokens < m:
            raise ValueError(f"pipefusion needs 1 <= patches <= {model.image_tokens}, got {m}")
        return Traffic(collective, m, (model.batch * math.ceil(model.image_tokens / m),
                                       model.hidden), world)
    rows = model.batch * local_image_tokens(model, world)
    if parallelism == "ulysses":
        if model.heads % world:
            divisors = [w for w in range(1, model.heads + 1) if model.heads % w == 0]
            raise ValueError(
                f"ulysses needs world to divide the {model.heads} attention heads of "
                f"{model.name}; got world {world} (choose one of "
                f"{', '.join(map(str, divisors))})")
        return Traffic(collective, 4 * model.layers, (rows, model.hidden // world), world)
    return Traffic(collective, 2 * model.layers, (rows, model.hidden), world)


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
class _Method:
    name: str
    codec: str | None       # None: raw bf16 tensors
    overlap: bool           # asynchronous after warmup
    warm_codec: str | None  # what the warmup steps send


def _methods(codecs: Sequence[str], async_combos: bool,
             keyframe_codec: str = "identity") -> list[_Method]:
    if isinstance(codecs, str):
        codecs = [c for c in codecs.split(",") if c.strip()]
    out = [_Method("raw", None, False, None), _Method("distrifusion", None, True, None)]
    specs = []
    for spec in codecs:
        spec = spec.strip().lower()
        base, is_async = (spec[: -len(_ASYNC)], True) if spec.endswith(_ASYNC) else (spec, False)
        get_codec(base)   # ValueError naming the valid forms for a bad spec
        specs.append((base, is_async))
    if async_combos:
        specs += [(base, True) for base, is_async in list(specs) if not is_async]
    seen = {m.name for m in out}
    for base, is_async in specs:
        name = base + _ASYNC if is_async else base
        if name not in seen:
            seen.add(name)
            out.append(_Method(name, base, is_async, keyframe_codec))
    return out


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


def _pipefusion_timing(model: ModelSpec, gpu: GPU, link: Link, world: int, traffic: Traffic,
                       warmup: int, codec_s: Callable[[str | None], float]
                       ) -> Callable[[_Method], tuple[StepEstimate, float, float, float]]:
    """PipeFusion's step and end-to-end time per method (``world`` stages, ``M`` patches).

    A stage computes its ``layers / world`` layers for every patch of a step (one GPU's
    step / world) and sends each patch on while it computes the next, so a steady step
    takes ``max(stage compute, M messages)``. The ``warmup`` steps run the full image
    through the stages one after another (no stale K/V yet): one GPU's step plus
    ``world - 1`` full-image hops. Filling the pipeline once costs ``world - 1`` patch
    stages (the bubble)."""
    full = compute_seconds(model, gpu, 1)
    stage = full / world
    image = model.batch * model.image_tokens * model.hidden * WIRE_DTYPE.itemsize
    warm_step = full + (world - 1) * collective_seconds("p2p", image, world, link)
    bubble = (world - 1) * stage / traffic.count

    def total(method: _Method) -> tuple[StepEstimate, float, float, float]:
        comm, work = traffic.seconds(link, method.codec), stage + codec_s(method.codec)
        step = StepEstimate(compute_s=work, comm_s=comm, exposed_comm_s=max(0.0, comm - work),
                            step_s=max(work, comm), overlap=True)
        warm = warmup * warm_step
        slowest = max(warm_step if warmup else 0.0, step.step_s)
        return step, warm + (model.steps - warmup) * step.step_s + bubble, warm, slowest
    return total


def _not_applicable(name: str, parallelism: str) -> MethodRow:
    note = (f"does not apply to {parallelism} parallelism: DistriFusion's one-step-stale K/V "
            "overlap is a patch-parallel (all-gather) method")
    if parallelism == "pipefusion":
        note = ("does not apply to pipefusion: PipeFusion is asynchronous by design (its "
                "stages attend to one-step-stale K/V of the other patches)")
    return MethodRow(name, False, None, None, None, None, None, None, None, None, note=note)


def _general_assumptions(model: ModelSpec, gpu: GPU, link: Link, world: int,
                         parallelism: str, warmup: int) -> tuple[str, ...]:
    weights = model.params * WIRE_DTYPE.itemsize
    fits = "fits" if weights <= gpu.memory_bytes else "does NOT fit"
    out = [
        "compute = FLOPs / (peak bf16 * achieved fraction); FLOPs = linear layers on the "
        "rank's tokens (2*(4+2*mlp_ratio)*hidden^2 per token and layer) + attention from "
        "them to all tokens (4*local*tokens*hidden per layer); norms, modulation, "
        "embeddings, text encoder and VAE not counted",
        f"image tokens split {world} ways (the busiest rank, ceil({model.image_tokens}/"
        f"{world}), sets the pace); text tokens replicated on every rank and never sent",
        "the split is ideal: a rank's kernels on 1/world of the tokens are assumed as "
        "efficient as one GPU's, and launch overheads are not counted. Published parallel "
        "runs are slower: FLUX.1-dev on 4 H100 over NVLink takes 4.24 s with Ulysses-4 and "
        "5.11 s with Ring-4 in PyTorch (1.63 s and 1.98 s compiled; xdit-project/xDiT "
        "docs/performance/flux.md) where this model gives 2.40 s and 2.46 s. Parallel times "
        "are lower bounds, and the speedups of compression (which only cuts communication) "
        "upper bounds",
        "messages are bf16; a codec's message is exactly "
        "get_codec(spec).payload_nbytes((rows, cols), bfloat16), header included; the ratio "
        "column is raw bytes / that payload",
        f"collectives: (world-1) hops of latency + bytes/bandwidth each, bandwidth per "
        f"direction per GPU, all ranks sending at once with no further contention; "
        f"collectives of a step run one after another",
        "synchronous methods (raw, codecs): the step waits for its communication "
        "(compute + comm); async (distrifusion, +async): step t's exchange runs during "
        "step t's compute and only max(0, comm - compute) is exposed; the overlapped "
        "exchange is assumed to take no compute or memory bandwidth from the step",
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
        out.append("ring: hops are not overlapped with the attention of the block in hand "
                   "(real ring attention hides up to one block's attention per hop), so "
                   "exposed communication is an upper bound")
    if parallelism == "pipefusion":
        out.append(
            f"pipefusion (xDiT): {world} stages of the layers, M = {world} image patches; a "
            "stage's step is one GPU's step / world (each token through its layers once, the "
            "text tokens included), sends overlap the next patch's compute (step = max(stage, "
            f"M messages)); warmup steps run the full image through the stages in sequence; "
            "the pipeline fills once per generation ((world-1)/M stage steps); smaller "
            "per-patch kernels are assumed as efficient as whole-image ones, so this is a "
            "lower bound of its time; weights are split, not replicated, in reality (the "
            "weights line above overstates its memory)")
    out.append(f"GPU {gpu.name}: {gpu.description}")
    out.append(f"link {link.name}: {link.description}")
    return tuple(out)


def run_what_if(
    model: str,
    gpu: str | GPU,
    world: int,
    parallelism: str,
    link: str | Link,
    codecs: Sequence[str],
    warmup: int = 1,
    *,
    async_combos: bool = False,
    keyframe_codec: str = "identity",
    keyframe_period: int = 0,
    keyframe_spread: int = 1,
) -> WhatIfReport:
    """Estimate one generation of ``model`` on ``world`` x ``gpu`` over ``link``.

    Methods: ``raw`` (synchronous, bf16 tensors), ``distrifusion`` (patch parallelism
    only: asynchronous after ``warmup`` synchronous steps), each codec spec in ``codecs``
    (synchronous residual compression, the first ``warmup`` steps sent in full) and
    ``<spec>+async`` combinations (listed in ``codecs``, or for every codec with
    ``async_combos=True``; patch parallelism only). Unknown names raise ``ValueError``
    listing the choices; ``ulysses`` needs ``world`` to divide the attention heads.
    ``gpu`` and ``link`` are preset names or :class:`GPU` / :class:`Link` objects.
    ``keyframe_codec``, ``keyframe_period`` and ``keyframe_spread`` are the codecs'
    keyframes as in :class:`~compressed_comm.CompressionConfig` (every step priced with the
    payload a stream of that config sends; PipeFusion: warmup only).
    """
    spec = get_model(model)
    gpu_ = gpu if isinstance(gpu, GPU) else get_gpu(gpu)
    link_ = link if isinstance(link, Link) else get_link(link)
    traffic = step_traffic(spec, world, parallelism)
    parallelism = parallelism.strip().lower()
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= spec.steps:
        raise ValueError(f"warmup must be an integer in [0, {spec.steps}], got {warmup!r}")
    CompressionConfig(keyframe_codec=keyframe_codec, keyframe_period=keyframe_period,
                      keyframe_spread=keyframe_spread)  # ValueError naming what is wrong
    methods = _methods(codecs, async_combos, keyframe_codec)

    compute = compute_seconds(spec, gpu_, world)

    def codec_s(name: str | None) -> float:
        return traffic.codec_seconds(name, gpu_.memory_bandwidth)

    def total(method: _Method) -> tuple[StepEstimate, float, float, float]:
        """(steady step, total, seconds of the keyed steps, slowest step)."""
        handshake = traffic.control_seconds(link_, method.codec)
        steady = estimate_step(compute + codec_s(method.codec),
                               traffic.seconds(link_, method.codec), method.overlap, handshake)
        if method.codec is None:  # raw tensors: warmup steps synchronous (DistriFusion)
            n_warm = warmup if method.overlap else 0
            warm = estimate_step(compute, traffic.seconds(link_, None), False)
            warm_s = n_warm * warm.step_s
            slowest = warm.step_s if n_warm else steady.step_s
            return steady, warm_s + (spec.steps - n_warm) * steady.step_s, warm_s, slowest
        stream = StreamEncoder("what-if", torch.empty(traffic.shape, dtype=WIRE_DTYPE,
                                                      device="meta"), CompressionConfig(
            codec=method.codec, warmup_steps=warmup, keyframe_codec=method.warm_codec,
            keyframe_period=keyframe_period, keyframe_spread=keyframe_spread))
        total_s = keyed_s = slowest = 0.0
        for t in range(spec.steps):
            size = stream.payload_nbytes(t)
            control = traffic.control_seconds(link_, method.codec, first=t == 0)
            comm = traffic.count * collective_seconds(traffic.collective, size, world,
                                                      link_) + control
            codec = method.warm_codec if stream.is_keyframe(t) else method.codec
            step = estimate_step(compute + codec_s(codec), comm,
                                 method.overlap and t >= warmup, control).step_s
            total_s += step
            slowest = max(slowest, step)
            if stream.is_keyframe(t) or stream.spread_rows(t) is not None:
                keyed_s += step
        return steady, total_s, keyed_s, slowest

    kv_cache = 0
    if parallelism == "pipefusion":
        total = _pipefusion_timing(spec, gpu_, link_, world, traffic, warmup, codec_s)
        compute = compute_seconds(spec, gpu_, 1) / world
        # each stage keeps its layers' K and V of every image token (stale for other patches)
        kv_cache = (math.ceil(spec.layers / world) * 2 * spec.batch * spec.image_tokens
                    * spec.hidden * WIRE_DTYPE.itemsize)
    raw_total = total(methods[0])[1]
    raw_message = traffic.message_bytes(None)
    rows = []
    for method in methods:
        if method.overlap and parallelism != "patch":
            rows.append(_not_applicable(method.name, parallelism))
            continue
        steady, end_to_end, warm_s, slowest = total(method)
        rows.append(MethodRow(
            method=method.name,
            applies=True,
            bytes_per_step=traffic.bytes_per_step(method.codec),
            ratio=raw_message / traffic.message_bytes(method.codec),
            compute_s=steady.compute_s,
            comm_s=steady.comm_s,
            exposed_comm_s=steady.exposed_comm_s,
            step_s=steady.step_s,
            total_s=end_to_end,
            speedup=raw_total / end_to_end,
            held_bytes=(held := traffic.held_bytes(method.codec, method.overlap) + kv_cache),
            codec_s=codec_s(method.codec),
            warmup_share=warm_s / end_to_end,
            max_step_s=slowest,
            fits=spec.params * 2 + held <= gpu_.memory_bytes,
        ))
    assumptions = spec.assumptions + _general_assumptions(spec, gpu_, link_, world,
                                                          parallelism, warmup)
    if keyframe_period:
        assumptions += (
            f"codecs also send a keyframe ({keyframe_codec}) every {keyframe_period} steps"
            + (f", spread over {keyframe_spread} steps (each a slice of the rows plus "
               "residuals of the rest)" if keyframe_spread > 1 else "")
            + ("; not modelled for pipefusion" if parallelism == "pipefusion" else ""),)
    return WhatIfReport(
        model=spec, gpu=gpu_, link=link_, world=world, parallelism=parallelism,
        warmup=warmup, traffic=traffic, raw_message_bytes=raw_message, compute_s=compute,
        single_gpu_total_s=spec.steps * compute_seconds(spec, gpu_, 1), rows=tuple(rows),
        assumptions=assumptions,
    )


def best_methods(model: str, gpu: str | GPU, world: int, link: str | Link,
                 codecs: Sequence[str], warmup: int = 1,
                 keyframe_codec: str = "identity", keyframe_period: int = 0,
                 keyframe_spread: int = 1) -> list[tuple[str, str, float]]:
    """``(parallelism, method, total seconds)``: the fastest method of every parallelism
    that applies to ``model`` on ``world`` ranks (Ulysses only where ``world`` divides the
    heads), fastest first."""
    out = []
    for parallelism in PARALLELISMS:
        try:
            report = run_what_if(model, gpu, world, parallelism, link, codecs, warmup,
                                 keyframe_codec=keyframe_codec,
                                 keyframe_period=keyframe_period,
                                 keyframe_spread=keyframe_spread)
        except ValueError:  # e.g. Ulysses with a world that does not divide the heads
            continue
        best = min((r for r in report.rows if r.applies), key=lambda r: r.total_s)
        out.append((parallelism, best.method, best.total_s))
    return sorted(out, key=lambda row: row[2])
