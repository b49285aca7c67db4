"""Workloads: a diffusers transformer, its fixed conditioning, and how to sample and view it.

``digits`` is the embedded default: the trained class-conditional SD3 of
:mod:`simulator.digits` (no download). ``photos`` is the embedded trained Flux of
:mod:`simulator.photos` (64x64 RGB, 1024 image tokens). ``sd3``, ``flux``, ``pixart`` and
``cogvideox`` are small random-weight configurations of the four supported diffusers
classes: their outputs are not pictures of anything, but they exercise every model's
parallel code path, and compression error is measured against their exact parallel output
just the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from .digits import IMAGE_SIZE, NUM_CLASSES, flow_sample, load_digits_model
from .photos import NUM_CLASSES as PHOTO_CLASSES

__all__ = ["WORKLOADS", "Workload", "flux_workload", "photos_workload", "make_workload",
           "sample"]

#: (model, latents, t in [0, 1]) -> velocity
Forward = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Workload:
    """What the simulator runs: a model, the starting noise, a forward and a viewer."""

    name: str
    description: str
    model: torch.nn.Module
    noise: torch.Tensor
    forward: Forward
    to_images: Callable[[torch.Tensor], torch.Tensor]  # latents -> (B, H, W, C) in [0, 1]

    @property
    def heads(self) -> int:
        return int(self.model.config.num_attention_heads)

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def sample(workload: Workload, model: torch.nn.Module, steps: int) -> torch.Tensor:
    """The final latents of ``steps`` rectified-flow Euler steps with ``model``."""
    return flow_sample(lambda x, t: workload.forward(model, x, t), workload.noise, steps)


def _grey(x: torch.Tensor) -> torch.Tensor:
    return ((x[:, :1] + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


def _false_colour(x: torch.Tensor) -> torch.Tensor:
    """First three latent channels, each image min-max scaled, as RGB (B, H, W, 3)."""
    x = x[:, :3].float()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-12)).permute(0, 2, 3, 1)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` with PyTorch's default init on every linear/conv layer, in eval mode.

    diffusers zero-initialises output projections and adaLN modulations (a trained model
    starts from identity blocks); random weights must not, or the transformer outputs zeros
    and every parallel method trivially agrees.
    """
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            module.reset_parameters()
    return model.eval()


