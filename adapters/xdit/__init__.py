"""Residual compression for an unmodified xDiT (xfuser): ``enable_compression(pipe, config)``.

Binds :class:`~compressed_comm.CompressedGroup` to the communication points of the
libraries xDiT and diffusers run on (:data:`HOOK_POINTS`, one module per library in
:mod:`adapters.hooks`): the Ulysses all-to-all, torch's context-parallel ring rotater,
yunchang's ring, PipeFusion's point-to-point patches, diffusers' context parallelism and
DTensor's reductions. Patch parallelism (which xDiT does not have) comes from
:mod:`adapters.dit`. xfuser, yunchang and diffusers are imported only when a hook point is
bound, so ``import adapters.xdit`` works without them.
"""

from ..hooks import HOOK_POINTS, KNOWN_VERSIONS, HookPoint, HookPointError
from .compression import XDiTCompression, enable_compression

__all__ = [
           "HOOK_POINTS",
           "KNOWN_VERSIONS",
           "HookPoint",
           "HookPointError",
           "XDiTCompression",
           "enable_compression",
]
