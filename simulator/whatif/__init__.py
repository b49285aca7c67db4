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

from .efficiency import CALIBRATED, IDEAL, Efficiency
from .models import (
    MODEL_SPECS,
    WIRE_DTYPE,
    ModelSpec,
    compute_seconds,
    get_model,
    local_image_tokens,
    step_flops,
)
from .pricing import best_methods, run_what_if
from .report import MethodRow, WhatIfReport
from .traffic import CODEC_PASSES, PARALLELISMS, Traffic, step_traffic

__all__ = [
    "ModelSpec",
    "MODEL_SPECS",
    "PARALLELISMS",
    "CODEC_PASSES",
    "WIRE_DTYPE",
    "get_model",
    "local_image_tokens",
    "step_flops",
    "compute_seconds",
    "Traffic",
    "step_traffic",
    "MethodRow",
    "WhatIfReport",
    "run_what_if",
    "best_methods",
    "Efficiency",
    "CALIBRATED",
    "IDEAL",
]
