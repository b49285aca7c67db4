"""``codec="auto"``: the pure part -- which candidates a spec names, and which of them a
stream sends given what the link and the codecs cost.

Nothing here measures or talks to peers: :func:`decide` is a function of its arguments
alone, so every rank that feeds it the same agreed numbers (the per-step control exchange,
:mod:`compressed_comm.autopolicy`) picks the same codec, and every payload size is known
in advance.

The estimate of one candidate for one message of a stream (all in seconds)::

    encode  = encode_cost[codec] * raw_bytes
    wire    = latency + fan * wire_bytes / bandwidth
    decode  = decode_cost[codec] * raw_bytes * fan
    total   = encode + max(0, wire - hidden) + decode

``fan`` is how many copies of the message one rank moves and decodes (``world - 1`` for an
all-gather or a ring pass, 1 for point-to-point and all-to-all), ``hidden`` the compute an
asynchronous exchange overlaps. The candidate with the smallest total wins; ties go to the
earlier candidate in the spec (raw first), so an idle link never loses accuracy. Estimates
are noisy, so two margins keep decisions still: raw is kept while within ``margin`` of the
best (it is exact and costs no codec time), and so is the ``incumbent`` (the stream's last
choice; every rank holding the stream knows it), so that near-equal candidates do not
alternate step after step.

**Quality budget.** A candidate whose error breaks the budget is excluded (its estimate is
marked "over budget"; :func:`admissible`). The budget is ``max_rel_error``
(:class:`~compressed_comm.CompressionConfig`), or by default a ``floor``, "at least as
accurate as ``floor``" (``"binary"`` unless an :class:`~compressed_comm.autopolicy.AutoPolicy`
is given another). Raw (``identity``, lossless) is always admitted.

Tracked error exists only for the codec in use, so under a floor the quantising codecs
follow a fixed accuracy order, :data:`ACCURACY_ORDER` (identity > int8 > int4 > int2 >
binary): every ranked codec less accurate than the floor is excluded. The other codecs
(``lowrank``, ``lowrankq``, ``topk``, ``fp8``) are unranked: their error, and under
``max_rel_error`` every candidate's, is measured by *shadow encoding*
(:meth:`compressed_comm.autopolicy.Meter.shadow`, :func:`shadowed`): every
:data:`SHADOW_EVERY` steps, each stream of a rank encodes its message's residual through each
candidate to check on a scratch copy as well (the stream's reference, codec state and wire
are untouched) and measures the relative error ``||x - reconstruction|| / ||x||`` that
message would have left, the error ``track_error`` records for the codec in use. The ranks
agree, per candidate, on the largest error any rank measured on any of its streams (the
control block has one slot per candidate, not per stream). Then:

* under ``max_rel_error``: a candidate is admitted while its agreed error is at most
  ``max_rel_error``; one not measured yet is excluded (raw until the first shadow step);
* under a floor: an unranked candidate is admitted while its agreed error is at most the
  floor codec's (which is shadow-encoded too where it is a candidate); without both
  measurements it is admitted only under the default floor ``"binary"``.

Shadow encoding costs, per stream every :data:`SHADOW_EVERY` steps on the sending rank, a
copy of the prediction and one encode and reconstruction-error pass per checked candidate
(on CUDA a host sync each); its time is in
:attr:`compressed_comm.StreamStats.shadow_seconds`. Measured on this machine's CPU (one
torch thread, a (1024, 3072) float32 stream sending int4 at 7.1 ms per encode): a shadow
step of bare ``"auto"`` (``binary`` and ``lowrank:8`` checked) takes 34 ms, 0.6x an encode
per step averaged over 8 steps; with ``max_rel_error`` (int4, int2, binary, lowrank:8
checked) 59 ms, about 1x. With no unranked candidate and no ``max_rel_error`` nothing is
shadow-encoded.

**Hidden compute.** ``hidden`` is measured per collective from the traffic
(:mod:`compressed_comm.autopolicy`): the time between posting a transfer and the caller's
wait for it, during which the caller computed (zero, up to scheduling noise, for a
collective waited on at once). An asynchronous all-gather waited on a step later
(``+async``) then prices only the wire time its compute does not cover.

**Switching** (:meth:`compressed_comm.stream.StreamEncoder.choose`). A switch changes
nothing but the codec of the next residual: it is taken against the same reference, so
sender and receiver references stay bit-identical. Raw (the lossless ``identity``
candidate) is sent as a keyframe: the tensor itself, after which both references are exact.
The keyframe schedule (warmup, period, spread slices) belongs to the stream's message
numbers, not to a codec, so a slice falls on the same message whatever is chosen; its other
rows go through the chosen codec, and a slice that falls on a raw message is covered by it.
``lowrank``'s warm start (the sender's basis) is kept per candidate across switches: when
lowrank is chosen again its subspace iteration starts from the basis of its last message,
however long ago (it only speeds the iteration up; the wire does not depend on it).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .codecs import get_codec

__all__ = ["ACCURACY_ORDER", "DEFAULT_CANDIDATES", "MAX_CANDIDATES", "MAX_TIMED",
           "MAX_HIDDEN", "SHADOW_EVERY", "Link", "Cost", "Candidate", "Estimate", "Decision",
           "Report", "is_auto", "parse_auto", "admissible", "check_budget", "shadowed",
           "hidden_slot",
           "decide", "fit_link"]

#: the quantising codecs, most accurate first
ACCURACY_ORDER: tuple[str, ...] = ("identity", "int8", "int4", "int2", "binary")
#: what a bare ``"auto"`` chooses among
DEFAULT_CANDIDATES: tuple[str, ...] = ("identity", "int4", "int2", "binary", "lowrank:8")
#: the most candidates a spec may name (the control block has a slot for each)
MAX_CANDIDATES = 8
#: the transfers of a step whose times a rank reports one by one
MAX_TIMED = 8
#: the slots of hidden compute in the control block (collectives share them by name hash)
MAX_HIDDEN = 16
#: the default number of steps between two shadow encodings (the quality budget's check)
SHADOW_EVERY = 8


def is_auto(spec: object) -> bool:
    """Whether ``spec`` is an auto spec (``"auto"`` or ``"auto:..."``)."""
    return isinstance(spec, str) and spec.strip().lower().split(":", 1)[0] == "auto"


def parse_auto(spec: str) -> tuple[str, ...]:
    """The candidate codec specs of the auto spec ``spec``, normalised (``raw`` is written
    ``identity``), raw first: ``"auto"`` gives :data:`DEFAULT_CANDIDATES`,
    ``"auto:int4,binary"`` gives ``("identity", "int4", "binary")`` -- raw is always a
    candidate. Raises ``ValueError`` for an empty list, an unknown or repeated codec, or
    more than :data:`MAX_CANDIDATES`."""
    if not is_auto(spec):
        raise ValueError(f"not an auto codec spec: {spec!r}; expected 'auto' or "
                         f"'auto:raw,int4,int2,binary,lowrank:8'")
    _, colon, rest = spec.strip().lower().partition(":")
    if not colon:
        return DEFAULT_CANDIDATES
    names = [n.strip() for n in rest.split(",")]
    if not rest.strip() or any(not n for n in names):
        raise ValueError(f"codec spec {spec!r}: empty candidate; expected a comma-separated "
                         f"list such as 'auto:raw,int4,int2,binary,lowrank:8'")
    specs: list[str] = []
    for name in names:
        if is_auto(name):
            raise ValueError(f"codec spec {spec!r}: 'auto' cannot be its own candidate")
        try:
            canonical = "identity" if name == "raw" else get_codec(name).spec
        except ValueError as e:
            raise ValueError(f"codec spec {spec!r}: candidate {name!r}: {e}") from None
        if canonical in specs:
            raise ValueError(f"codec spec {spec!r}: candidate {name!r} is named twice")
        specs.append(canonical)
    if "identity" in specs:
        specs.remove("identity")
    specs.insert(0, "identity")
    if len(specs) > MAX_CANDIDATES:
        raise ValueError(f"codec spec {spec!r}: {len(specs)} candidates (raw included); at "
                         f"most {MAX_CANDIDATES}")
    return tuple(specs)


def admissible(spec: str, floor: str = "binary", *,
               errors: Mapping[str, float] | None = None,
               max_rel_error: float | None = None) -> bool:
    """Whether codec ``spec`` meets the quality budget (module docstring): raw always; under
    ``max_rel_error`` a candidate whose measured error (``errors``, by spec: the agreed
    shadow measurements) is at most that, an unmeasured one never; otherwise "at least as
    accurate as ``floor``" (a codec of :data:`ACCURACY_ORDER`): ranked codecs by that
    order, unranked ones by their measured error against the floor codec's, and while one
    of the two is unmeasured only under ``floor="binary"``."""
    if floor not in ACCURACY_ORDER:
        raise ValueError(f"quality floor must be one of {', '.join(ACCURACY_ORDER)}; got "
                         f"{floor!r}")
    check_budget(max_rel_error)
    if spec == "identity":
        return True
    errors = errors or {}
    if max_rel_error is not None:
        error = errors.get(spec)
        return error is not None and error <= max_rel_error
    if spec in ACCURACY_ORDER:
        return ACCURACY_ORDER.index(spec) <= ACCURACY_ORDER.index(floor)
    error, bound = errors.get(spec), errors.get(floor)
    if error is not None and bound is not None:
        return error <= bound
    return floor == ACCURACY_ORDER[-1]


def check_budget(max_rel_error: float | None) -> None:
    """Raise ``ValueError`` unless ``max_rel_error`` is None or a positive finite number."""
    if max_rel_error is None:
        return
    if (isinstance(max_rel_error, bool) or not isinstance(max_rel_error, (int, float))
            or not math.isfinite(max_rel_error) or max_rel_error <= 0):
        raise ValueError(f"max_rel_error must be None or a positive finite number (a relative "
                         f"L2 error such as 0.05); got {max_rel_error!r}")


def shadowed(candidates: Sequence[str], floor: str = "binary",
             max_rel_error: float | None = None) -> tuple[str, ...]:
    """The candidates whose error shadow encoding measures (module docstring): under
    ``max_rel_error`` all but raw; otherwise the unranked ones, and the floor codec beside
    them where it is a candidate (their yardstick); none without an unranked candidate."""
    if max_rel_error is not None:
        return tuple(c for c in candidates if c != "identity")
    unranked = [c for c in candidates if c not in ACCURACY_ORDER]
    if not unranked or floor == "identity":
        return ()
    return tuple(c for c in candidates if c in unranked or c == floor)


def hidden_slot(op: str, name: str) -> int:
    """The control block's slot of hidden compute for the collective ``op`` on stream
    ``name`` (collectives whose names hash alike share one: the smallest counts)."""
    return zlib.crc32(f"{op}:{name}".encode()) % MAX_HIDDEN


@dataclass(frozen=True)
class Link:
    """What one transfer costs on the wire: ``latency`` seconds plus bytes / ``bandwidth``
    (bytes per second)."""

    bandwidth: float
    latency: float = 0.0


@dataclass(frozen=True)
class Cost:
    """A codec's cost on this device, in seconds per input (raw) byte."""

    encode: float
    decode: float


