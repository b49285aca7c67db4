"""Compression inside torch.compile graphs: diffusers' context parallelism with its blocks
compiled ``fullgraph=True`` (so with no graph break) on 2 gloo processes, the hook points
calling the ``compressed_comm::`` custom ops (:mod:`compressed_comm.ops`)."""

import cc_compile_workers as workers
import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("diffusers")

WORLD = 2
#: (name, model, ulysses degree, ring degree, asynchronous, how the blocks are compiled)
CASES = (("flux ulysses", "flux", WORLD, 1, False, "regional"),
         ("wan ulysses", "wan", WORLD, 1, False, "per block"),
         ("flux stale ring", "flux", 1, WORLD, True, "per block"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("compile")
    mp.spawn(workers.compile_worker,
             args=(WORLD, str(d / "store"), str(d), CASES, "aot_eager"),
             nprocs=WORLD, join=True)
    return [torch.load(d / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_compiled_blocks_compress_like_eager(results, case):
    for per_rank in results:
        r = per_rank[case]
        assert r["raw_vs_eager"] < 1e-6  # the compiled baseline itself
        assert r["identity_as_eager"], case  # bit for bit with eager identity ...
        assert r["identity_exact"] or "stale" in case  # ... and with compiled raw
        assert r["binary_vs_eager_binary"] <= 1e-3, (case, r["binary_vs_eager_binary"])
        assert 0 < r["binary_vs_raw"] < 0.05, (case, r["binary_vs_raw"])
        # compressed, not silently raw: the same bytes as eager, 8x fewer after warm-up
        assert r["binary_sizes"] == r["eager_binary_sizes"]
        assert all(b * 8 <= r["identity_bytes"][-1] for b in r["binary_sizes"][1:])
        assert r["second_session_equal"] and r["second_session_compiles"] == 0
        assert r["after_disable_exact"]


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_a_compiled_block_has_no_graph_break_and_calls_the_ops(results, case):
    kind = "all_gather" if "ring" in case else "all_to_all"
    for per_rank in results:
        r = per_rank[case]
        assert r["explain_breaks"] == 0
        assert r["explain_ops"] == [f"compressed_comm.{kind}.default"]
        # streams are named in call order inside compiled regions
        assert r["streams"] and all(n.startswith(f"{kind}:model.") for n in r["streams"])


def test_a_model_compiled_as_a_whole_is_refused_with_what_to_do():
    from adapters.xdit import enable_compression

    in_place = torch.nn.Linear(2, 2)
    in_place.compile()
    for compiled in (torch.compile(torch.nn.Linear(2, 2)), in_place):
        with pytest.raises(RuntimeError, match=r"compiled as a whole.*enable_compression\("
                                               r".*then compile.*compile_repeated_blocks"):
            enable_compression(compiled)


@pytest.fixture(scope="module")
def op_results(tmp_path_factory):
    pytest.importorskip("yunchang")
    d = tmp_path_factory.mktemp("ops")
    mp.spawn(workers.ops_worker, args=(WORLD, str(d / "store"), str(d), "aot_eager"),
             nprocs=WORLD, join=True)
    return [torch.load(d / f"ops{r}.pt") for r in range(WORLD)]


def test_every_op_compiles_fullgraph_and_equals_eager(op_results):
    """all_to_all, all_gather (fresh and stale), ring_pass and yunchang's Ulysses
    all-to-all: compiled equals eager bit for bit, with ``identity`` also the uncompressed
    collectives (the stale gather: on its first, synchronous step)."""
    for rank, r in enumerate(op_results):
        for codec in ("identity", "binary"):
            for eager, compiled in zip(r[f"{codec}:eager"], r[f"{codec}:compiled"]):
                assert all(torch.equal(a, b) for a, b in zip(eager, compiled)), codec
            assert r[f"{codec}:eager:bytes"] == r[f"{codec}:compiled:bytes"]
        previous = None
        for got, (a2a, gathered) in zip(r["identity:compiled"], r["raw"]):
            fresh_a2a, fresh, stale, ring, _ = got
            assert torch.equal(fresh_a2a, a2a) and torch.equal(fresh, gathered)
            assert torch.equal(ring, gathered)
            # own slot fresh, the others' of the previous step (the first step: fresh)
            slots = list(gathered.chunk(WORLD))
            stale_source = gathered if previous is None else previous
            for origin, old in enumerate(stale_source.chunk(WORLD)):
                slots[origin] = slots[origin] if origin == rank else old
            assert torch.equal(stale, torch.cat(slots))
            previous = gathered
        # binary compresses after its warm-up step: smaller and not exact
        ident, binary = r["identity:compiled:bytes"], r["binary:compiled:bytes"]
        assert all(b * 4 < i for b, i in zip(binary[1:], ident[1:]))
        assert not torch.equal(r["binary:compiled"][-1][0], r["identity:compiled"][-1][0])
        assert max(float((b - a).norm() / a.norm()) for a, b in
                   zip(r["identity:compiled"][-1], r["binary:compiled"][-1])) < 0.05


def test_explain_finds_no_graph_break_and_every_op(op_results):
    for r in op_results:
        for codec in ("identity", "binary"):
            assert r[f"{codec}:breaks"] == 0
            assert r[f"{codec}:ops"] == ["compressed_comm.all_gather.default",
                                         "compressed_comm.all_to_all.default",
                                         "compressed_comm.ring_pass.default"]
