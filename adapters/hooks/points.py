"""Hook points and the patching that rebinds them.

Each hook point is a named attribute in a third-party module (or on one of its classes).
Enabling replaces it with a compressing version that carries a marker naming its handle;
disabling puts the original back. The state therefore lives on the patched attributes
themselves, not in this package: a second enable on a patched point is detected there.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from compressed_comm import CompressedCommError

__all__ = ["KNOWN_VERSIONS", "HookPoint", "HookPointError", "Patch", "installed_version",
           "load_module", "make_patch", "resolve_owner"]

#: versions each hook point was tested with (tests/test_xdit.py)
KNOWN_VERSIONS: dict[str, tuple[str, ...]] = {
    "xfuser": ("0.7.0",),
    "yunchang": ("0.6.4",),
    "torch": ("2.13.0",),
    "diffusers": ("0.42.1",),
}

#: where the handle that owns a patched attribute is recorded on the replacement
MARK = "__compressed_comm_handle__"


class HookPointError(CompressedCommError, RuntimeError):
    """A hook point is missing (moved in this version), unavailable, or already enabled."""


@dataclass(frozen=True)
class HookPoint:
    """One place in a library where activations cross ranks."""

    name: str
    library: str          # the distribution whose version matters
    module: str           # the module that owns the attribute(s)
    owner: str            # "" for module globals, else a class in ``module``
    attrs: tuple[str, ...]
    what: str             # one line for errors and the README

    def describe(self) -> str:
        where = f"{self.module}.{self.owner}" if self.owner else self.module
        return f"{where}.{{{', '.join(self.attrs)}}}" if len(self.attrs) > 1 else \
            f"{where}.{self.attrs[0]}"


def installed_version(library: str) -> str:
    """The installed version of ``library``, or ``"not installed"``."""
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _known(library: str) -> str:
    return ", ".join(KNOWN_VERSIONS.get(library, ())) or "none recorded"


def load_module(point: HookPoint, *, required: bool) -> Any | None:
    """The module owning ``point``; None if it is unavailable and not ``required``.

    xfuser modules are only imported when xfuser is already imported (a program that
    serves with xDiT has done so); elsewhere importing it may fail at import time.
    """
    if not required and point.library == "xfuser" and "xfuser" not in sys.modules:
        return None
    try:
        return importlib.import_module(point.module)
    except Exception as e:  # xfuser raises NotImplementedError without an accelerator
        if not required:
            return None
        raise HookPointError(
            f"hook point {point.name!r} needs {point.module}, which failed to import "
            f"({type(e).__name__}: {e}); {point.library} {installed_version(point.library)} "
            f"is installed, known to work: {_known(point.library)}") from e


def resolve_owner(point: HookPoint, module: Any) -> Any:
    """The module or class holding ``point``'s attributes; a clear error if one moved."""
    owner = module
    if point.owner:
        owner = getattr(module, point.owner, None)
        if owner is None:
            raise _moved(point, f"{point.module} has no attribute {point.owner!r}")
    for attr in point.attrs:
        if not hasattr(owner, attr):
            where = f"{point.module}.{point.owner}" if point.owner else point.module
            raise _moved(point, f"{where} has no attribute {attr!r}")
    return owner


def _moved(point: HookPoint, why: str) -> HookPointError:
    return HookPointError(
        f"cannot bind the {point.name!r} hook point ({point.what}): {why}. The hook point "
        f"moved in {point.library} {installed_version(point.library)}; known to work: "
        f"{point.library} {_known(point.library)}")


@dataclass
class Patch:
    """One attribute replaced on a module or class; :meth:`revert` restores it."""

    owner: Any
    attr: str
    original: Any
    replacement: Any
    applied: bool = field(default=False)

    def apply(self) -> None:
        setattr(self.owner, self.attr, self.replacement)
        self.applied = True

    def revert(self) -> None:
        if self.applied and _raw(self.owner, self.attr) is self.replacement:
            setattr(self.owner, self.attr, self.original)
        self.applied = False


def _raw(owner: Any, attr: str) -> Any:
    """The attribute as stored (a class's function, not a bound method)."""
    if isinstance(owner, type):
        for klass in owner.__mro__:
            if attr in vars(klass):
                return vars(klass)[attr]
    return getattr(owner, attr)


def make_patch(owner: Any, attr: str, handle: object,
               build: Callable[[Any], Callable[..., Any]]) -> Patch:
    """A patch replacing ``owner.attr`` by ``build(original)``, marked as ``handle``'s.

    Raises :class:`HookPointError` if another handle already holds the attribute.
    """
    original = _raw(owner, attr)
    holder = getattr(original, MARK, None)
    if holder is not None:
        name = getattr(owner, "__name__", type(owner).__name__)
        raise HookPointError(
            f"{name}.{attr} is already compressed by {holder!r}; call its disable() before "
            "enabling compression again")
    replacement = build(original)
    setattr(replacement, MARK, handle)
    return Patch(owner, attr, original, replacement)
