"""The simulator's default model: a tiny class-conditional SD3 transformer for 32x32 digits.

:class:`DigitsModel` wraps a diffusers :class:`~diffusers.SD3Transformer2DModel` (the MMDiT
of Stable Diffusion 3: joint attention over image and text tokens, adaLN-Zero modulation by
timestep + pooled text) sized to train in about ten minutes on two CPU cores. It works in
pixel space (no VAE) on scikit-learn's ``load_digits`` upscaled to 32x32, one channel, in
[-1, 1]. The "text" is a learned embedding per class: :meth:`DigitsModel.condition` turns
labels into the ``encoder_hidden_states`` (a few tokens per label) and
``pooled_projections`` the transformer expects, so the model exercises the same code paths
(joint attention, context stream, adaLN) as a full SD3::

    model = load_digits_model()                     # committed weights, fp32, eval mode
    cond = model.condition(labels)

    def forward(x, t):                              # t: (B,) in [0, 1]
        return model.transformer(hidden_states=x, timestep=t * 1000, **cond,
                                 return_dict=False)[0]

    images = flow_sample(forward, torch.randn(len(labels), 1, 32, 32), steps=20)
    to_8x8(images)                                  # (B, 64) on sklearn's 0..16 scale

The model is trained by rectified flow (``python -m simulator.train_digits``):
``x_t = (1 - t) x_0 + t eps`` and the network predicts the velocity ``v = eps - x_0``.
:func:`flow_sample` integrates that velocity from ``t = 1`` (noise) to ``t = 0`` (data)
with Euler steps and only ever calls ``forward``, so single-device and parallel
(compressed) runs go through exactly the same sampler.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["IMAGE_SIZE", "NUM_CLASSES", "TEXT_TOKENS", "WEIGHTS", "TRANSFORMER_CONFIG",
           "DEFAULT_SHIFT", "DigitsModel", "load_digits_model", "flow_sample", "time_grid",
           "load_dataset", "to_8x8"]

IMAGE_SIZE = 32
NUM_CLASSES = 10
TEXT_TOKENS = 4          # "text" tokens per label in encoder_hidden_states
WEIGHTS = Path(__file__).resolve().parent / "weights" / "digits_sd3.safetensors"

# SD3Transformer2DModel kwargs. 32x32 pixels in 2x2 patches: 256 image tokens plus
# TEXT_TOKENS context tokens per sample. 4 heads, so heads shard evenly over 2 or 4 ranks
# (Ulysses) and the 256 image tokens over 2, 4, 8 or 16 (patch parallelism, ring attention).
TRANSFORMER_CONFIG: dict = dict(
    sample_size=IMAGE_SIZE,
    patch_size=2,
    in_channels=1,
    out_channels=1,
    num_layers=4,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=64,
    caption_projection_dim=64,
    pooled_projection_dim=64,
    pos_embed_max_size=IMAGE_SIZE // 2,
)

# Time-grid shift of flow_sample (1.0 = uniform grid); see time_grid.
DEFAULT_SHIFT = 1.0


class LabelConditioned(nn.Module):
    """A diffusers transformer conditioned on a class label only: per label, ``text_tokens``
    learned context tokens (``encoder_hidden_states``) and a learned pooled vector
    (``pooled_projections``). The transformer is built first, then the embeddings.

    With ``null_label`` there is one more label, :attr:`null_label` ``= num_classes``, the
    empty condition that classifier-free guidance steers away from (learned by label
    dropout); without, :attr:`null_label` is None.
    """

    def __init__(self, transformer_class: type[nn.Module], config: Mapping[str, Any],
                 text_tokens: int, num_classes: int, *, null_label: bool = False) -> None:
        super().__init__()
        self.config = dict(config)
        self.text_tokens = text_tokens
        self.num_classes = num_classes
        self.null_label: int | None = num_classes if null_label else None
        self.transformer = transformer_class(**self.config)
        labels = num_classes + int(null_label)
        self.label_tokens = nn.Embedding(labels, text_tokens * self.config["joint_attention_dim"])
        self.label_pooled = nn.Embedding(labels, self.config["pooled_projection_dim"])

    def condition(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The transformer's conditioning kwargs for integer ``labels`` of shape ``(B,)``:
        ``encoder_hidden_states`` ``(B, text_tokens, joint_attention_dim)`` and
        ``pooled_projections`` ``(B, pooled_projection_dim)``, in the dtype and on the device
        of the model's weights."""
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.label_tokens.weight.device)
        if labels.ndim != 1:
            raise ValueError(f"labels must have shape (B,), got {tuple(labels.shape)}")
        count = self.label_tokens.num_embeddings
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= count):
            null = "" if self.null_label is None else f" ({self.null_label}: the null label)"
            raise ValueError(f"labels must lie in [0, {count}){null}, got {labels.tolist()}")
        tokens = self.label_tokens(labels).view(len(labels), self.text_tokens, -1)
        return {"encoder_hidden_states": tokens, "pooled_projections": self.label_pooled(labels)}


