"""``codec="auto"``: the spec, the decision (driven both ways by a fake clock), the agreement
of every rank, sizes known in advance, and references that stay bit-identical across
switches."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compressed_comm import CompressedGroup, CompressionConfig, Keyframes, Session, StreamKey
from compressed_comm.auto import (
    ACCURACY_ORDER,
    DEFAULT_CANDIDATES,
    SHADOW_EVERY,
    Candidate,
    Cost,
    Link,
    Report,
    admissible,
    decide,
    fit_link,
    parse_auto,
    shadowed,
)
from compressed_comm.autopolicy import AutoPolicy
from compressed_comm.group.control import STEP, ControlBlock, control_nbytes
from compressed_comm.testing import run_ranks

WORLD = 3
SPECS = ("identity", "int4", "binary", "lowrank:4")
#: fake codec costs, picoseconds per byte, in the order of SPECS
ENCODE_PS = (100, 3_000, 2_000, 8_000)
DECODE_PS = (100, 1_000, 1_000, 4_000)


# ---------------------------------------------------------------------- the spec


def test_auto_spec_parses_to_candidates_raw_first():
    assert parse_auto("auto") == DEFAULT_CANDIDATES
    assert parse_auto("auto:raw,int4,int2,binary,lowrank:8") == (
        "identity", "int4", "int2", "binary", "lowrank:8")
    assert parse_auto("AUTO: binary , int4") == ("identity", "binary", "int4")
    assert parse_auto("auto:binary,identity") == ("identity", "binary")
    config = CompressionConfig(codec="auto:int2,lowrank:8")
    assert config.auto and config.candidates == ("identity", "int2", "lowrank:8")
    assert not CompressionConfig().auto and CompressionConfig().candidates == ("binary",)


@pytest.mark.parametrize("spec, says", [
    ("auto:", "empty candidate"), ("auto:int4,,binary", "empty candidate"),
    ("auto:foo", "unknown codec 'foo'"), ("auto:int4,int4", "named twice"),
    ("auto:raw,identity", "named twice"), ("auto:auto", "cannot be its own candidate"),
    ("auto:lowrank:x", "is not an integer"),
    ("auto:" + ",".join(["int8", "int4", "int2", "binary", "fp8", "lowrank:1", "lowrank:2",
                         "lowrank:3"]), "at most 8"),
])
def test_bad_auto_specs_raise_naming_the_problem(spec, says):
    with pytest.raises(ValueError, match=says):
        CompressionConfig(codec=spec)


def test_candidate_lists_are_shared_config():
    a = CompressionConfig(codec="auto:int4,binary")
    b = CompressionConfig(codec="auto:int4,lowrank:8")
    assert a.differences(b.fingerprint()) == ["codec"]


def test_auto_needs_the_control_plane():
    def body(t):
        with pytest.raises(ValueError, match="handshake=True"):
            CompressedGroup(t, CompressionConfig(codec="auto", handshake=False))
    run_ranks(2, body)


# ---------------------------------------------------------------------- the decision


def test_quality_floor_follows_the_accuracy_order():
    assert all(admissible(s) for s in ACCURACY_ORDER + ("lowrank:8", "topk:0.1"))
    assert [admissible(s, "int4") for s in ACCURACY_ORDER] == [True, True, True, False, False]
    assert not admissible("lowrank:8", "int2")  # unranked: needs shadow encoding
    with pytest.raises(ValueError, match="quality floor"):
        admissible("int4", "lowrank:8")


def _cands(raw=8192):
    return [Candidate("identity", raw), Candidate("int4", raw // 4 + 64),
            Candidate("binary", raw // 16 + 64)]


COSTS = {"identity": Cost(1e-10, 1e-10), "int4": Cost(3e-9, 1e-9), "binary": Cost(2e-9, 1e-9)}


def test_decide_picks_compression_on_a_slow_link_and_raw_on_a_fast_one():
    slow = decide(_cands(), Link(1e6, 1e-4), COSTS, raw_bytes=8192, fan=2)
    fast = decide(_cands(), Link(1e11, 1e-4), COSTS, raw_bytes=8192, fan=2)
    assert slow.spec == "binary" and "faster than raw" in slow.reason
    assert fast.spec == "identity" and fast.reason == "raw is fastest"
    assert [e.spec for e in slow.estimates] == ["identity", "int4", "binary"]
    est = slow.estimates[2]
    assert est.total == pytest.approx(est.encode + est.wire + est.decode)
    assert est.wire == pytest.approx(1e-4 + 2 * (8192 // 16 + 64) / 1e6)
    # deterministic: a function of its arguments alone
    assert decide(_cands(), Link(1e6, 1e-4), COSTS, raw_bytes=8192, fan=2) == slow


def test_decide_respects_the_budget_ties_and_hidden_time():
    assert decide(_cands(), Link(1e6), COSTS, raw_bytes=8192, floor="int4").spec == "int4"
    free = {s: Cost(0.0, 0.0) for s in COSTS}
    same = [Candidate("identity", 100), Candidate("binary", 100)]
    assert decide(same, Link(1e6), free, raw_bytes=100).spec == "identity"  # tie: raw
    # wire time hidden behind compute: only the codec's cost is left, raw wins
    assert decide(_cands(), Link(1e6), COSTS, raw_bytes=8192, hidden=1.0).spec == "identity"
    with pytest.raises(ValueError, match="bandwidth"):
        decide(_cands(), Link(0.0), COSTS, raw_bytes=1)


def test_margins_keep_raw_and_the_incumbent_when_close():
    cands = [Candidate("identity", 1000), Candidate("int4", 300), Candidate("binary", 100)]
    free = {s: Cost(0.0, 0.0) for s in ("identity", "int4", "binary")}
    link = Link(1e6, 1e-3)  # totals: raw 2 ms, int4 1.3 ms, binary 1.1 ms
    assert decide(cands, link, free, raw_bytes=1000).spec == "binary"
    kept = decide(cands, link, free, raw_bytes=1000, incumbent="int4", margin=0.2)
    assert kept.spec == "int4" and "int4 kept" in kept.reason
    assert decide(cands, link, free, raw_bytes=1000, incumbent="int4", margin=0.1).spec == \
        "binary"
    raw = decide(cands, link, free, raw_bytes=1000, incumbent="int4", margin=1.0)
    assert raw.spec == "identity" and "raw kept" in raw.reason


def test_fit_link_recovers_latency_and_bandwidth():
    lat, bw = 2e-4, 5e7
    samples = [(ops, b, ops * lat + b / bw) for ops, b in ((1, 10_000), (4, 2_000_000),
                                                            (2, 300_000))]
    link = fit_link(samples)
    assert link.latency == pytest.approx(lat) and link.bandwidth == pytest.approx(bw)
    one = fit_link([(1, 1000, 1e-3)])
    assert one == Link(1e6) and fit_link([]) is None and fit_link([(1, 0, 1.0)]) is None


# ---------------------------------------------------------------------- agreement


def _report(ns: int, nbytes: int = 1_000_000) -> Report:
    return Report(1, nbytes, ns, ENCODE_PS, DECODE_PS)


def test_policy_follows_a_fake_clock_both_ways():
    """Slow steps make the stream compress, fast steps bring raw back within the window;
    ranks that arrived late (larger times) do not count."""
    policy = AutoPolicy(SPECS, world_size=WORLD, probe_every=0)
    enc = Session(CompressionConfig(codec="auto:" + ",".join(SPECS))).encoder(
        StreamKey("all_gather", "kv"), torch.zeros(64, 256))
    choices = []
    for step in range(1, 13):
        slow = step <= 6
        ns = 1_000_000_000 if slow else 100_000
        policy.agree([_report(ns * (1 + r)) for r in range(WORLD)])  # lateness by rank
        policy.advance(step)
        choices.append(policy.choose(enc, 5).spec)
    assert len(set(choices[:6])) == 1 and choices[0] != "identity"
    assert choices[-3:] == ["identity"] * 3
    assert choices.index("identity") <= 6 + 3  # follows within the window of 3 steps


def test_raw_is_probed_on_schedule_however_dear_its_estimate():
    """Slow small transfers make raw look far dearer than its choice: the estimate-gated
    probe never fires, the scheduled one does, once per force_every steps per stream, on
    the same steps on every rank; probe_every=0 turns both off."""
    def picks(**kwargs):
        policy = AutoPolicy(SPECS, world_size=WORLD, **kwargs)
        enc = Session(CompressionConfig(codec="auto:" + ",".join(SPECS))).encoder(
            StreamKey("all_gather", "kv"), torch.zeros(64, 256))
        out = []
        for step in range(1, 50):
            policy.agree([_report(1_000_000_000)] * WORLD)  # 1 MB/s: raw 100x dearer
            policy.advance(step)
            decision = policy.choose(enc, step)
            out.append((step, decision.spec, decision.reason))
        return out
    forced = [(step, why) for step, spec, why in picks(probe_ratio=4.0, force_every=12)
              if spec == "identity"]
    assert len(forced) >= 3 and all("whatever the estimate" in why for _, why in forced)
    steps = [step for step, _ in forced]
    assert all(b - a == 12 for a, b in zip(steps, steps[1:])) and steps[0] >= 8
    assert picks(probe_ratio=4.0, force_every=12) == picks(probe_ratio=4.0, force_every=12)
    assert all(spec != "identity" for _, spec, _ in picks(probe_every=0, force_every=12))
    assert all(spec != "identity" for _, spec, _ in picks(force_every=0))


def test_control_exchanges_pin_the_latency_down():
    """One codec's transfers alone cannot tell latency from bandwidth; control exchanges can."""
    lat, bw = 2e-3, 1e8
    policy = AutoPolicy(SPECS, world_size=WORLD, probe_every=0)
    for _ in range(3):
        policy.agree([Report(8, 120_000, round((8 * lat + 120_000 / bw) * 1e9), ENCODE_PS,
                             DECODE_PS, 600, round((lat + 600 / bw) * 1e9))])
    link = policy.link()
    assert link.latency == pytest.approx(lat, rel=1e-3)
    assert link.bandwidth == pytest.approx(bw, rel=1e-3)
    alone = AutoPolicy(SPECS, world_size=WORLD, probe_every=0)
    alone.agree([Report(8, 120_000, round((8 * lat + 120_000 / bw) * 1e9))])
    assert alone.link().bandwidth < bw / 10  # latency taken for bandwidth