@dataclass(frozen=True)
class Report:
    """One rank's measurements over one step, as its control block carries them.

    ``link_*``: the transfers it waited on at once (operations, bytes sent, nanoseconds
    from post to completion); ``encode_ps``/``decode_ps``: per candidate slot (the spec's
    order), its codec's cost in picoseconds per input byte, 0 where not measured yet;
    ``control_*``: the bytes it sent in the previous control exchange and its nanoseconds
    (a tiny transfer: what the link's latency is fitted from); ``timed_bytes``/``timed_us``:
    the first :data:`MAX_TIMED` of the step's timed transfers one by one (bytes sent,
    microseconds), so that each collective's time can be taken from the rank that arrived
    last (the others' include waiting for it); ``error_ppm``: per candidate slot, the
    largest relative error shadow encoding measured on any of its streams in the step, in
    millionths (0: not measured); ``hidden_us``: per slot of :func:`hidden_slot`, the
    microseconds of compute that the step's transfers of those collectives overlapped,
    post to wait (0: none waited on; measured values are >= 1)."""

    link_ops: int = 0
    link_bytes: int = 0
    link_ns: int = 0
    encode_ps: tuple[int, ...] = ()
    decode_ps: tuple[int, ...] = ()
    control_bytes: int = 0
    control_ns: int = 0
    timed_bytes: tuple[int, ...] = ()
    timed_us: tuple[int, ...] = ()
    error_ppm: tuple[int, ...] = ()
    hidden_us: tuple[int, ...] = ()


