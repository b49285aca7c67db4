"""A trained Flux at 1024 tokens: a small class-conditional Flux transformer for 64x64 photos.

:class:`PhotosModel` wraps a diffusers :class:`~diffusers.FluxTransformer2DModel` (joint
attention over image and text tokens, RoPE over the image grid, double-stream then
single-stream blocks) sized to train in under half an hour on two CPU cores. It works in
pixel space (no VAE): 64x64 RGB crops in [-1, 1], packed like Flux packs its latents, 2x2
pixels of 3 channels per token, so one image is :data:`TOKENS` = 1024 tokens of 12
channels. The data are crops of the photos that ship inside scikit-image and scikit-learn
(:data:`PHOTOS`), each photo downscaled to a short side of :data:`SOURCE_SIZE` pixels, so a
crop shows most of its photo at a random offset. The conditioning is weak on purpose: a
label naming the source photo, as a few learned "text" tokens and a pooled vector. Where the
crop sits, and so what every patch shows, must be agreed on by attention between the
patches -- which is what makes the model a testbed for compressed K/V exchange::

    model = load_photos_model()                       # committed weights, fp32, eval mode
    x = flow_sample(lambda x, t: model.velocity(x, t, labels),
                    torch.randn(len(labels), TOKENS, CHANNELS), steps=20)
    images = unpack(x)                                # (B, 3, 64, 64) in about [-1, 1]

Trained by rectified flow (``python -m simulator.train_photos``), sampled with the digits
model's :func:`~simulator.digits.flow_sample`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from .digits import LabelConditioned, read_weights

__all__ = ["IMAGE_SIZE", "PATCH", "CHANNELS", "TOKENS", "SOURCE_SIZE", "PHOTOS", "NUM_CLASSES",
           "NULL_LABEL", "TEXT_TOKENS", "WEIGHTS", "TRANSFORMER_CONFIG", "PhotosModel",
           "load_photos_model", "load_photos", "random_crops", "pack", "unpack", "to_images",
           "image_ids"]

IMAGE_SIZE = 64
PATCH = 2
CHANNELS = 3 * PATCH * PATCH                    # channels of one packed token
SIDE = IMAGE_SIZE // PATCH                      # tokens per row and column
TOKENS = SIDE * SIDE                            # 1024 image tokens
SOURCE_SIZE = 128                               # short side of each photo before cropping
#: the photos, in label order: scikit-image's ``skimage.data`` loaders and scikit-learn's
#: sample images (``sklearn:<file>``); grey photos are repeated over the three channels
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field",
          "immunohistochemistry", "stereo_motorcycle", "camera", "moon", "coins", "grass",
          "gravel", "brick", "sklearn:china.jpg", "sklearn:flower.jpg")
NUM_CLASSES = len(PHOTOS)
#: the empty condition (no photo named), for classifier-free guidance
NULL_LABEL = NUM_CLASSES
TEXT_TOKENS = 4
WEIGHTS = Path(__file__).resolve().parent / "weights" / "photos_flux.safetensors"

# FluxTransformer2DModel kwargs: 2 double-stream and 2 single-stream blocks, 4 heads of 16
# (width 64; Ulysses over 2 or 4 ranks), RoPE axes (time, row, column) of 4, 6 and 6
# channels. Attention over 1028 tokens is most of the cost, and it grows with the width.
TRANSFORMER_CONFIG: Mapping[str, Any] = MappingProxyType(dict(
    patch_size=1,
    in_channels=CHANNELS,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
))


def image_ids(device: torch.device | str = "cpu") -> torch.Tensor:
    """Flux's ``img_ids``: ``(TOKENS, 3)`` of (0, row, column) for the RoPE."""
    ids = torch.zeros(TOKENS, 3, device=device)
    ids[:, 1] = torch.arange(TOKENS, device=device) // SIDE
    ids[:, 2] = torch.arange(TOKENS, device=device) % SIDE
    return ids


def pack(images: torch.Tensor) -> torch.Tensor:
    """Images ``(B, 3, 64, 64)`` -> tokens ``(B, 1024, 12)``, row-major 2x2 patches."""
    b = images.shape[0]
    x = images.reshape(b, 3, SIDE, PATCH, SIDE, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, TOKENS, CHANNELS)