def test_each_collective_is_timed_by_the_rank_that_arrived_last():
    """Rank 0 waited for rank 1 in the first transfer, rank 1 for rank 0 in the second: the
    sample is the wire time of each (the shorter one), not either rank's total."""
    policy = AutoPolicy(SPECS, world_size=2, probe_every=0)
    policy.agree([Report(2, 2000, 90_000_000, timed_bytes=(1000, 1000), timed_us=(80_000, 10_000)),
                  Report(2, 2000, 90_000_000, timed_bytes=(1000, 1000), timed_us=(10_000, 80_000))])
    assert list(policy.samples) == [(2, 2000, 0.02)]
    policy.agree([Report(1, 1000, 5_000_000), Report(1, 1000, 7_000_000)])  # none one by one
    assert policy.samples[-1] == (1, 1000, 0.005)


def test_control_block_carries_the_report():
    report = Report(3, 123_456_789, 987_654_321, ENCODE_PS + (0,) * 4, DECODE_PS + (0,) * 4,
                    816, 2_500_000, (4096, 8192), (1500, 2),
                    (0, 31_000, 250_000, 1_200_000) + (0,) * 4, (0,) * 5 + (42,) + (0,) * 10)
    block = ControlBlock(kind=STEP, session=7, step=4, report=report)
    raw = block.pack(WORLD)
    # 320 + 16 W before the shadow errors (8 x 4 bytes) and hidden compute (16 x 4 bytes)
    assert len(raw) == control_nbytes(WORLD) == 416 + 16 * WORLD
    assert ControlBlock.unpack(raw, WORLD).report == report


