"""Simulator: parallel diffusion inference on N virtual ranks in one process.

``python -m simulator`` (see :mod:`simulator.cli`) runs a diffusers transformer -- by
default the embedded digits model (:mod:`simulator.digits`) -- on one device and on N
virtual ranks (:mod:`compressed_comm.testing`) with raw, DistriFusion-style and compressed
K/V exchange, and reports traffic, quality (:mod:`simulator.metrics`) and estimated step
time on real interconnects (:mod:`simulator.network`); ``--what-if`` estimates real models
(:mod:`simulator.whatif`). ``python -m simulator.codec_demo`` compares the codecs on one
drifting activation. Imports the core and the adapters; neither imports this package.
"""

from compressed_comm.testing import Fabric, InProcessTransport, run_ranks

__all__ = ["Fabric", "InProcessTransport", "run_ranks"]
