"""Simulator: runs compressed_comm workloads in one process and reports traffic and quality.

It holds N virtual ranks in one process (:mod:`simulator.inprocess`) and, for now, the
codec demo (``python -m simulator``): a drifting activation sent through one residual
stream per codec. Imports the core (and, later, the adapters); the core never imports
this package.
"""

from .codec_demo import CodecResult, DriftingActivation, run_codec_demo
from .inprocess import Fabric, InProcessTransport, run_ranks

__all__ = ["CodecResult", "DriftingActivation", "run_codec_demo", "Fabric",
           "InProcessTransport", "run_ranks"]
