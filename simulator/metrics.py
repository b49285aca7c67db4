"""Quality of a parallel run against the exact parallel output: PSNR, SSIM, relative L2.

PSNR is over the whole batch (data range 1); SSIM (scikit-image) is averaged over images.
LPIPS is not reported: its pip package fetches pretrained network weights at run time, and
this simulator runs offline. :func:`range_psnr` compares tensors of any scale (latents)
with the range of the reference as the peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Quality", "quality", "range_psnr"]


@dataclass(frozen=True)
class Quality:
    """Image and latent error of one run against the reference run."""

    psnr_db: float     # over the whole batch (data range 1); inf when identical
    ssim: float        # mean over images, 1.0 when identical
    rel_l2: float      # ||latents - reference|| / ||reference||

    def to_dict(self) -> dict:
        return {"psnr_db": None if math.isinf(self.psnr_db) else self.psnr_db,
                "ssim": self.ssim, "rel_l2": self.rel_l2}


def quality(images: torch.Tensor, reference_images: torch.Tensor, latents: torch.Tensor,
            reference_latents: torch.Tensor) -> Quality:
    """Compare ``images`` (B, H, W, C) in [0, 1] and latents with the reference run's."""
    from skimage.metrics import structural_similarity

    test = images.detach().double().clamp(0, 1).numpy()
    ref = reference_images.detach().double().clamp(0, 1).numpy()
    mse = float(np.mean((test - ref) ** 2))
    psnr = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
    ssims = []
    for a, b in zip(ref, test):
        if a.shape[-1] == 1:
            ssims.append(float(structural_similarity(a[..., 0], b[..., 0], data_range=1.0)))
        else:
            ssims.append(float(structural_similarity(a, b, data_range=1.0, channel_axis=-1)))
    ref_l = reference_latents.double()
    rel = float((latents.double() - ref_l).norm() / ref_l.norm().clamp_min(1e-30))
    return Quality(psnr_db=psnr, ssim=float(np.mean(ssims)), rel_l2=rel)


def range_psnr(got: torch.Tensor, want: torch.Tensor) -> float:
    """PSNR (dB) of ``got`` against ``want`` with the range of ``want`` as the peak, for
    tensors of any scale (latents); inf when identical."""
    mse = float((got.double() - want.double()).pow(2).mean())
    peak = float(want.max() - want.min())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)
