"""Adapters: bindings of compressed_comm to diffusers DiTs and to xDiT (xfuser).

Imports the core; diffusers, xfuser and yunchang are imported lazily inside the functions
that need them. Nothing here yet: the bindings come with the parallel-attention work.
"""

__all__: list[str] = []
