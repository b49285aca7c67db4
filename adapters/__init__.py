"""Adapters: bindings of compressed_comm to diffusers DiTs and to xDiT.

* :mod:`adapters.dit` -- patch-parallel (sync or DistriFusion-style), ring and Ulysses
  attention for diffusers' Flux, SD3, PixArt and CogVideoX transformers, with raw or
  residual-compressed K/V exchange.
* :mod:`adapters.xdit` -- ``enable_compression(pipe, config)``: an unmodified xDiT's
  Ulysses all-to-all, ring attention (torch's and yunchang's) and PipeFusion transfers,
  diffusers' context parallelism and DTensor's reductions, residual-compressed.
* :mod:`adapters.hooks` -- the hook points ``enable_compression`` binds, one module per
  library (xfuser, torch's ring, yunchang, diffusers, DTensor).
* :mod:`adapters.stale` -- DistriFusion's stale all-gather, shared by both.

Imports the core; diffusers, xfuser and yunchang are imported lazily inside the functions
that need them, so ``import adapters`` works without them.
"""

__all__: list[str] = []
