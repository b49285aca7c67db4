"""The method grammar (``simulator.methods``): one parser for the simulator, the what-if and
the benchmarks."""

import pytest

from simulator.methods import (DISTRIFUSION, RAW, STALE_PARALLELISMS, Method, method_list,
                               parse_method, parse_methods)
from simulator.run import make_methods
from simulator.whatif import run_what_if


@pytest.mark.parametrize("text, want", [
    ("raw", Method("raw", None, False)),
    ("distrifusion", Method("distrifusion", None, True)),
    ("binary", Method("binary", "binary", False)),
    (" LowRank:8 ", Method("lowrank:8", "lowrank:8", False)),
    ("int4+async", Method("int4+async", "int4", True)),
    ("BINARY +async", Method("binary+async", "binary", True)),
])
def test_every_form_parses_to_one_canonical_method(text, want):
    assert parse_method(text) == want


@pytest.mark.parametrize("text, message", [
    ("int3", "bad method 'int3': unknown codec 'int3'"),
    ("binary+sync", "bad method 'binary+sync': unknown codec"),
    ("raw+async", "raw+async is distrifusion"),
    ("distrifusion+async", "+async follows a codec spec"),
    ("+async", "bad method '+async'"),
])
def test_a_bad_method_names_itself_and_the_forms(text, message):
    with pytest.raises(ValueError, match="a method is raw, distrifusion, a codec spec") as err:
        parse_method(text)
    assert message in str(err.value)


def test_lists_parse_from_text_or_names_and_keep_each_name_once():
    assert parse_methods("binary, int2+async,,") == parse_methods(["binary", "int2+async"])
    assert [m.name for m in method_list(parse_methods("binary,raw,binary"))] == [
        "raw", "distrifusion", "binary"]
    assert method_list([], distrifusion=False) == [RAW]


@pytest.mark.parametrize("parallelism", ["patch", "cp-ring", "ring", "ulysses", "cp-ulysses",
                                         "pipefusion"])
def test_stale_methods_run_only_over_an_all_gather(parallelism):
    stale = parallelism in STALE_PARALLELISMS
    assert stale == (parallelism in ("patch", "cp-ring"))
    for method in (DISTRIFUSION, parse_method("binary+async")):
        assert method.runs_on(parallelism) == stale
        if not stale:
            with pytest.raises(ValueError, match=f"needs patch parallelism .* not "
                                                 f"'{parallelism}'"):
                method.check(parallelism)
    assert RAW.runs_on(parallelism) and parse_method("binary").runs_on(parallelism)


def test_the_simulator_and_the_what_if_agree_on_where_async_runs():
    """Virtual ranks refuse a stale method their parallelism cannot run; the what-if lists
    it as not applicable; both run it on patch parallelism."""
    assert [m.name for m in make_methods("patch", ["binary+async"])] == [
        "raw", "distrifusion", "binary+async"]
    with pytest.raises(ValueError, match=r"\+async needs patch"):
        make_methods("ring", ["binary+async"])
    assert [m.name for m in make_methods("ring", ["binary"])] == ["raw", "binary"]
    for parallelism in ("patch", "ring"):
        row = run_what_if("flux.1-dev", "l20", 4, parallelism, "1gbe",
                          ["binary+async"]).row("binary+async")
        assert row.applies == (parallelism == "patch")
