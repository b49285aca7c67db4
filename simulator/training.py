"""What the embedded models' trainers share: the learning-rate schedule, the optimizer step
with its weight average, and the safetensors file the loaders read."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["TrainResult", "lr_at", "FlowTrainer", "save_weights"]


@dataclass
class TrainResult:
    """What a trainer's ``train`` returns."""

    model: nn.Module        # the EMA weights, eval mode
    losses: list[float]     # training loss per step (raw weights)
    seconds: float


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup for ``warmup`` steps, then cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


class FlowTrainer:
    """AdamW on ``model`` (put in train mode) under :func:`lr_at`, and an exponential moving
    average of its weights, :attr:`ema` (eval mode, no gradients): at step ``n`` the average
    moves with decay ``min(ema_decay, (1 + n) / (10 + n))``."""

    def __init__(self, model: nn.Module, *, steps: int, lr: float, warmup: int,
                 ema_decay: float, weight_decay: float = 0.0) -> None:
        self.model = model.train()
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.steps, self.lr, self.warmup, self.ema_decay = steps, lr, warmup, ema_decay
        self._opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def step(self, loss: torch.Tensor, step: int) -> float:
        """One optimizer step on ``loss`` (step number ``step``), then the average; returns
        the loss as a float."""
        for group in self._opt.param_groups:
            group["lr"] = lr_at(step, self.steps, self.lr, self.warmup)
        self._opt.zero_grad(set_to_none=True)
        loss.backward()
        self._opt.step()
        decay = min(self.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        return loss.item()


def save_weights(model: nn.Module, path: Path | str, *, fp16: bool = True,
                 extra: dict[str, str] | None = None) -> None:
    """Write a label-conditioned model's state dict (transformer + label embeddings) as
    safetensors.

    ``fp16`` stores float16 (half the bytes; the loaders read it back as float32). The
    metadata records the transformer config and the number of text tokens, which
    :func:`~simulator.digits.read_weights` checks.
    """
    from safetensors.torch import save_file

    dtype = torch.float16 if fp16 else torch.float32
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {"transformer_config": json.dumps(model.config),
            "text_tokens": str(model.text_tokens), **(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