class DigitsModel(LabelConditioned):
    """An SD3 transformer plus a learned per-class "text" embedding.

    Attributes:
        config: the transformer's kwargs (:data:`TRANSFORMER_CONFIG` by default).
        text_tokens: context tokens per label.
        transformer: the :class:`~diffusers.SD3Transformer2DModel`.
        label_tokens: ``(NUM_CLASSES, text_tokens * joint_attention_dim)`` embedding, the
            ``encoder_hidden_states`` of each class.
        label_pooled: ``(NUM_CLASSES, pooled_projection_dim)`` embedding, the
            ``pooled_projections`` of each class.
    """

    def __init__(self, config: dict | None = None, text_tokens: int = TEXT_TOKENS) -> None:
        from diffusers import SD3Transformer2DModel

        super().__init__(SD3Transformer2DModel, TRANSFORMER_CONFIG if config is None else config,
                         text_tokens, NUM_CLASSES)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predicted velocity ``eps - x_0`` at images ``x`` ``(B, 1, 32, 32)``, times ``t``
        ``(B,)``."""
        return self.transformer(hidden_states=x, timestep=t * 1000, **self.condition(labels),
                                return_dict=False)[0]


def read_weights(path: Path | str, expected: Mapping[str, Any], trainer: str
                 ) -> tuple[dict[str, torch.Tensor], int | None]:
    """The float32 state dict and the stored number of text tokens (None if not stored) of a
    model written by :func:`~simulator.training.save_weights` at ``path``.

    Raises :class:`FileNotFoundError`, naming ``python -m simulator.<trainer>``, if the file
    is missing, and :class:`ValueError` if it was saved with another transformer config than
    ``expected``.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"model weights not found at {path}; the shipped ones are in simulator/weights/, "
            f"and `python -m simulator.{trainer} --out {path}` rebuilds them")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    if "transformer_config" in meta:
        config = json.loads(meta["transformer_config"])
        if config != json.loads(json.dumps(dict(expected))):  # tuples stored as lists
            raise ValueError(f"{path} holds a model with config {config}, expected "
                             f"TRANSFORMER_CONFIG {dict(expected)}")
    return state, int(meta["text_tokens"]) if "text_tokens" in meta else None


def load_digits_model(path: Path | str = WEIGHTS) -> DigitsModel:
    """The trained model from ``path`` (the committed weights by default), fp32, eval mode;
    errors as :func:`read_weights`."""
    state, text_tokens = read_weights(path, TRANSFORMER_CONFIG, "train_digits")
    model = DigitsModel(text_tokens=text_tokens or TEXT_TOKENS)
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def time_grid(steps: int, shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    """The ``steps + 1`` times of :func:`flow_sample`, from 1.0 down to 0.0 (float64).

    A uniform grid ``s_i = 1 - i / steps`` mapped through SD3's shift
    ``t = shift * s / (1 + (shift - 1) * s)``; ``shift > 1`` spends more steps at high
    noise, ``shift = 1`` keeps the grid uniform.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


@torch.no_grad()
def flow_sample(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                noise: torch.Tensor, steps: int, *, shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    """Rectified-flow Euler sampler: integrate ``dx/dt = forward(x, t)`` from t=1 to t=0.

    ``noise`` is the ``t = 1`` sample ``(B, ...)``; ``forward(x, t)`` gets the current
    batch and ``t`` as a ``(B,)`` tensor in ``noise``'s dtype and device and returns the
    predicted velocity ``v = noise - data``. The times are :func:`time_grid(steps, shift)
    <time_grid>`; step ``i`` is ``x <- x + (t_{i+1} - t_i) * forward(x, t_i)``, so
    ``forward`` is called exactly ``steps`` times, at decreasing ``t`` starting from 1.0.
    Deterministic: the result depends only on ``noise`` and ``forward``. ``noise`` itself is
    not modified.
    """
    grid = time_grid(steps, shift).tolist()
    x = noise.clone()
    batch = noise.shape[0]
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        t = torch.full((batch,), t_cur, dtype=noise.dtype, device=noise.device)
        v = forward(x, t)
        x = x + (t_next - t_cur) * v.to(x.dtype)
    return x


def load_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``(images (N, 1, 32, 32) in [-1, 1], labels (N,) int64)``.

    The 8x8 images (0..16) are scaled to [0, 1], upscaled bilinearly (half-pixel centres,
    no antialiasing) to 32x32 and mapped to [-1, 1].
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                                        align_corners=False)
    return x * 2 - 1, torch.as_tensor(digits.target, dtype=torch.int64)


def to_8x8(images: torch.Tensor) -> np.ndarray:
    """32x32 images in [-1, 1] back to sklearn's 8x8 digits: ``(B, 64)`` float64 in 0..16.

    Each 8x8 pixel is the mean of a 4x4 block, clipped to [0, 16], so a classifier fitted on
    ``load_digits().data`` reads them.
    """
    if images.ndim != 4 or images.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"images must have shape (B, 1, {IMAGE_SIZE}, {IMAGE_SIZE}), "
                         f"got {tuple(images.shape)}")
    pooled = torch.nn.functional.avg_pool2d(images.detach().float().cpu(), IMAGE_SIZE // 8)
    pooled = ((pooled + 1) * 8).clamp(0, 16)
    return pooled.reshape(len(images), 64).double().numpy()
