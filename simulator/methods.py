"""The method grammar: how K/V travel between ranks, as the simulator, the what-if and the
benchmarks name it.

* ``raw`` -- exact tensors, synchronous;
* ``distrifusion`` -- exact tensors, one step stale after the warmup steps (DistriFusion);
* ``<codec spec>`` -- residual compression (e.g. ``binary``, ``lowrank:8``), synchronous;
* ``<codec spec>+async`` -- residual compression, one step stale after the warmup steps;
* ``auto`` (and ``auto+async``) -- ``codec="auto"``, its default candidates (a candidate
  list has commas, which separate methods here).

Stale K/V need an exchange that can run one step behind: the all-gather of patch
parallelism, or of diffusers' ring (:data:`STALE_PARALLELISMS`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from compressed_comm import get_codec
from compressed_comm.auto import is_auto

__all__ = ["Method", "RAW", "DISTRIFUSION", "STALE_PARALLELISMS", "parse_method",
           "parse_methods", "method_list"]

ASYNC = "+async"
#: Parallelisms whose K/V exchange is an all-gather that can go one step stale: patch
#: parallelism (``adapters.dit``, the what-if) and diffusers' ring
#: (``enable_compression(asynchronous=True)``, ``bench/e2e.py``'s ``cp-ring``).
STALE_PARALLELISMS = frozenset({"patch", "cp-ring"})
_FORMS = "raw, distrifusion, a codec spec (e.g. binary, lowrank:8) or <codec spec>+async"


@dataclass(frozen=True)
class Method:
    """One way to exchange K/V: its canonical name, codec and staleness."""

    name: str
    codec: str | None   # None: exact tensors
    stale: bool         # one step stale after the warmup steps (DistriFusion)

    def runs_on(self, parallelism: str) -> bool:
        """Whether ``parallelism`` can run this method (stale K/V: :data:`STALE_PARALLELISMS`)."""
        return not self.stale or parallelism in STALE_PARALLELISMS

    def check(self, parallelism: str) -> None:
        """``ValueError`` saying why, unless ``parallelism`` can run this method."""
        if not self.runs_on(parallelism):
            what = "+async" if self.codec is not None else "distrifusion"
            raise ValueError(
                f"method {self.name!r}: {what} needs patch parallelism (or diffusers' ring, "
                f"cp-ring), not {parallelism!r}: its one-step-stale K/V overlap an all-gather")


RAW = Method("raw", None, False)
DISTRIFUSION = Method("distrifusion", None, True)


def parse_method(text: str) -> Method:
    """The method ``text`` names (case-insensitive); ``ValueError`` naming it and the forms."""
    if not isinstance(text, str):
        raise TypeError(f"a method is a string ({_FORMS}), got {type(text).__name__}")
    name = text.strip().lower()
    for fixed in (RAW, DISTRIFUSION):
        if name == fixed.name:
            return fixed
    stale = name.endswith(ASYNC)
    codec = name.removesuffix(ASYNC).strip()
    if codec in (RAW.name, DISTRIFUSION.name):
        raise ValueError(f"bad method {text!r}: +async follows a codec spec ({RAW.name}+async "
                         f"is {DISTRIFUSION.name}); a method is {_FORMS}")
    try:
        if is_auto(codec):
            if codec != "auto":
                raise ValueError("only the default candidates ('auto') in a method list")
        else:
            get_codec(codec)
    except ValueError as e:
        raise ValueError(f"bad method {text!r}: {e}; a method is {_FORMS}") from None
    return Method(codec + ASYNC if stale else codec, codec, stale)


def parse_methods(texts: str | Iterable[str]) -> list[Method]:
    """Every method of ``texts``: a comma-separated string or a sequence of names."""
    if isinstance(texts, str):
        texts = texts.split(",")
    return [parse_method(t) for t in texts if t.strip()]


def method_list(methods: Iterable[Method], *, distrifusion: bool = True) -> list[Method]:
    """``raw``, ``distrifusion`` (if asked) and then ``methods``, each name once, in order."""
    out: dict[str, Method] = {RAW.name: RAW}
    if distrifusion:
        out[DISTRIFUSION.name] = DISTRIFUSION
    for method in methods:
        out.setdefault(method.name, method)
    return list(out.values())
