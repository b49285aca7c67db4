"""diffusers' own context parallelism (Ulysses), compressed through the ``diffusers_ulysses``
hook point: four ``_cp_plan`` models on 2 gloo processes (one spawn, tiny random weights)."""

import pytest
import torch
import torch.multiprocessing as mp

import cc_diffusers_cp_workers as workers
from adapters.xdit import HOOK_POINTS, KNOWN_VERSIONS
from adapters.xdit.points import installed_version

pytest.importorskip("diffusers")

WORLD = 2
MODELS = ("flux", "wan", "qwenimage", "ltxvideo")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("diffusers_cp")
    mp.spawn(workers.ulysses_worker, args=(WORLD, str(d / "store"), str(d), MODELS),
             nprocs=WORLD, join=True)
    return [torch.load(d / f"rank{r}.pt") for r in range(WORLD)]


def test_tested_diffusers_version_is_the_installed_one():
    assert installed_version("diffusers") in KNOWN_VERSIONS["diffusers"]
    assert HOOK_POINTS["diffusers_ulysses"].library == "diffusers"


@pytest.mark.parametrize("model", MODELS)
def test_ulysses_identity_is_exact_and_binary_small_and_bounded(results, model):
    for rank, res in enumerate(results):
        r = res[model]
        assert r["cp_vs_single"] < 1e-5  # diffusers' CP itself, as a baseline
        ident, binary = r["identity"], r["binary"]
        assert "diffusers_ulysses" in ident["points"]
        assert ident["exact"], (rank, model)  # bit-exact with diffusers' own CP
        assert ident["bytes"][0] == binary["bytes"][0]  # the warmup step is lossless
        assert all(b * 8 <= ident["bytes"][-1] for b in binary["bytes"][1:]), binary["bytes"]
        assert 0 < binary["max_rel"] < 0.02, (rank, model, binary["max_rel"])
        # one stream per (attention layer, Q/K/V/out, peer)
        names = binary["streams"]
        assert names and all(n.startswith("all_to_all:") and ".a2a" in n for n in names)
        assert {n.rsplit(".a2a", 1)[1].split("->")[0] for n in names} == {"0", "1", "2", "3"}


@pytest.mark.parametrize("model", MODELS)
def test_disable_restores_diffusers(results, model):
    for res in results:
        assert res[model]["restored"] and res[model]["after_disable_exact"]
