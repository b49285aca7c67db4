"""Residual compression for an unmodified xDiT (xfuser): ``enable_compression(pipe, config)``.

Binds :class:`~compressed_comm.CompressedGroup` to xDiT's communication points
(:data:`HOOK_POINTS`): the Ulysses all-to-all, torch's context-parallel ring rotater,
yunchang's ring and PipeFusion's point-to-point patches. Patch parallelism (which xDiT does
not have) comes from :mod:`adapters.dit`. xfuser, yunchang and diffusers are imported only
when a hook point is bound, so ``import adapters.xdit`` works without them.
"""

from .compression import XDiTCompression, enable_compression
from .points import HOOK_POINTS, KNOWN_VERSIONS, HookPoint, HookPointError

__all__ = [
           "HOOK_POINTS",
           "KNOWN_VERSIONS",
           "HookPoint",
           "HookPointError",
           "XDiTCompression",
           "enable_compression",
]
