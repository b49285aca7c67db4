"""``codec="auto"``: measuring on one rank and deciding alike on every rank.

* :class:`Meter` -- what this rank measured from its own traffic since the last step: the
  transfers it waited on at once (bytes and seconds, from post to completion), and the
  codec calls its streams already make (seconds per input byte). The first message
  encoded on this rank, and again one every ``reprobe_every`` steps, also times every
  candidate not used in the step on a scratch copy (the probe, timing the second of two
  calls: the first may compile kernels), so a codec is priced before it is first chosen
  and an unchosen codec's price does not rest on one old (possibly noisy) measurement.
  :meth:`Meter.report` packs it for the per-step control block.
* :class:`AutoPolicy` -- what the ranks agreed: :meth:`AutoPolicy.agree` folds every
  rank's report (the same blocks on every rank, so the same state everywhere) and
  :meth:`AutoPolicy.choose` decides a stream's next message with
  :func:`compressed_comm.auto.decide`.

**Agreement rules.** A collective's time includes how late its peers arrived; the rank
that arrived last waited only for the wire. So each rank reports its first
:data:`~compressed_comm.auto.MAX_TIMED` timed transfers one by one, and where every rank
timed as many (steps repeat their collectives, in order), the link sample of the step sums,
transfer by transfer, the *shortest* time any rank measured; otherwise it is the shortest
total any rank measured (with the most bytes and operations any rank sent). A codec is as
slow as its slowest rank: the agreed cost is the largest any rank reported (a decode cost
not measured yet is taken equal to the encode cost). The link is fitted
(:func:`~compressed_comm.auto.fit_link`) over the last ``window`` samples of the data
transfers and of the control exchanges (tiny: they pin the latency down, which the data
transfers of one codec alone cannot tell from bandwidth), so it follows a link that
changes. A step's control exchange
is reported in the next step's block (the block is packed before it runs). The largest
transfer of the last ``keep_large`` steps (a warmup or keyframe step's, or a raw probe's;
the newest of equals, so a raw probe on a link that changed replaces an all-raw step's from
before the change) stays in the fit too, as a sample of its own: small payloads alone
extrapolate raw's time badly, since their time is mostly latency and scheduling noise.
Where the ranks' timed transfers do not line up, the whole step is that sample.

**One codec across origins.** An all-gather or a ring pass needs one codec from every
origin (its slots are sized alike), so a group announces the shapes of such a collective
(:meth:`AutoPolicy.expect`) and the decision for each of its streams is made once, from the
largest origin's shape; other streams decide from their own.

**Raw probes.** Once a stream sends a small codec, raw's cost is only extrapolated from
small transfers, so every ``probe_every`` steps (staggered by stream) a stream whose raw
estimate is within ``probe_ratio`` of its choice sends raw once: a link that got faster is
then measured with large transfers. The estimate itself can be what is wrong: small
transfers carry scheduling delays that a fit reads as a slow link, so raw can look 10x
dearer than it is and would never be probed. So every stream also sends raw once every
``force_every`` steps (from step ``probe_every`` on, staggered by stream) whatever its
estimate. That costs at most one raw message per stream per ``force_every`` steps (24 by
default: on a link where raw is 10x the chosen codec, about 9/24 of one message's time per
stream and step, and nothing where raw is chosen anyway).

**Quality budget** (:mod:`compressed_comm.auto`). Every
:data:`~compressed_comm.auto.SHADOW_EVERY` steps (``shadow_every``; from the first step in
which a stream is past its warmup), each auto stream a rank sends also encodes its message's
residual through each candidate the budget checks (:func:`~compressed_comm.auto.shadowed`) on
scratch copies -- the stream's reference, codec states (deep-copied) and wire are untouched
-- and :meth:`Meter.shadow` keeps the relative error ``||x - reconstruction|| / ||x||`` each
would have left, the largest over the rank's streams. The control block carries it per
candidate slot, and :meth:`AutoPolicy.agree` keeps the largest any rank reported, per
candidate over all streams (per stream would not fit the fixed-size block): a candidate is
as inaccurate as its worst stream. It replaces the previous agreed error of that candidate,
so a candidate excluded while residuals were hard comes back once they are easy. The time
spent is each stream's :attr:`~compressed_comm.StreamStats.shadow_seconds` (and
:attr:`Meter.shadow_seconds` per rank).

**Hidden compute.** For each transfer of an all-gather, a ring pass or an all-to-all the
time from its post to the start of its wait is compute the caller ran while it was in
flight (an ``all_gather_async`` waited on a step later: the step's compute; a collective
waited on at once: about zero). :meth:`Meter.hidden` sums it per collective over the step,
the control block carries it in :data:`~compressed_comm.auto.MAX_HIDDEN` slots by name hash
(:func:`~compressed_comm.auto.hidden_slot`; collectives that share a slot report the
smallest), and the agreed value is the smallest any rank reported (none where only some
ranks waited on the slot's collectives: no rank is optimistic), passed to
:func:`~compressed_comm.auto.decide` as ``hidden`` for the streams of that collective.
Not covered: point-to-point streams (their receives are not timed) get no credit; the
credit is measured in the step its waits fall in (a step behind for ``+async``), and a
collective that shares its slot with one waited on at once gets none.

**Not measured yet**: a transfer that completed before its wait is not sampled for the
link (only that the link was fast enough is known). On CUDA, codec timings are of the host
calls (no synchronisation is added): only meaningful on CPU so far; shadow encoding
synchronises once per checked candidate (the error is read on the host).
"""

