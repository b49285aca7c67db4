"""``codec="auto"``: the spec and the decision."""

import pytest

from compressed_comm import CompressionConfig
from compressed_comm.auto import (
    ACCURACY_ORDER,
    DEFAULT_CANDIDATES,
    Candidate,
    Cost,
    Link,
    admissible,
    decide,
    fit_link,
    parse_auto,
)

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


def test_fit_link_recovers_latency_and_bandwidth():
    lat, bw = 2e-4, 5e7
    samples = [(ops, b, ops * lat + b / bw) for ops, b in ((1, 10_000), (4, 2_000_000),
                                                            (2, 300_000))]
    link = fit_link(samples)
    assert link.latency == pytest.approx(lat) and link.bandwidth == pytest.approx(bw)
    one = fit_link([(1, 1000, 1e-3)])
    assert one == Link(1e6) and fit_link([]) is None and fit_link([(1, 0, 1.0)]) is None


