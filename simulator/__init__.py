"""Simulator: runs compressed_comm workloads in one process and reports traffic and quality.

For now it holds the codec demo (``python -m simulator``): a drifting activation sent
through one residual stream per codec. Imports the core (and, later, the adapters); the
core never imports this package.
"""

from .codec_demo import CodecResult, DriftingActivation, run_codec_demo

__all__ = ["CodecResult", "DriftingActivation", "run_codec_demo"]
