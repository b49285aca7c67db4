"""Adapters: bindings of compressed_comm to diffusers DiTs (and, later, xDiT).

* :mod:`adapters.dit` -- patch-parallel (sync or DistriFusion-style), ring and Ulysses
  attention for diffusers' Flux, SD3, PixArt and CogVideoX transformers, with raw or
  residual-compressed K/V exchange.

Imports the core; diffusers, xfuser and yunchang are imported lazily inside the functions
that need them, so ``import adapters`` works without them.
"""

__all__: list[str] = []