def unpack(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens ``(B, 1024, 12)`` -> images ``(B, 3, 64, 64)``; the inverse of :func:`pack`."""
    b = tokens.shape[0]
    x = tokens.reshape(b, SIDE, SIDE, 3, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, 3, IMAGE_SIZE, IMAGE_SIZE)


def to_images(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens ``(B, 1024, 12)`` -> images ``(B, 64, 64, 3)`` in [0, 1] on the CPU."""
    return ((unpack(tokens.float().cpu()) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


class PhotosModel(LabelConditioned):
    """A Flux transformer plus a learned per-photo "text" embedding.

    Attributes:
        config: the transformer's kwargs (:data:`TRANSFORMER_CONFIG` by default).
        text_tokens: context tokens per label.
        transformer: the :class:`~diffusers.FluxTransformer2DModel`.
        label_tokens: ``(NUM_CLASSES + 1, text_tokens * joint_attention_dim)``, the
            ``encoder_hidden_states`` of each label and, last, of :data:`NULL_LABEL`.
        label_pooled: ``(NUM_CLASSES + 1, pooled_projection_dim)``, the
            ``pooled_projections``.
    """

    def __init__(self, config: Mapping[str, Any] | None = None,
                 text_tokens: int = TEXT_TOKENS) -> None:
        from diffusers import FluxTransformer2DModel

        super().__init__(FluxTransformer2DModel, TRANSFORMER_CONFIG if config is None else config,
                         text_tokens, NUM_CLASSES, null_label=True)
        self.register_buffer("img_ids", image_ids(), persistent=False)
        self.register_buffer("txt_ids", torch.zeros(text_tokens, 3), persistent=False)

    def condition(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`LabelConditioned.condition` plus Flux's ``img_ids`` and ``txt_ids``."""
        return {**super().condition(labels), "img_ids": self.img_ids, "txt_ids": self.txt_ids}

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predicted velocity ``eps - x_0`` at packed images ``x`` ``(B, 1024, 12)``, times
        ``t`` ``(B,)`` in [0, 1] (Flux scales them by 1000 itself)."""
        return self.transformer(hidden_states=x, timestep=t, **self.condition(labels),
                                return_dict=False)[0]


def load_photos_model(path: Path | str = WEIGHTS) -> PhotosModel:
    """The trained model from ``path`` (the committed weights by default), fp32, eval mode;
    errors as :func:`~simulator.digits.read_weights`."""
    state, text_tokens = read_weights(path, TRANSFORMER_CONFIG, "train_photos")
    labels = state["label_tokens.weight"].shape[0]
    if labels != NUM_CLASSES + 1:
        raise ValueError(f"{path} holds label embeddings for {labels} labels, expected "
                         f"{NUM_CLASSES} photos and the null label; `python -m "
                         f"simulator.train_photos --out {path}` rebuilds it")
    model = PhotosModel(text_tokens=text_tokens or TEXT_TOKENS)
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def _read_photo(name: str) -> np.ndarray:
    """One photo of :data:`PHOTOS` as ``(H, W, 3)`` float32 in [0, 1]."""
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image
        image = load_sample_image(name.split(":", 1)[1])
    else:
        import skimage.data
        image = getattr(skimage.data, name)()
        if name == "stereo_motorcycle":
            image = image[0]
    image = np.asarray(image, dtype=np.float32) / 255.0
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image[..., :3]


def load_photos() -> list[torch.Tensor]:
    """Every photo of :data:`PHOTOS`, in label order, as ``(3, H, W)`` in [-1, 1] with the
    short side :data:`SOURCE_SIZE` (anti-aliased downscaling)."""
    from skimage.transform import resize

    out = []
    for name in PHOTOS:
        image = _read_photo(name)
        h, w = image.shape[:2]
        scale = SOURCE_SIZE / min(h, w)
        size = (max(SOURCE_SIZE, round(h * scale)), max(SOURCE_SIZE, round(w * scale)))
        small = resize(image, size, anti_aliasing=True, order=1).astype(np.float32)
        out.append(torch.from_numpy(small).permute(2, 0, 1).contiguous() * 2 - 1)
    return out


def random_crops(photos: list[torch.Tensor], batch: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random 64x64 crops ``(B, 3, 64, 64)`` of uniformly drawn photos, with their
    labels ``(B,)``; deterministic for ``generator``'s state."""
    labels = torch.randint(len(photos), (batch,), generator=generator)
    crops = []
    for label in labels.tolist():
        photo = photos[label]
        _, h, w = photo.shape
        top = int(torch.randint(h - IMAGE_SIZE + 1, (1,), generator=generator))
        left = int(torch.randint(w - IMAGE_SIZE + 1, (1,), generator=generator))
        crops.append(photo[:, top:top + IMAGE_SIZE, left:left + IMAGE_SIZE])
    return torch.stack(crops), labels