@dataclass(frozen=True)
class Candidate:
    """One codec a stream could send its next message through.

    ``spec`` names it (the candidate); ``cost_spec`` is the codec whose cost applies (the
    keyframe codec where the message is a keyframe); ``wire_bytes`` the payload size."""

    spec: str
    wire_bytes: int
    cost_spec: str | None = None


@dataclass(frozen=True)
class Estimate:
    """The estimated seconds of one candidate (see the module docstring)."""

    spec: str
    wire_bytes: int
    encode: float
    wire: float
    decode: float
    total: float
    admitted: bool
    #: the agreed shadow-encoding error (None: not measured)
    error: float | None = None
    #: the seconds of wire time credited as hidden behind compute
    hidden: float = 0.0

    def __str__(self) -> str:
        mark = "" if self.admitted else " (over budget)"
        err = "" if self.error is None else f", err {self.error:.4g}"
        hid = f" - hidden {self.hidden * 1e3:.3f}" if self.hidden > 0 else ""
        return (f"{self.spec}: {self.total * 1e3:.3f} ms = enc {self.encode * 1e3:.3f} + wire "
                f"{self.wire * 1e3:.3f}{hid} + dec {self.decode * 1e3:.3f}, "
                f"{self.wire_bytes} B{err}{mark}")