from __future__ import annotations

import copy
import math
import time
import zlib
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from .auto import (
    MAX_CANDIDATES,
    MAX_HIDDEN,
    MAX_TIMED,
    SHADOW_EVERY,
    Candidate,
    Cost,
    Decision,
    Link,
    Report,
    decide,
    fit_link,
    hidden_slot,
    shadowed,
)
from .codecs.base import as_2d
from .config import CompressionConfig
from .messages import MessageLayout

if TYPE_CHECKING:
    from .stream import StreamDecoder, StreamEncoder

__all__ = ["CodecMeter", "Meter", "AutoPolicy"]

_GATHERS = ("all_gather", "ring")


class CodecMeter(Protocol):
    """Where a stream with candidates reports the time its codec calls take."""

    def codec_time(self, spec: str, role: str, seconds: float, nbytes: int) -> None:
        """``role`` (``"encode"``/``"decode"``) of ``nbytes`` input bytes through codec
        ``spec`` took ``seconds``."""

    def due(self) -> bool:
        """Whether the next message encoded should :meth:`probe` first."""

    def probe(self, stream: StreamEncoder, x: torch.Tensor) -> None:
        """Time, on ``x``, the candidates not measured in this step."""

    def shadow_due(self) -> bool:
        """Whether the messages encoded in this step should :meth:`shadow` first."""

    def shadow(self, stream: StreamEncoder, x: torch.Tensor) -> None:
        """Measure, on ``x``, the error of the candidates the quality budget checks."""


