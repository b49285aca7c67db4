"""Parallel attention for diffusers DiTs (Flux, SD3, PixArt, CogVideoX) on compressed_comm.

``parallelize(transformer, transport, ParallelConfig(...))`` makes one rank's copy of a
diffusers transformer compute only its share of the image tokens, with patch-parallel
(sync, DistriFusion-style async), ring or Ulysses attention whose K/V exchange is raw or
residual-compressed. diffusers itself is imported only when a model runs.
"""

from .attention import ParallelAttention, TokenSplit, token_split
from .parallel import PARALLELISMS, SUPPORTED_MODELS, DiTParallel, ParallelConfig, parallelize

__all__ = ["parallelize", "ParallelConfig", "DiTParallel", "ParallelAttention", "TokenSplit",
           "token_split", "PARALLELISMS", "SUPPORTED_MODELS"]
