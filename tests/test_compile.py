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


#: torch's ring attention's rotate methods (an all-gather, or a ring pass)
METHODS = ("allgather", "alltoall")


@pytest.fixture(scope="module")
def op_results(tmp_path_factory):
    pytest.importorskip("yunchang")
    d = tmp_path_factory.mktemp("ops")
    mp.spawn(workers.ops_worker, args=(WORLD, str(d / "store"), str(d), "aot_eager"),
             nprocs=WORLD, join=True)
    return [torch.load(d / f"ops{r}.pt") for r in range(WORLD)]


def test_every_op_compiles_fullgraph_and_equals_eager(op_results):
    """all_to_all, all_gather (fresh and stale), ring_pass, yunchang's Ulysses all-to-all
    and torch's ring attention (both rotate methods): compiled equals eager bit for bit;
    with ``identity`` also the uncompressed collectives and compiled raw ring attention."""
    for rank, r in enumerate(op_results):
        for method in METHODS:
            for codec in ("identity", "binary"):
                name = f"{method}:{codec}"
                for eager, compiled in zip(r[f"{name}:eager"], r[f"{name}:compiled"]):
                    assert all(torch.equal(a, b) for a, b in zip(eager, compiled)), name
                assert r[f"{name}:eager:bytes"] == r[f"{name}:compiled:bytes"], name
            previous = None
            ident = r[f"{method}:identity:compiled"]
            for got, (a2a, gathered), ring_raw in zip(ident, r["raw"], r[f"{method}:raw"]):
                fresh_a2a, fresh, stale, ring, _, ring_attention = got
                assert torch.equal(fresh_a2a, a2a) and torch.equal(fresh, gathered)
                assert torch.equal(ring, gathered) and torch.equal(ring_attention, ring_raw)
                # own slot fresh, the others' of the previous step (the first step: fresh)
                slots = list(gathered.chunk(WORLD))
                stale_source = gathered if previous is None else previous
                for origin, old in enumerate(stale_source.chunk(WORLD)):
                    slots[origin] = slots[origin] if origin == rank else old
                assert torch.equal(stale, torch.cat(slots))
                previous = gathered
            # binary compresses after its warm-up step: smaller and not exact
            binary = r[f"{method}:binary:compiled"]
            sizes = r[f"{method}:identity:compiled:bytes"], r[f"{method}:binary:compiled:bytes"]
            assert all(b * 4 < i for i, b in zip(*(s[1:] for s in sizes)))
            assert not any(torch.equal(a, b) for a, b in zip(ident[-1], binary[-1]))
            assert max(float((b - a).norm() / a.norm())
                       for a, b in zip(ident[-1], binary[-1])) < 0.05


def test_explain_finds_no_graph_break_and_every_op(op_results):
    for r in op_results:
        for method in METHODS:
            for codec in ("identity", "binary"):
                assert r[f"{method}:{codec}:breaks"] == 0
                assert r[f"{method}:{codec}:ops"] == ["compressed_comm.all_gather.default",
                                                      "compressed_comm.all_to_all.default",
                                                      "compressed_comm.ring_pass.default"]


@pytest.mark.parametrize("parallelism, asynchronous", [("patch", True), ("ring", False),
                                                       ("ulysses", False)])
def test_dit_parallel_blocks_compile_fullgraph_and_attend_like_eager(parallelism, asynchronous):
    """adapters.dit on virtual ranks, compressed (binary): its blocks compiled
    ``fullgraph=True`` run ``compressed_comm::dit_attend`` and equal eager bit for bit
    (eager streams are named by layer, compiled ones in call order: the same streams)."""
    import copy

    from adapters.dit import ParallelConfig, parallelize
    from compressed_comm import CompressionConfig
    from compressed_comm.testing import run_ranks
    from simulator.workloads import make_workload

    w = make_workload("flux", batch=1, seed=0)
    g = torch.Generator().manual_seed(5)
    xs = [w.noise + 0.02 * i * torch.randn(w.noise.shape, generator=g) for i in range(3)]
    config = ParallelConfig(parallelism, CompressionConfig(codec="binary"),
                            asynchronous=asynchronous)

    def body(t):
        model = copy.deepcopy(w.model)
        par = parallelize(model, t, config)
        blocks = [m for m in model.modules() if type(m).__name__ in model._repeated_blocks]

        def run():
            par.new_generation()
            with torch.no_grad():
                return [w.forward(model, x, torch.tensor([1.0 - i / 3]))
                        for i, x in enumerate(xs)]
        eager = run()
        for block in blocks:
            block.compile(fullgraph=True, backend="aot_eager")
        compiled = run()
        par.remove()
        return eager, compiled

    torch._dynamo.reset()
    for eager, compiled in run_ranks(2, body, timeout=600):
        assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
        assert not torch.equal(eager[-1], eager[0])
    # the layer's name is not in the graphs: no block recompiles another block's graph for it
    failures = [str(f) for fs in torch._dynamo.utils.guard_failures.values() for f in fs]
    assert failures and not [f for f in failures if "layer" in f]