class Meter:
    """This rank's measurements since its last report (see the module docstring)."""

    def __init__(self, candidates: Sequence[str], reprobe_every: int = 8, *,
                 shadowed: Sequence[str] = (), shadow_every: int = SHADOW_EVERY) -> None:
        self.candidates = tuple(candidates)
        self.reprobe_every = int(reprobe_every)
        #: the candidates whose error shadow encoding measures (:func:`~.auto.shadowed`)
        self.shadowed = tuple(shadowed)
        unknown = [s for s in self.shadowed if s not in self.candidates]
        if unknown:
            raise ValueError(f"shadowed codecs {unknown} are not among the candidates "
                             f"{', '.join(self.candidates)}")
        #: steps between two shadow encodings (0: never)
        self.shadow_every = int(shadow_every)
        #: seconds this rank spent shadow-encoding, in all
        self.shadow_seconds = 0.0
        self._shadow_pending = bool(self.shadowed) and self.shadow_every > 0
        # this step's shadow errors (spec -> largest over streams), whether any ran
        self._errors: dict[str, float] = {}
        self._shadowed_now = False
        self._shadow_wait = 0
        # this step's compute hidden behind transfers: (op, name) -> seconds
        self._hidden: dict[tuple[str, str], float] = {}
        self._reports = 0
        self._due = True  # the first message probes
        # this step's transfers: operations, bytes, seconds; the first ones one by one
        self._ops, self._bytes, self._seconds = 0, 0, 0.0
        self._timed: list[tuple[int, float]] = []
        # this step's codec calls: (spec, role) -> [seconds, bytes]
        self._codec: dict[tuple[str, str], list[float]] = {}
        # the last cost measured, picoseconds per byte: (spec, role) -> ps
        self._known: dict[tuple[str, str], int] = {}
        # the last control exchange: bytes sent, seconds
        self._control: tuple[int, float] = (0, 0.0)

    def control(self, nbytes: int, seconds: float) -> None:
        """The step's control exchange sent ``nbytes`` and took ``seconds``."""
        self._control = (int(nbytes), float(seconds))

    def transfer(self, nbytes: int, seconds: float) -> None:
        """A transfer of ``nbytes`` (sent by this rank) took ``seconds`` from post to
        completion, waited on at once."""
        self._ops += 1
        self._bytes += int(nbytes)
        self._seconds += float(seconds)
        if len(self._timed) < MAX_TIMED:
            self._timed.append((int(nbytes), float(seconds)))

    def codec_time(self, spec: str, role: str, seconds: float, nbytes: int) -> None:
        """Codec ``spec`` took ``seconds`` to ``role`` (encode/decode) ``nbytes``."""
        if spec in self.candidates and nbytes > 0:
            acc = self._codec.setdefault((spec, role), [0.0, 0.0])
            acc[0] += seconds
            acc[1] += nbytes

    def due(self) -> bool:
        """Whether the next message encoded should :meth:`probe` first."""
        return self._due

    def probe(self, stream: StreamEncoder, x: torch.Tensor) -> None:
        """Time one encode of ``x`` (a residual against a zero prediction, on scratch buffers:
        the stream is untouched) and one decode of its payload through every candidate not
        measured in this step. The prediction makes the calls those of a steady-state
        message, so the kernels a later switch runs are compiled here, not in its step."""
        self._due = False
        x2 = as_2d(x)
        zero = torch.zeros_like(x2)
        for spec, layout in stream.layouts.items():
            if (spec, "encode") in self._codec:
                continue
            codec = layout.codec
            pred = None if spec == "identity" else zero  # raw is sent as a keyframe
            scratch = torch.empty_like(x2)
            header = codec.header(stream.shape, stream.dtype)
            for _ in range(2):  # the first call may compile kernels: time the second
                start = time.perf_counter()
                payload = codec.emit(x2, stream.shape, pred, scratch, header,
                                     codec.new_state())
                encoded = time.perf_counter()
                codec.absorb(payload, header, pred, scratch)
                decoded = time.perf_counter()
            self.codec_time(spec, "encode", encoded - start, x.nbytes)
            self.codec_time(spec, "decode", decoded - encoded, x.nbytes)

    def shadow_due(self) -> bool:
        """Whether messages encoded in this step should :meth:`shadow` first: from the first
        step a stream is past its warmup in, then every :attr:`shadow_every` steps (never
        where that is 0, or no candidate is :attr:`shadowed`)."""
        return self._shadow_pending and self.shadow_every > 0 and bool(self.shadowed)

    def shadow(self, stream: StreamEncoder, x: torch.Tensor) -> None:
        """Encode the residual of ``x`` against ``stream``'s prediction through every
        :attr:`shadowed` candidate on scratch copies (reference, codec state and wire
        untouched) and keep the relative error ``||x - reconstruction|| / ||x||`` each would
        leave, the largest over this step's streams."""
        start = time.perf_counter()
        self._shadowed_now = True
        x2 = as_2d(x)
        for spec in self.shadowed:
            codec = stream.layouts[spec].codec
            pred = stream.prediction()
            # the prediction is also the target (as in order 1's encode)
            target = torch.empty_like(stream.reference) if pred is None else pred
            codec.emit(x2, stream.shape, None if pred is None else as_2d(pred), as_2d(target),
                       codec.header(stream.shape, stream.dtype),
                       copy.deepcopy(stream._states[spec]))
            error = float(stream._kernels.error_norms(x, target))
            if math.isfinite(error):
                self._errors[spec] = max(error, self._errors.get(spec, 0.0))
        self.shadow_seconds += time.perf_counter() - start

    def hidden(self, op: str, name: str, seconds: float) -> None:
        """A transfer of the collective ``op`` on stream ``name`` was in flight for
        ``seconds`` before its wait began (compute it overlapped)."""
        key = (op, name)
        self._hidden[key] = self._hidden.get(key, 0.0) + max(0.0, float(seconds))

    def report(self) -> Report:
        """This step's measurements for the control block; starts the next step's."""
        for key, (seconds, nbytes) in self._codec.items():
            self._known[key] = max(1, round(seconds / nbytes * 1e12))
        self._codec = {}
        slots = self.candidates + ("",) * (MAX_CANDIDATES - len(self.candidates))
        hidden: dict[int, float] = {}
        for (op, name), seconds in self._hidden.items():  # a shared slot: the smallest
            slot = hidden_slot(op, name)
            hidden[slot] = min(seconds, hidden.get(slot, seconds))
        report = Report(self._ops, self._bytes, round(self._seconds * 1e9),
                        tuple(self._known.get((s, "encode"), 0) for s in slots),
                        tuple(self._known.get((s, "decode"), 0) for s in slots),
                        self._control[0], round(self._control[1] * 1e9),
                        tuple(b & 0xFFFFFFFF for b, _ in self._timed),
                        tuple(min(max(1, round(s * 1e6)), 0xFFFFFFFF) for _, s in self._timed),
                        tuple(min(max(1, round(self._errors[s] * 1e6)), 0xFFFFFFFF)
                              if s in self._errors else 0 for s in slots),
                        tuple(min(max(1, round(hidden[i] * 1e6)), 0xFFFFFFFF)
                              if i in hidden else 0 for i in range(MAX_HIDDEN)))
        self._errors, self._hidden = {}, {}
        if self._shadowed_now:  # the next check is due shadow_every steps after this one
            self._shadowed_now = False
            self._shadow_wait = self.shadow_every - 1
            self._shadow_pending = self._shadow_wait <= 0
        elif not self._shadow_pending and self.shadowed and self.shadow_every > 0:
            self._shadow_wait -= 1
            self._shadow_pending = self._shadow_wait <= 0
        self._ops, self._bytes, self._seconds = 0, 0, 0.0
        self._timed = []
        self._reports += 1
        self._due = self._due or self.reprobe_every > 0 and \
            self._reports % self.reprobe_every == 0
        self._control = (0, 0.0)
        return report