def _digits(batch: int, seed: int) -> Workload:
    model = load_digits_model()
    labels = torch.arange(batch) % NUM_CLASSES
    cond = model.condition(labels)
    noise = torch.randn(batch, 1, IMAGE_SIZE, IMAGE_SIZE, generator=_generator(seed))

    def forward(m: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return m(hidden_states=x, timestep=t * 1000, **cond, return_dict=False)[0]
    return Workload("digits", "embedded SD3 digits model (trained, 32x32, 256 tokens)",
                    model.transformer, noise, forward, _grey)


def photos_workload(batch: int, seed: int, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> Workload:
    """The trained Flux of :mod:`simulator.photos` (the ``photos`` workload) on ``device`` in
    ``dtype``: ``batch`` samples, labels ``0, 1, ...`` (one photo each), seeded noise."""
    from .photos import CHANNELS, TOKENS, load_photos_model, to_images

    model = load_photos_model().to(device, dtype)
    cond = {k: v.to(device, dtype) for k, v in
            model.condition(torch.arange(batch) % PHOTO_CLASSES).items()}
    noise = torch.randn(batch, TOKENS, CHANNELS, generator=_generator(seed)).to(device, dtype)

    def forward(m: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return m(hidden_states=x, timestep=t.to(x), **cond, return_dict=False)[0]
    return Workload("photos", "embedded Flux photos model (trained, 64x64 RGB, 1024 tokens)",
                    model.transformer, noise, forward, to_images)


def _photos(batch: int, seed: int) -> Workload:
    return photos_workload(batch, seed)


def _sd3(batch: int, seed: int) -> Workload:
    from diffusers import SD3Transformer2DModel
    model = _randomized(SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
        caption_projection_dim=64, pooled_projection_dim=32, pos_embed_max_size=16), seed)
    g = _generator(seed)
    text, pooled = torch.randn(batch, 8, 32, generator=g), torch.randn(batch, 32, generator=g)
    noise = torch.randn(batch, 4, 32, 32, generator=g)

    def forward(m, x, t):
        return m(hidden_states=x, timestep=t * 1000, encoder_hidden_states=text,
                 pooled_projections=pooled, return_dict=False)[0]
    return Workload("sd3", "random-weight SD3Transformer2DModel (32x32x4 latent, 256 tokens)",
                    model, noise, forward, _false_colour)


def _pixart(batch: int, seed: int) -> Workload:
    from diffusers import PixArtTransformer2DModel
    model = _randomized(PixArtTransformer2DModel(
        sample_size=32, num_layers=2, patch_size=2, attention_head_dim=16, num_attention_heads=4,
        caption_channels=32, in_channels=4, out_channels=4, cross_attention_dim=64,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6), seed)
    g = _generator(seed)
    text = torch.randn(batch, 8, 32, generator=g)
    noise = torch.randn(batch, 4, 32, 32, generator=g)
    added = {"resolution": None, "aspect_ratio": None}

    def forward(m, x, t):
        return m(x, encoder_hidden_states=text, timestep=t * 1000, added_cond_kwargs=added,
                 return_dict=False)[0]
    return Workload("pixart", "random-weight PixArtTransformer2DModel (32x32x4 latent, 256 tokens)",
                    model, noise, forward, _false_colour)


def flux_workload(batch: int, seed: int, *, tokens: int = 256, heads: int = 4,
                  head_dim: int = 16, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Workload:
    """A random-weight ``FluxTransformer2DModel`` (2 double and 2 single blocks, width
    ``heads * head_dim``, ``tokens`` packed image tokens of 16 channels (a square number) and
    8 text tokens, RoPE over the image grid) on ``device`` in ``dtype``; the ``flux``
    workload is its default size."""
    side = math.isqrt(tokens)
    if tokens < 1 or side * side != tokens:
        raise ValueError(f"tokens must be a positive square number, got {tokens}")
    rope = 3 * head_dim // 8  # RoPE axes (time, row, column): each must be even
    if head_dim < 8 or head_dim % 2 or rope % 2:
        raise ValueError(f"head_dim must split into even RoPE axes (16, 32, 48, 64, ...), got "
                         f"{head_dim}")
    from diffusers import FluxTransformer2DModel
    model = _randomized(FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=(head_dim - 2 * rope, rope, rope)), seed)
    model = model.to(device) if dtype == torch.float32 else model.to(device, dtype)
    g = _generator(seed)
    text = torch.randn(batch, 8, 32, generator=g).to(device, dtype)
    pooled = torch.randn(batch, 32, generator=g).to(device, dtype)
    noise = torch.randn(batch, tokens, 16, generator=g).to(device, dtype)
    img_ids = torch.zeros(tokens, 3, device=device)
    img_ids[:, 1] = torch.arange(tokens, device=device) // side
    img_ids[:, 2] = torch.arange(tokens, device=device) % side
    txt_ids = torch.zeros(8, 3, device=device)

    def forward(m, x, t):
        return m(hidden_states=x, timestep=t.to(x), encoder_hidden_states=text,
                 pooled_projections=pooled, img_ids=img_ids, txt_ids=txt_ids,
                 return_dict=False)[0]

    def to_images(x: torch.Tensor) -> torch.Tensor:  # unpack (B, T, 16) -> (B, 4, 2s, 2s)
        b = x.shape[0]
        x = x.float().cpu().view(b, side, side, 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return _false_colour(x.reshape(b, 4, 2 * side, 2 * side))
    return Workload("flux", f"random-weight FluxTransformer2DModel ({side}x{side} packed "
                    f"tokens, width {heads * head_dim}, RoPE)", model, noise, forward, to_images)


def _flux(batch: int, seed: int) -> Workload:
    return flux_workload(batch, seed)


def _cogvideox(batch: int, seed: int) -> Workload:
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    model = _randomized(CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
        time_embed_dim=16, text_embed_dim=32, num_layers=2, sample_width=32, sample_height=32,
        sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8,
        use_rotary_positional_embeddings=True), seed)
    g = _generator(seed)
    text = torch.randn(batch, 8, 32, generator=g)
    noise = torch.randn(batch, 3, 4, 32, 32, generator=g)  # 3 latent frames
    rotary = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (16, 16)),
                                     grid_size=(16, 16), temporal_size=3)

    def forward(m, x, t):
        return m(hidden_states=x, encoder_hidden_states=text, timestep=t * 1000,
                 image_rotary_emb=rotary, return_dict=False)[0]
    return Workload("cogvideox", "random-weight CogVideoXTransformer3DModel (3 frames x 16x16 "
                    "tokens, 3-D RoPE)", model, noise, forward,
                    lambda x: _false_colour(x[:, 0]))


WORKLOADS: Mapping[str, Callable[[int, int], Workload]] = MappingProxyType({
    "digits": _digits, "sd3": _sd3, "flux": _flux, "pixart": _pixart, "cogvideox": _cogvideox,
    "photos": _photos,
})


def make_workload(name: str, batch: int = 8, seed: int = 0) -> Workload:
    """The workload ``name`` with ``batch`` samples; raises ValueError listing the choices."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(WORKLOADS)}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    return WORKLOADS[name](batch, seed)