def _value(rank, step, rows=16, cols=64):
    gen = torch.Generator().manual_seed(100 * step + rank)
    base = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rank))
    return base + 0.05 * step * torch.randn(rows, cols, generator=gen)


def _collective(g, op, x):
    if op == "all_gather":
        return g.all_gather(x, stream="kv")
    if op == "ring":
        return g.ring_pass(x, stream="kv")
    return list(g.all_to_all(torch.cat([x] * WORLD), stream="kv").split(x.shape[0]))


@pytest.mark.parametrize("op", ["all_gather", "ring", "all_to_all"])
@pytest.mark.parametrize("order, keyframes", [(1, Keyframes()),
                                              (2, Keyframes(period=4, spread=2))])
def test_ranks_agree_sizes_are_known_and_references_stay_identical(op, order, keyframes):
    """A fake clock turns the link slow and fast every three steps: every rank picks the
    same codec for every stream at every step, knows every payload's size before the
    collective, and the references of every stream are bit-identical on every rank across
    the switches (raw probes included)."""
    steps = 14
    config = CompressionConfig(codec="auto:" + ",".join(SPECS), residual_order=order,
                               warmup_steps=order, keyframes=keyframes)

    def body(t):
        g = CompressedGroup(t, config, timeout=60.0)
        auto = g.session.auto
        auto.probe_every = 5

        def fake_report() -> Report:
            auto.meter._ops = auto.meter._bytes = 0  # the real clock does not count
            slow = (g.step_index // 3) % 2 == 1
            return _report((1_000_000_000 if slow else 100_000) * (1 + g.rank))
        auto.meter.report = fake_report
        log = []
        for step in range(steps):
            x = _value(g.rank, step)
            if step:  # sizes and codecs in advance, before anything moves
                streams = [s for s in g.session if s.key.name == "kv"]
                for s in streams:
                    g.session.prepare(s)
                sizes = {(s.role, str(s.key), s.origin): s.payload_nbytes(
                    s.step if s.role == "encoder" else s.expected) for s in streams}
                chosen = {(s.role, str(s.key), s.origin): s.chosen(
                    s.step if s.role == "encoder" else s.expected) for s in streams}
                before = {k: s.stats().wire_bytes for k, s in zip(sizes, streams)}
            _collective(g, op, x)
            refs = {(str(s.key), s.origin): s.reference.clone() for s in g.session
                    if s.key.name == "kv"}
            if step:
                after = {k: s.stats().wire_bytes for k, s in zip(sizes, streams)}
                assert {k: after[k] - before[k] for k in sizes} == sizes
                log.append((chosen, refs))
            g.step()
        return log, g.stats()

    results = run_ranks(WORLD, body)
    picks = set()
    for step in range(steps - 1):
        by_stream: dict = {}
        refs: dict = {}
        for log, _ in results:
            chosen, ref = log[step][0], log[step][1]
            for (role, key, origin), spec in chosen.items():
                by_stream.setdefault((key, origin), set()).add(spec)
            for k, v in ref.items():
                refs.setdefault(k, []).append(v)
        assert all(len(v) == 1 for v in by_stream.values()), (step, by_stream)
        picks |= {next(iter(v)) for v in by_stream.values()}
        for k, vs in refs.items():
            assert len(vs) >= 2 and all(torch.equal(vs[0], v) for v in vs[1:]), (step, k)
    assert "identity" in picks and picks - {"identity"}, picks  # switched both ways
    stats = results[0][1]
    assert all(s.codec.startswith("auto:") and "ms = enc" in s.choice for s in stats.streams)


def test_lowrank_warm_start_survives_a_switch_and_raw_is_exact():
    config = CompressionConfig(codec="auto:binary,lowrank:4")
    enc = Session(config).encoder("s", torch.zeros(32, 16))
    dec = Session(config).decoder("s", 0, torch.zeros(32, 16))
    plan = ["identity", "lowrank:4", "binary", "identity", "lowrank:4"]
    for step, spec in enumerate(plan):
        x = _value(0, step, 32, 16)
        enc.choose(spec, step)
        dec.choose(spec, step)
        assert enc.payload_nbytes() == dec.payload_nbytes()
        out = dec.decode(enc.encode(x))
        assert torch.equal(out, enc.reference)
        if spec == "identity":
            assert torch.equal(out, x)
        if step == 2:  # lowrank's basis is kept while binary is in use
            assert enc._states["lowrank:4"].basis is not None
    with pytest.raises(ValueError, match="not one of its candidates"):
        enc.choose("int4", enc.step)


def test_the_what_if_prices_auto_and_says_why():
    from simulator.methods import parse_method
    from simulator.network import Link as NetLink
    from simulator.whatif.pricing import run_what_if

    assert parse_method("auto").codec == "auto" and parse_method("auto+async").stale
    with pytest.raises(ValueError, match="default candidates"):
        parse_method("auto:int4")
    slow = run_what_if("flux.1-dev", "h100", 4, "patch", "1gbe", ["auto"])
    fast = run_what_if("flux.1-dev", "h100", 4, "patch",
                       NetLink("ideal", "test", 1e15, 0.0), ["auto"])
    assert [r.method for r in slow.rows][-1] not in ("auto=raw", "auto")
    assert [r.method for r in fast.rows][-1] == "auto=raw"
    assert "assumed" in slow.assumptions[-1] and "faster than raw" in slow.assumptions[-1]


@pytest.mark.parametrize("op", ["all_gather", "ring", "all_to_all"])
@pytest.mark.parametrize("fault", ["user", "nan"])
def test_a_failure_under_auto_is_seen_by_every_rank_and_recovered(op, fault):
    """Status frames have the sizes the peers' decisions expect: every rank raises at once,
    and after new_session() the ranks agree again and stay bit-identical."""
    import time

    from compressed_comm import CompressedCommError, PeerFailedError

    def body(t):
        g = CompressedGroup(t, CompressionConfig(codec="auto:" + ",".join(SPECS)), timeout=30.0)
        auto = g.session.auto

        def slow() -> Report:
            auto.meter._ops = auto.meter._bytes = 0
            return _report(1_000_000_000)
        auto.meter.report = slow
        for step in range(3):
            _collective(g, op, _value(g.rank, step))
            g.step()
        x = _value(g.rank, 3)
        if g.rank == 1 and fault == "nan":
            x[0, 0] = float("nan")
        t0, outcome = time.monotonic(), None
        try:
            if g.rank == 1 and fault == "user":
                try:
                    raise RuntimeError("boom")
                except RuntimeError as e:
                    g.fail(e)
                    raise
            _collective(g, op, x)
        except (CompressedCommError, RuntimeError) as e:
            outcome = e
        seconds = time.monotonic() - t0
        g.new_session()
        chosen = []
        for step in range(3):
            _collective(g, op, _value(g.rank, step))
            chosen.append({(str(s.key), s.origin): s.stats().codec for s in g.session})
            g.step()
        refs = {(str(s.key), s.origin): s.reference.clone() for s in g.session}
        return outcome, seconds, chosen, refs

    results = run_ranks(WORLD, body)
    for rank, (outcome, seconds, _, _) in enumerate(results):
        assert outcome is not None and seconds < 5.0, (rank, outcome, seconds)
        if rank != 1:
            assert isinstance(outcome, PeerFailedError) and outcome.rank == 1, outcome
    merged: dict = {}
    for _, _, chosen, refs in results:
        for step, picks in enumerate(chosen):
            for k, v in picks.items():
                merged.setdefault((step, k), set()).add(v)
        for k, v in refs.items():
            merged.setdefault(("ref", k), []).append(v)
    for k, v in merged.items():
        if k[0] == "ref":
            assert all(torch.equal(v[0], r) for r in v[1:]), k
        else:
            assert len(v) == 1, (k, v)
    assert any(v != {"auto:identity"} for k, v in merged.items() if k[0] != "ref")


@pytest.mark.parametrize("op", ["all_gather", "ring"])
def test_uneven_origins_of_a_gather_share_one_codec(op):
    """A one-row origin that alone would go raw follows the large origins' choice."""
    rows = (256, 256, 1)
    shapes = [(r, 64) for r in rows]
    config = CompressionConfig(codec="auto:" + ",".join(SPECS))

    def reports(policy):
        policy.agree([Report(1, 1_000_000, 100_000_000, (0, 50_000, 40_000, 400_000),
                             (0, 50_000, 40_000, 400_000))])

    alone = AutoPolicy(SPECS, world_size=WORLD, probe_every=0)
    reports(alone)
    small = Session(config).encoder(StreamKey(op, "kv"), torch.zeros(1, 64))
    big = Session(config).encoder(StreamKey(op, "kv"), torch.zeros(256, 64))
    assert alone.choose(small, 3).spec == "identity"
    assert alone.choose(big, 3).spec != "identity"

    def body(t):
        g = CompressedGroup(t, config, timeout=60.0)
        reports(g.session.auto)
        g.session.auto.probe_every = 0
        g.session.auto.meter.report = lambda: Report()  # keep the agreed fake link
        picks = []
        for step in range(4):
            x = torch.randn(rows[g.rank], 64, generator=torch.Generator().manual_seed(step))
            out = (g.all_gather(x, stream="kv", shapes=shapes) if op == "all_gather"
                   else g.ring_pass(x, stream="kv", shapes=shapes))
            picks.append({s.origin: s.stats().codec for s in g.session})
            g.step()
        return picks, [o.clone() for o in out], g.session.encoder(StreamKey(op, "kv"), x
                                                                   ).reference.clone()

    results = run_ranks(WORLD, body)
    for picks, _, _ in results:
        for step in picks[1:]:
            assert len(set(step.values())) == 1 and "identity" not in next(
                iter(step.values())), step
    for origin in range(WORLD):
        views = [out[origin] for r, (_, out, _) in enumerate(results) if r != origin]
        assert all(torch.equal(results[origin][2], v) for v in views), origin


def test_unchosen_codecs_are_reprobed_every_few_steps():
    session = Session(CompressionConfig(codec="auto:int4,binary"))
    meter = session.auto.meter
    meter.reprobe_every = 3
    enc = session.encoder("x", torch.zeros(32, 16))
    measured = []
    for step in range(7):
        enc.choose("binary", step)
        enc.encode(_value(0, step, 32, 16))
        measured.append(("int4", "encode") in meter._codec)  # priced though not chosen
        report = meter.report()
        assert all(report.encode_ps[:3]) and all(report.decode_ps[:3])
    assert measured == [True, False, False, True, False, False, True]


def test_a_large_transfer_keeps_raw_priced_after_small_ones():
    """Small payloads whose time is mostly noise no longer make the link look slow."""
    lat, bw = 1e-3, 1e8
    policy = AutoPolicy(SPECS, world_size=WORLD, probe_every=0)
    policy.agree([Report(8, 8_000_000, round((8 * lat + 8e6 / bw) * 1e9), ENCODE_PS,
                         DECODE_PS, 600, round((lat + 600 / bw) * 1e9))])
    for _ in range(5):  # 3x too slow: scheduling noise on tiny transfers
        policy.agree([Report(8, 120_000, round(3 * (8 * lat + 120_000 / bw) * 1e9),
                             ENCODE_PS, DECODE_PS, 600, round((lat + 600 / bw) * 1e9))])
    assert policy.large[1] == 8_000_000
    assert policy.link().bandwidth > bw / 2
    without = AutoPolicy(SPECS, world_size=WORLD, probe_every=0, keep_large=0)
    without.agree([Report(8, 8_000_000, round((8 * lat + 8e6 / bw) * 1e9))])
    for _ in range(5):
        without.agree([Report(8, 120_000, round(3 * (8 * lat + 120_000 / bw) * 1e9))])
    assert without.link().bandwidth < bw / 2


def test_a_raw_probe_after_the_link_got_faster_replaces_the_old_large_sample():
    """An all-raw step on a slow link, then small transfers and one raw probe per step on a
    link 50x faster: the probe's transfer is the large sample within a step, and the link
    is fitted fast again."""
    slow, fast, lat, raw, small = 2.5e7, 1.25e9, 1e-3, 1_200_000, 45_000

    def report(sizes, bw):
        times = tuple(round((lat + b / bw) * 1e6) for b in sizes)
        return Report(len(sizes), sum(sizes), sum(times) * 1000, ENCODE_PS, DECODE_PS,
                      600, round((lat + 600 / bw) * 1e9), tuple(sizes), times)
    policy = AutoPolicy(SPECS, world_size=WORLD, probe_every=0)
    policy.agree([report([raw] * 8, slow)] * WORLD)
    assert policy.link().bandwidth < 2 * slow
    for _ in range(3):
        policy.agree([report([small] * 7 + [raw], fast)] * WORLD)
    assert policy.large == (1, raw, pytest.approx(lat + raw / fast, rel=1e-3))
    assert policy.link().bandwidth > fast / 2


# ---------------------------------------------------------------------- quality budget


@settings(max_examples=60)
@given(errors=st.dictionaries(st.sampled_from(["int4", "int2", "binary", "lowrank:8"]),
                              st.floats(0.0, 2.0), max_size=4),
       budget=st.floats(1e-4, 1.0))
def test_max_rel_error_admits_exactly_the_measured_candidates_within_it(errors, budget):
    """Raw always; a candidate measured within the budget; an unmeasured one never."""
    for spec in ("identity", "int4", "int2", "binary", "lowrank:8"):
        expected = spec == "identity" or spec in errors and errors[spec] <= budget
        assert admissible(spec, errors=errors, max_rel_error=budget) == expected, spec
    cands = [Candidate("identity", 8192), Candidate("int4", 2112), Candidate("int2", 1088),
             Candidate("binary", 576), Candidate("lowrank:8", 400)]
    decision = decide(cands, Link(1e6), {}, raw_bytes=8192, errors=errors,
                      max_rel_error=budget)
    fastest = min((e for e in decision.estimates if e.admitted), key=lambda e: e.total)
    assert decision.spec == fastest.spec
    assert all(("over budget" in str(e)) != e.admitted for e in decision.estimates)


def test_unranked_codecs_are_held_to_the_floor_codecs_measured_error():
    assert admissible("lowrank:8")  # not measured: the default floor admits it
    assert not admissible("lowrank:8", "int4")  # a stricter one does not
    assert admissible("lowrank:8", errors={"lowrank:8": 0.05, "binary": 0.06})
    assert not admissible("lowrank:8", errors={"lowrank:8": 0.07, "binary": 0.06})
    assert admissible("lowrank:8", "int4", errors={"lowrank:8": 0.01, "int4": 0.02})
    assert shadowed(("identity", "int4", "binary", "lowrank:8")) == ("binary", "lowrank:8")
    assert shadowed(("identity", "int4", "binary")) == ()  # nothing unranked: no shadow
    assert shadowed(("identity", "int4", "binary"), max_rel_error=0.1) == ("int4", "binary")
    with pytest.raises(ValueError, match="max_rel_error must be None or a positive"):
        admissible("int4", max_rel_error=0.0)
    with pytest.raises(ValueError, match="quality budget of codec='auto'"):
        CompressionConfig(codec="int4", max_rel_error=0.1)
    a = CompressionConfig(codec="auto", max_rel_error=0.05)
    assert a.differences(CompressionConfig(codec="auto").fingerprint()) == ["max_rel_error"]


def _errors_report(error_ppm, ns=1_000_000_000):
    return Report(1, 1_000_000, ns, ENCODE_PS, DECODE_PS, error_ppm=error_ppm)


@settings(max_examples=25)
@given(bad=st.floats(0.021, 5.0), good=st.floats(1e-5, 0.02))
def test_a_measured_error_drives_a_candidate_out_of_the_budget_and_back_in(bad, good):
    """On a slow link binary (the smallest) wins while within max_rel_error; an injected
    shadow measurement over the budget (from one rank) excludes it, a later one within it
    brings it back; the other candidates unmeasured stay excluded."""
    config = CompressionConfig(codec="auto:" + ",".join(SPECS), max_rel_error=0.02)
    policy = AutoPolicy(SPECS, config=config, world_size=WORLD, probe_every=0)
    enc = Session(config).encoder(StreamKey("all_gather", "kv"), torch.zeros(64, 256))
    policy.agree([_errors_report(())] * WORLD)
    assert policy.choose(enc, 5).spec == "identity"  # nothing measured: raw only
    ppm = round(good * 1e6) or 1
    picks = []
    for worst in (None, round(bad * 1e6), None):
        reports = [_errors_report((0, 0, ppm, 0)) for _ in range(WORLD)]
        if worst is not None:
            reports[1] = _errors_report((0, 0, worst, 0))  # the worst rank counts
        policy.agree(reports)
        decision = policy.choose(enc, 5)
        picks.append(decision.spec)
        binary = next(e for e in decision.estimates if e.spec == "binary")
        assert binary.admitted == (worst is None) and binary.error == pytest.approx(
            (worst or ppm) / 1e6)
        assert not next(e for e in decision.estimates if e.spec == "lowrank:4").admitted
    assert picks == ["binary", "identity", "binary"]


def _scratch_of(session):
    return session.auto.meter


@settings(max_examples=6)
@given(order=st.sampled_from([0, 1, 2]), seed=st.integers(0, 2**16),
       spread=st.sampled_from([1, 2]))
def test_shadow_encoding_leaves_the_wire_and_the_references_alone(order, seed, spread):
    """A stream that shadow-encodes every candidate at every message sends byte-identical
    payloads and keeps bit-identical references (and lowrank's warm start) as one that
    never does, whichever candidate each message goes through."""
    config = CompressionConfig(codec="auto:int4,binary,lowrank:4", residual_order=order,
                               warmup_steps=max(order, 1), max_rel_error=0.05,
                               keyframes=Keyframes(period=4, spread=spread))
    checked, plain = Session(config), Session(config)
    checked.auto.meter.shadow_every = 1
    plain.auto.meter.shadow_every = 0
    a = checked.encoder("s", torch.zeros(32, 16))
    b = plain.encoder("s", torch.zeros(32, 16))
    plan = ["identity", "lowrank:4", "binary", "lowrank:4", "int4", "lowrank:4", "identity",
            "binary", "lowrank:4"]
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(32, 16, generator=gen)
    for step, spec in enumerate(plan):
        x = base + 0.1 * step * torch.randn(32, 16, generator=gen)
        a.choose(spec, step)
        b.choose(spec, step)
        assert torch.equal(a.encode(x), b.encode(x)), step
        assert torch.equal(a.reference, b.reference), step
        basis_a, basis_b = a._states["lowrank:4"].basis, b._states["lowrank:4"].basis
        assert (basis_a is None) == (basis_b is None)
        assert basis_a is None or torch.equal(basis_a, basis_b), step
        if step >= config.warmup_steps:  # measured, never raw
            assert set(_scratch_of(checked)._errors) == {"int4", "binary", "lowrank:4"}
            assert all(e > 0 for e in _scratch_of(checked)._errors.values())
        _scratch_of(checked).report()
    assert a.stats().shadow_seconds > 0 and b.stats().shadow_seconds == 0
    assert 0 < _scratch_of(checked).shadow_seconds <= a.stats().shadow_seconds


def test_shadow_errors_are_the_errors_the_codec_leaves_when_used():
    """The shadow error of a candidate is the error ``track_error`` then records."""
    config = CompressionConfig(codec="auto:int4,lowrank:4", max_rel_error=0.5,
                               track_error=True)
    session = Session(config)
    session.auto.meter.shadow_every = 1
    enc = session.encoder("s", torch.zeros(32, 16))
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(32, 16, generator=gen)
    for step, spec in enumerate(["identity", "int4", "lowrank:4"]):
        x = base + 0.2 * step * torch.randn(32, 16, generator=gen)
        enc.choose(spec, step)
        enc.encode(x)
        if step:
            shadow = session.auto.meter._errors[spec]
            assert shadow == pytest.approx(enc.stats().last_rel_error, rel=1e-5), spec
        session.auto.meter.report()


def test_shadow_steps_come_every_shadow_every_steps():
    session = Session(CompressionConfig(codec="auto:int4,lowrank:4"))
    meter = session.auto.meter
    assert meter.shadowed == ("lowrank:4",) and meter.shadow_every == SHADOW_EVERY == 8
    meter.shadow_every = 3
    enc = session.encoder("s", torch.zeros(32, 16))
    done = []
    for step in range(9):
        enc.choose("int4", step)
        enc.encode(_value(0, step, 32, 16))
        done.append(meter.report().error_ppm[2] > 0)
    # warmup first (message 0 has no history), then every 3 steps
    assert done == [False, True, False, False, True, False, False, True, False]


def test_ranks_agree_on_the_budget_and_its_decisions():
    """Real shadow encoding on ranks whose residuals differ: every rank holds the same agreed
    errors (the worst rank's), raw until the first measurement, then only candidates within
    max_rel_error, the same for every stream on every rank, references bit-identical."""
    import dataclasses

    config = CompressionConfig(codec="auto:" + ",".join(SPECS), max_rel_error=0.02)
    steps = 7

    def body(t):
        g = CompressedGroup(t, config, timeout=60.0)
        auto = g.session.auto
        auto.probe_every = 0
        auto.meter.shadow_every = 2
        real = auto.meter.report

        def slow_link() -> Report:  # real shadow errors, a fake slow link
            return dataclasses.replace(real(), link_ops=1, link_bytes=1_000_000,
                                       link_ns=1_000_000_000 * (1 + g.rank), encode_ps=ENCODE_PS,
                                       decode_ps=DECODE_PS, timed_bytes=(), timed_us=())
        auto.meter.report = slow_link
        log = []
        for step in range(steps):
            x = _value(g.rank, step) * (1 + g.rank)  # ranks' residuals differ
            g.all_gather(x, stream="kv")
            log.append(({s.origin: s.stats().codec for s in g.session},
                        dict(auto.errors), {s.origin: s.reference.clone() for s in g.session}))
            g.step()
        return log, g.session.encoder(StreamKey("all_gather", "kv"), x).stats()

    results = run_ranks(WORLD, body)
    picks = set()
    for step in range(steps):
        views = [log[step] for log, _ in results]
        assert all(v[1] == views[0][1] for v in views), (step, [v[1] for v in views])
        by_origin: dict = {}
        for codecs, _, refs in views:
            for origin, codec in codecs.items():
                by_origin.setdefault(origin, set()).add(codec)
        assert all(len(v) == 1 for v in by_origin.values()), (step, by_origin)
        picks |= {next(iter(v)) for v in by_origin.values()}
        for origin in range(WORLD):
            refs = [v[2][origin] for v in views]
            assert all(torch.equal(refs[0], r) for r in refs[1:]), (step, origin)
    errors = results[0][0][-1][1]
    assert set(errors) == {"int4", "binary", "lowrank:4"}
    assert errors["int4"] <= 0.02 < min(errors["binary"], errors["lowrank:4"])
    assert results[0][0][1][0][0] == "auto:identity"  # before the first measurement: raw
    assert picks == {"auto:identity", "auto:int4"}, picks
    assert all(stats.shadow_seconds > 0 for _, stats in results)


# ---------------------------------------------------------------------- hidden compute


@settings(max_examples=60)
@given(bandwidth=st.floats(1e5, 1e10), latency=st.floats(0.0, 1e-2),
       raw=st.integers(1024, 1 << 24), extra=st.floats(0.0, 1.0))
def test_hidden_compute_covering_the_wire_makes_raw_win(bandwidth, latency, raw, extra):
    cands = _cands(raw)
    link = Link(bandwidth, latency)
    hidden = latency + 2 * raw / bandwidth + extra  # raw's wire time and more
    decision = decide(cands, link, COSTS, raw_bytes=raw, fan=2, hidden=hidden)
    assert decision.spec == "identity"
    assert all(e.hidden == pytest.approx(e.wire) for e in decision.estimates)


def test_an_async_collective_is_credited_its_hidden_compute_and_goes_raw():
    """An all-gather waited on a step later, after 30 ms of "compute", is credited the
    compute it hid (the least any rank measured) and goes raw on a link on which the same
    tensor gathered at once compresses; the credit is the same on every rank."""
    import dataclasses
    import time

    from compressed_comm.auto import hidden_slot

    assert hidden_slot("all_gather", "kv") != hidden_slot("all_gather", "async")
    config = CompressionConfig(codec="auto:" + ",".join(SPECS))

    def body(t):
        g = CompressedGroup(t, config, timeout=60.0)
        auto = g.session.auto
        auto.probe_every = 0
        real = auto.meter.report

        def slow_link() -> Report:  # a 10 MB/s link; hidden compute as measured
            return dataclasses.replace(real(), link_ops=1, link_bytes=1_000_000,
                                       link_ns=100_000_000, encode_ps=ENCODE_PS,
                                       decode_ps=DECODE_PS, timed_bytes=(), timed_us=(),
                                       control_bytes=0, control_ns=0)
        auto.meter.report = slow_link
        pending, picks = None, []
        for step in range(6):
            x = _value(g.rank, step, 16, 256)  # raw wire 3.3 ms; kv's 13 ms (scheduling
            g.all_gather(_value(g.rank, step, 64, 256), stream="kv")  # noise stays below)
            handle = g.all_gather_async(x, stream="async")
            if pending is not None:
                time.sleep(0.03)  # the step's compute, overlapping the async transfer
                pending.wait()
            pending = handle
            picks.append({str(s.key): s.stats().codec for s in g.session if s.origin == 0})
            g.step()
        pending.wait()
        return picks, dict(auto.hidden)

    results = run_ranks(WORLD, body)
    hidden = [h for _, h in results]
    assert all(h == hidden[0] for h in hidden[1:])
    slot = hidden_slot("all_gather", "async")
    assert hidden[0][slot] >= 0.025 and hidden[0][slot] > hidden[0][hidden_slot("all_gather",
                                                                                "kv")]
    for picks, _ in results:
        late = picks[-2:]
        assert all(p["all_gather:async"] == "auto:identity" for p in late), picks
        assert all(p["all_gather:kv"] != "auto:identity" for p in late), picks