class AutoPolicy:
    """The agreed measurements of a group and the decisions they give (see the module
    docstring). One per session table; it outlives ``reset()``: the link and the device do
    not change with the request.

    ``candidates`` -- the codec specs, raw (``identity``) first; ``world_size`` -- ranks of
    the group; ``floor`` -- the quality budget where the config sets no ``max_rel_error``
    (:func:`~compressed_comm.auto.admissible`); ``shadow_every`` -- steps between two shadow
    encodings (:data:`~compressed_comm.auto.SHADOW_EVERY`).
    """

    def __init__(self, candidates: Sequence[str], *, config: CompressionConfig | None = None,
                 world_size: int = 1, floor: str = "binary", window: int = 3,
                 probe_every: int = 8, probe_ratio: float = 4.0, force_every: int = 24,
                 keep_large: int = 8, margin: float = 0.1,
                 shadow_every: int = SHADOW_EVERY) -> None:
        self.candidates = tuple(candidates)
        self.config = config or CompressionConfig(codec="auto:" + ",".join(self.candidates))
        self.world_size = int(world_size)
        self.floor = floor
        #: the quality budget (None: ``floor``), from the config: every rank shares it
        self.max_rel_error = self.config.max_rel_error
        self.probe_every = int(probe_every)
        self.probe_ratio = float(probe_ratio)
        #: steps between two raw probes of a stream whatever its estimate (0: never;
        #: ``probe_every=0`` turns off both kinds of probe)
        self.force_every = int(force_every)
        #: this rank's measurements, reported at the next control exchange
        self.meter = Meter(self.candidates,
                           shadowed=shadowed(self.candidates, floor, self.max_rel_error),
                           shadow_every=shadow_every)
        #: agreed shadow-encoding errors, by spec: the largest any rank measured on any
        #: stream at the last shadow step that measured the candidate
        self.errors: dict[str, float] = {}
        #: agreed compute hidden behind transfers, seconds by
        #: :func:`~compressed_comm.auto.hidden_slot`: the smallest any rank measured
        self.hidden: dict[int, float] = {}
        #: agreed link samples (operations, bytes, seconds), newest last: data transfers,
        #: and control exchanges
        self.samples: deque[tuple[int, int, float]] = deque(maxlen=int(window))
        self.control_samples: deque[tuple[int, int, float]] = deque(maxlen=int(window))
        #: the largest transfer (or step, see the module docstring) of the last
        #: ``keep_large`` steps
        self.large: tuple[int, int, float] | None = None
        self.keep_large = int(keep_large)
        #: raw, and a stream's last choice, are kept while within this share of the best
        self.margin = float(margin)
        self._large_age = 0
        #: agreed codec costs, by spec
        self.costs: dict[str, Cost] = {}
        #: the group step the decisions are for
        self.step = 0
        self._cache: dict[tuple[object, ...], Decision] = {}
        # gather collectives: every origin's shape, by stream name; layouts by shape
        self._shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
        self._layouts: dict[tuple[tuple[int, ...], torch.dtype], dict[str, MessageLayout]] = {}

    def expect(self, key: object, shapes: Sequence[Sequence[int]]) -> None:
        """The all-gather or ring pass on stream ``key`` carries ``shapes`` by origin (the
        same on every rank): its streams decide together, from the largest."""
        self._shapes[str(key)] = tuple(tuple(int(d) for d in s) for s in shapes)

    def agree(self, reports: Sequence[Report]) -> None:
        """Fold every rank's report of the step that ended (the same on every rank)."""
        moved = [r for r in reports if r.link_bytes > 0 and r.link_ns > 0]
        timed = {len(r.timed_us) for r in reports}
        if moved and len(moved) == len(reports) and len(timed) == 1 and timed != {0}:
            n = timed.pop()
            each = [(1, max(r.timed_bytes[i] for r in reports),
                     min(r.timed_us[i] for r in reports) / 1e6) for i in range(n)]
            self.samples.append((n, sum(e[1] for e in each), sum(e[2] for e in each)))
            # the largest transfer alone: a raw probe's replaces an older all-raw step's
            self._keep(max(each, key=lambda e: e[1]))
        elif moved:
            self.samples.append((max(r.link_ops for r in moved),
                                 max(r.link_bytes for r in moved),
                                 min(r.link_ns for r in moved) / 1e9))
            self._keep(self.samples[-1])
        controls = [r for r in reports if r.control_bytes > 0 and r.control_ns > 0]
        if controls:
            self.control_samples.append((1, max(r.control_bytes for r in controls),
                                         min(r.control_ns for r in controls) / 1e9))
        for i, spec in enumerate(self.candidates):
            enc = max((r.encode_ps[i] for r in reports if len(r.encode_ps) > i), default=0)
            dec = max((r.decode_ps[i] for r in reports if len(r.decode_ps) > i), default=0)
            if enc or dec:
                self.costs[spec] = Cost((enc or dec) * 1e-12, (dec or enc) * 1e-12)
            errors = [r.error_ppm[i] for r in reports if len(r.error_ppm) > i and r.error_ppm[i]]
            if errors:  # the worst any rank measured
                self.errors[spec] = max(errors) / 1e6
        for slot in range(MAX_HIDDEN):
            hidden = [r.hidden_us[slot] if len(r.hidden_us) > slot else 0 for r in reports]
            if all(hidden):  # the least any rank measured: no rank is optimistic
                self.hidden[slot] = min(hidden) / 1e6
            elif any(hidden):  # some ranks waited on none: credit nothing
                self.hidden[slot] = 0.0
        self._cache = {}

    def _keep(self, sample: tuple[int, int, float]) -> None:
        """Keep ``sample`` as :attr:`large` if it moved as many bytes per transfer, or the
        kept one is too old."""
        self._large_age += 1
        large = self.large
        if (large is None or self._large_age > self.keep_large
                or sample[1] * large[0] >= large[1] * sample[0]):
            self.large, self._large_age = sample, 0

    def advance(self, step: int) -> None:
        """Decisions from now on are for the group's step ``step``."""
        self.step = int(step)
        self._cache = {}

    def link(self) -> Link | None:
        """The link fitted over the agreed samples (None before any)."""
        if not self.samples:  # control exchanges alone say nothing about bandwidth
            return None
        large = [] if self.large is None or self.large in self.samples else [self.large]
        return fit_link([*self.samples, *self.control_samples, *large])

    def choose(self, stream: StreamEncoder | StreamDecoder, message: int) -> Decision:
        """The candidate for message ``message`` of ``stream`` at the current step: the
        same on every rank holding the stream (a function of agreed state and of the
        stream's shape, dtype and message number alone)."""
        shapes = self._shapes.get(str(stream.key)) if stream.key.op in _GATHERS else None
        shape = stream.shape if not shapes else max(shapes, key=math.prod)
        key = (stream.name, -1 if shapes else stream.origin, shape, message, self.step)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = self._decide(stream, shape, message)
        return found

    def _candidate_layouts(self, stream: StreamEncoder | StreamDecoder,
                           shape: tuple[int, ...]) -> dict[str, MessageLayout]:
        """The candidates' layouts for ``shape`` (the stream's own where it is its shape)."""
        if shape == stream.shape:
            return stream.layouts
        found = self._layouts.get((shape, stream.dtype))
        if found is None:
            found = self._layouts[(shape, stream.dtype)] = {
                spec: MessageLayout.of(self.config, shape, stream.dtype, codec=la.codec)
                for spec, la in stream.layouts.items()}
        return found

    def _decide(self, stream: StreamEncoder | StreamDecoder, shape: tuple[int, ...],
                message: int) -> Decision:
        cands = [Candidate(spec, la.payload_nbytes(message), la.codec_at(message).spec)
                 for spec, la in self._candidate_layouts(stream, shape).items()]
        link = self.link()
        if link is None:
            return Decision(cands[0].spec, "no link measured yet: raw")
        fan = self.world_size - 1 if stream.key.op in _GATHERS else 1
        raw_bytes = math.prod(shape) * torch.empty((), dtype=stream.dtype).element_size()
        decision = decide(cands, link, self.costs, raw_bytes=raw_bytes, fan=max(fan, 1),
                          hidden=self.hidden.get(hidden_slot(stream.key.op, stream.key.name),
                                                 0.0),
                          floor=self.floor, incumbent=stream.chosen(message),
                          margin=self.margin, errors=self.errors,
                          max_rel_error=self.max_rel_error)
        raw, best = decision.estimates[0], next(e for e in decision.estimates
                                               if e.spec == decision.spec)
        crc = zlib.crc32(str(stream.key).encode())
        if (self.probe_every > 0 and best is not raw and self.step >= self.probe_every
                and self.step % self.probe_every == crc % self.probe_every
                and raw.total <= self.probe_ratio * best.total):
            return Decision(raw.spec, f"raw probe (every {self.probe_every} steps; "
                                      f"{decision.spec} chosen otherwise)", decision.estimates)
        if (self.probe_every > 0 and self.force_every > 0 and best is not raw
                and self.step >= self.probe_every
                and self.step % self.force_every == crc % self.force_every):
            return Decision(raw.spec, f"raw probe (every {self.force_every} steps whatever "
                                      f"the estimate; {decision.spec} chosen otherwise)",
                            decision.estimates)
        return decision
