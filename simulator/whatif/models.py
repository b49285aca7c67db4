"""The published DiTs the what-if prices, and the compute of one step on one rank."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import torch

from ..network import GPU, choose

__all__ = ["WIRE_DTYPE", "ModelSpec", "MODEL_SPECS", "get_model", "check_world",
           "local_image_tokens", "step_flops", "compute_seconds"]

#: The dtype of every activation and raw message.
WIRE_DTYPE = torch.bfloat16


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


def check_world(model: ModelSpec, world: int) -> None:
    """``ValueError`` unless ``world`` is a rank count that can split ``model``'s image."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive integer, got {world!r}")
    if world > model.image_tokens:
        raise ValueError(f"world {world} exceeds the {model.image_tokens} image tokens of "
                         f"{model.name}")


def local_image_tokens(model: ModelSpec, world: int) -> int:
    """Image tokens on the busiest rank when they are split ``world`` ways."""
    check_world(model, world)
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

