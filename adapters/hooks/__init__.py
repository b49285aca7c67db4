"""Hook points: where other libraries' code sends activations between ranks, and the
compressing replacements :func:`adapters.xdit.enable_compression` binds there.

One module per library, each with its points and their installers:

* :mod:`.xfuser` -- xDiT's Ulysses all-to-all and PipeFusion's patch transfers;
* :mod:`.torch_ring` -- torch's context-parallel ring attention (xDiT's ring);
* :mod:`.yunchang` -- yunchang's ring and Ulysses (xDiT's long-context attention);
* :mod:`.diffusers_cp` -- diffusers' own context parallelism (Ulysses and ring);
* :mod:`.dtensor` -- DTensor's reductions (tensor parallelism).

:mod:`.points` patches and restores the attributes; :mod:`.base` holds
:class:`~.base.HookHandle`, the one thing installers ask of the handle. Every replacement
takes its :class:`~compressed_comm.CompressedGroup` from the handle by the process group the
original call would have used, names its stream from the attention layer being run
(``<layer>.<kind><n>``: the n-th such call of that layer in this step) and falls back to the
original code for what it cannot compress: other dtypes, tensors that need gradients,
shapes that do not split. The fallback is the same decision on every rank, since every rank
runs the same program on the same shapes. The libraries are imported only when a point is
bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import diffusers_cp, dtensor, torch_ring, xfuser, yunchang
from .base import HookHandle
from .points import KNOWN_VERSIONS, HookPoint, HookPointError, Patch

__all__ = ["HOOK_POINTS", "INSTALLERS", "KNOWN_VERSIONS", "HookHandle", "HookPoint",
           "HookPointError", "Patch"]

Installer = Callable[[HookHandle, Any], list[Patch]]

_BINDINGS: tuple[tuple[HookPoint, Installer], ...] = (
    (xfuser.ULYSSES, xfuser.install_ulysses),
    (torch_ring.TORCH_RING, torch_ring.install_torch_ring),
    (yunchang.YUNCHANG_RING, yunchang.install_yunchang_ring),
    (yunchang.YUNCHANG_ULYSSES, yunchang.install_yunchang_ulysses),
    (xfuser.PIPEFUSION, xfuser.install_pipefusion),
    (diffusers_cp.DIFFUSERS_ULYSSES, diffusers_cp.install_diffusers_ulysses),
    (diffusers_cp.DIFFUSERS_RING, diffusers_cp.install_diffusers_ring),
    (dtensor.DTENSOR_REDUCE, dtensor.install_dtensor_reduce),
)

#: every hook point by name, in binding order
HOOK_POINTS: dict[str, HookPoint] = {point.name: point for point, _ in _BINDINGS}

#: the installer of each hook point: ``install(handle, module) -> patches``
INSTALLERS: dict[str, Installer] = {point.name: install for point, install in _BINDINGS}
