"""Compression inside torch.compile graphs: diffusers' context parallelism with its blocks
compiled ``fullgraph=True`` (so with no graph break) on 2 gloo processes, the hook points
calling the ``compressed_comm::`` custom ops (:mod:`compressed_comm.ops`)."""

import pytest
import torch
import torch.multiprocessing as mp

import cc_compile_workers as workers

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
