"""diffusers' own context parallelism, compressed through the ``diffusers_ulysses`` and
``diffusers_ring`` hook points: four ``_cp_plan`` models, Ulysses and ring, on 2 gloo
processes (one spawn per mode, tiny random weights), and a 2 x 2 Ulysses x ring mesh on 4."""

import pytest
import torch
import torch.multiprocessing as mp

import cc_diffusers_cp_workers as workers
from adapters.hooks.diffusers_cp import lse_attention_on_cpu, math_attention
from adapters.hooks.points import installed_version
from adapters.xdit import HOOK_POINTS, KNOWN_VERSIONS

pytest.importorskip("diffusers")

WORLD = 2
MODELS = ("flux", "wan", "qwenimage", "ltxvideo")


MODES = {"ulysses": (WORLD, 1), "ring": (1, WORLD)}
POINT = {"ulysses": ("diffusers_ulysses",), "ring": ("diffusers_ring",),
         "mesh": ("diffusers_ulysses", "diffusers_ring")}


def spawn(tmp_path_factory, world, names, degrees, asynchronous=False):
    d = tmp_path_factory.mktemp("diffusers_cp")
    mp.spawn(workers.cp_worker,
             args=(world, str(d / "store"), str(d), names, degrees, asynchronous),
             nprocs=world, join=True)
    return [torch.load(d / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module", params=list(MODES))
def results(request, tmp_path_factory):
    return request.param, spawn(tmp_path_factory, WORLD, MODELS, MODES[request.param])


def test_lse_attention_on_cpu_swaps_the_native_op_while_entered_and_is_reusable():
    from diffusers.models import attention_dispatch

    native = attention_dispatch._native_attention_forward_op
    context = lse_attention_on_cpu()
    for _ in range(2):
        with context:
            assert attention_dispatch._native_attention_forward_op is math_attention
            with context:
                assert attention_dispatch._native_attention_forward_op is math_attention
            assert attention_dispatch._native_attention_forward_op is math_attention
        assert attention_dispatch._native_attention_forward_op is native


def test_tested_diffusers_version_is_the_installed_one():
    assert installed_version("diffusers") in KNOWN_VERSIONS["diffusers"]
    assert HOOK_POINTS["diffusers_ulysses"].library == "diffusers"


def check(mode, res, model):
    r = res[model]
    assert r["cp_vs_single"] < 1e-5  # diffusers' CP itself, as a baseline
    ident, binary = r["identity"], r["binary"]
    assert set(POINT[mode]) <= set(ident["points"])
    assert ident["exact"], (mode, model)  # bit-exact with diffusers' own CP
    assert ident["bytes"][0] == binary["bytes"][0]  # the warmup step is lossless
    assert all(b * 8 <= ident["bytes"][-1] for b in binary["bytes"][1:]), binary["bytes"]
    assert 0 < binary["max_rel"] < 0.02, (mode, model, binary["max_rel"])
    names = binary["streams"]
    if mode == "ulysses":  # one stream per (attention layer, Q/K/V/out, peer)
        assert names and all(n.startswith("all_to_all:") and ".a2a" in n for n in names)
        assert {n.rsplit(".a2a", 1)[1].split("->")[0] for n in names} == {"0", "1", "2", "3"}
    if mode == "ring":  # one stream per (attention layer, call), per origin
        assert names and all(n.startswith("all_gather:") and ".kv" in n for n in names)
    if mode == "mesh":
        assert any(".a2a" in n for n in names) and any(".kv" in n for n in names)


@pytest.mark.parametrize("model", MODELS)
def test_identity_is_exact_and_binary_small_and_bounded(results, model):
    mode, per_rank = results
    for res in per_rank:
        check(mode, res, model)


@pytest.mark.parametrize("model", MODELS)
def test_disable_restores_diffusers(results, model):
    for res in results[1]:
        assert res[model]["restored"] and res[model]["after_disable_exact"]


def test_ulysses_by_ring_mesh_on_four_processes(tmp_path_factory):
    for res in spawn(tmp_path_factory, 4, ("flux",), (2, 2)):
        check("mesh", res, "flux")
        assert res["flux"]["restored"] and res["flux"]["after_disable_exact"]


def test_stale_kv_ring_is_patch_parallelism_with_bounded_error(tmp_path_factory):
    """asynchronous=True: the other ranks' K/V of the previous step (DistriFusion)."""
    for res in spawn(tmp_path_factory, WORLD, ("flux", "wan"), (1, WORLD), asynchronous=True):
        for model in ("flux", "wan"):
            ident, binary = res[model]["identity"], res[model]["binary"]
            assert ident["first_exact"] and binary["first_exact"]  # no stale K/V yet
            assert not ident["exact"]  # later steps attend to last step's K/V
            assert ident["max_rel"] < 0.05 and binary["max_rel"] < 0.05, (model, ident, binary)
            assert all(b * 8 <= ident["bytes"][-1] for b in binary["bytes"][1:])


def test_a_moved_diffusers_attribute_names_the_version_known_to_work(monkeypatch):
    from diffusers.models import attention_dispatch

    from adapters.xdit import HookPointError, enable_compression

    funcol = attention_dispatch.funcol
    monkeypatch.delattr(attention_dispatch, "_all_to_all_single")
    with pytest.raises(HookPointError, match=r"_all_to_all_single.*diffusers 0\.42\.1"):
        enable_compression(torch.nn.Linear(2, 2), points=["diffusers_ring",
                                                          "diffusers_ulysses"])
    assert attention_dispatch.funcol is funcol  # the ring, bound first, was unbound again


def test_auto_binds_diffusers_points_only_for_a_parallel_model():
    from adapters.xdit import enable_compression

    model = torch.nn.Linear(2, 2)
    handle = enable_compression(model)
    assert not {"diffusers_ulysses", "diffusers_ring"} & set(handle.points)
    handle.disable()
    model._parallel_config = object()  # as enable_parallelism leaves it
    handle = enable_compression(model)
    assert {"diffusers_ulysses", "diffusers_ring"} <= set(handle.points)
    handle.disable()


def test_guidance_as_two_calls_per_step_is_as_accurate_as_batched(tmp_path):
    """A pipeline that runs the conditional and the unconditional branch as two transformer
    calls per step: its scheduler's step() marks the steps, each call has its own streams
    (``call1/`` for the second) and warm-up, so the guided result is as accurate as batched
    guidance's; steps whose number of calls varies (guidance stopped, a third call) work."""
    mp.spawn(workers.cfg_worker, args=(WORLD, str(tmp_path / "store"), str(tmp_path)),
             nprocs=WORLD, join=True)
    for rank in range(WORLD):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        batched, two = res["batched"], res["two calls"]
        assert 0 < two["error"] <= 1.5 * batched["error"], res
        assert batched["steps"] == two["steps"] == 6  # one step per scheduler.step
        assert any("call1/" in n for n in two["streams"])
        assert not any("call1/" in n for n in batched["streams"])
        varying = res["varying"]
        assert varying["finite"] and varying["steps"] == 6
        assert any("call2/" in n for n in varying["streams"])