@dataclass(frozen=True)
class Decision:
    """The codec a stream sends a message through, and why."""

    spec: str
    reason: str
    estimates: tuple[Estimate, ...] = ()

    def __str__(self) -> str:
        return f"{self.spec} ({self.reason})"

    def explain(self) -> str:
        """The decision with every candidate's estimate."""
        return "; ".join([str(self), *map(str, self.estimates)])


def decide(candidates: Sequence[Candidate], link: Link, costs: Mapping[str, Cost], *,
           raw_bytes: int, fan: int = 1, hidden: float = 0.0,
           floor: str = "binary", incumbent: str | None = None,
           margin: float = 0.0, errors: Mapping[str, float] | None = None,
           max_rel_error: float | None = None) -> Decision:
    """The admissible candidate with the smallest estimated total time (module docstring);
    ties go to the earlier candidate. ``costs`` by codec spec (a candidate's ``cost_spec``,
    else its ``spec``); a codec missing from ``costs`` is priced at zero. ``errors`` (agreed
    shadow-encoding errors by spec), ``max_rel_error`` and ``floor`` make the budget
    (:func:`admissible`). Deterministic: a function of its arguments alone."""
    if not hidden >= 0 or not math.isfinite(hidden):
        raise ValueError(f"hidden must be non-negative seconds; got {hidden!r}")
    errors = errors or {}
    if not candidates:
        raise ValueError("decide needs at least one candidate")
    if link.bandwidth <= 0 or not math.isfinite(link.bandwidth):
        raise ValueError(f"link bandwidth must be a positive number of bytes/s; got "
                         f"{link.bandwidth!r}")
    estimates = []
    for c in candidates:
        cost = costs.get(c.cost_spec or c.spec, Cost(0.0, 0.0))
        encode = cost.encode * raw_bytes
        wire = link.latency + fan * c.wire_bytes / link.bandwidth
        decode = cost.decode * raw_bytes * fan
        total = encode + max(0.0, wire - hidden) + decode
        estimates.append(Estimate(c.spec, c.wire_bytes, encode, wire, decode, total,
                                  admissible(c.spec, floor, errors=errors,
                                             max_rel_error=max_rel_error),
                                  errors.get(c.spec), min(hidden, wire)))
    admitted = [e for e in estimates if e.admitted]
    if not admitted:
        budget = (f"max_rel_error {max_rel_error}" if max_rel_error is not None
                  else f"the quality floor {floor!r}")
        raise ValueError(f"no candidate meets {budget}: "
                         f"{', '.join(str(e) for e in estimates)}; raw ('identity') always "
                         f"does: make it a candidate")
    best = min(admitted, key=lambda e: e.total)  # min keeps the first of equals
    raw = next((e for e in estimates if e.spec == "identity"), None)
    for keep, why in ((raw, "raw kept"), (next((e for e in admitted if e.spec == incumbent),
                                                None), f"{incumbent} kept")):
        if keep is not None and keep is not best and keep.total <= best.total * (1 + margin):
            return Decision(keep.spec, f"{why}: within {margin:.0%} of {best.spec}",
                            tuple(estimates))
    if raw is None or best is raw:
        reason = "fastest" if raw is None or len(admitted) == 1 else "raw is fastest"
    else:
        reason = f"{raw.total / best.total:.2f}x faster than raw" if best.total > 0 \
            else "faster than raw"
    return Decision(best.spec, reason, tuple(estimates))


def fit_link(samples: Sequence[tuple[int, int, float]]) -> Link | None:
    """The link that explains ``samples`` of ``(operations, bytes, seconds)`` best: a least
    squares fit of ``seconds = operations * latency + bytes / bandwidth`` with a
    non-negative latency (zero where the samples cannot tell it from bandwidth). None
    without a sample that moved bytes in measurable time."""
    rows = [(float(o), float(b), float(t)) for o, b, t in samples if b > 0 and t > 0]
    if not rows:
        return None
    soo = sum(o * o for o, _, _ in rows)
    sbb = sum(b * b for _, b, _ in rows)
    sob = sum(o * b for o, b, _ in rows)
    sot = sum(o * t for o, _, t in rows)
    sbt = sum(b * t for _, b, t in rows)
    det = soo * sbb - sob * sob
    if det > 1e-9 * soo * sbb:
        latency = (sot * sbb - sob * sbt) / det
        per_byte = (soo * sbt - sob * sot) / det
        if latency >= 0 and per_byte > 0:
            return Link(1.0 / per_byte, latency)
    return Link(sbb / sbt)  # no latency term: seconds = bytes / bandwidth
