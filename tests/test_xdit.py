"""The xDiT adapter: hook points bound to real xfuser / yunchang / torch code over gloo.

One spawn of 2 gloo processes runs every hook point's real code path (xfuser's Ulysses
all-to-all functions and PipelineGroupCoordinator, torch's _templated_ring_attention with
both rotate methods, yunchang's LongContextAttention ring) unpatched and compressed; see
cc_xdit_workers.py. The rest checks binding, unbinding and bad input in this process.
"""

import inspect
import json
import subprocess
import sys

import cc_xdit_workers as workers
import pytest
import torch
import torch.multiprocessing as mp

from adapters.hooks.points import installed_version, load_module
from adapters.xdit import HOOK_POINTS, KNOWN_VERSIONS, HookPoint, HookPointError, enable_compression
from compressed_comm import CompressionConfig

WORLD = 2
POINTS = ["ulysses", "torch_ring:allgather", "torch_ring:alltoall", "yunchang_ring",
          "yunchang_ulysses", "pipefusion"]


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("xdit")
    mp.spawn(workers.xdit_worker, args=(WORLD, str(d / "store"), str(d)), nprocs=WORLD,
             join=True)
    return [json.loads((d / f"xdit_{r}.json").read_text()) for r in range(WORLD)]


def test_tested_versions_are_the_installed_ones():
    for lib in ("xfuser", "yunchang", "torch"):
        assert installed_version(lib).split("+")[0] in KNOWN_VERSIONS[lib]


@pytest.mark.parametrize("point", POINTS)
def test_identity_is_exact_and_binary_is_bounded_and_smaller(gloo_results, point):
    for rank, res in enumerate(gloo_results):
        ident, binary = res[f"{point}:identity"], res[f"{point}:binary"]
        assert ident["exact"], (rank, ident)
        assert binary["first_exact"]  # warmup step: lossless
        assert 0 < binary["max_rel"] < 0.3, (rank, binary)
        assert binary["last_bytes"] * 8 < ident["last_bytes"], (rank, binary, ident)
        assert ident["streams"] == binary["streams"] > 0


@pytest.mark.parametrize("point", POINTS)
def test_identity_sends_the_raw_bytes_plus_headers(gloo_results, point):
    res = gloo_results[0]
    raw = res[f"{point.split(':')[0]}:raw_bytes"]
    # payload headers, and the size handshake before each of at most 4 collectives a step
    handshake = (64 + 16 * WORLD) * (WORLD - 1)
    assert 0 < res[f"{point}:identity"]["last_bytes"] - raw <= 0.01 * raw + 4 * handshake


def test_packed_gqa_all_to_all_goes_uncompressed(gloo_results):
    for res in gloo_results:
        assert res["ulysses:packed"] == {"exact": True, "bytes": 0}


def test_unpatched_baselines_are_the_full_computation(gloo_results):
    for res in gloo_results:
        assert res["torch_ring:allgather:vs_full"] < 1e-5
        assert res["torch_ring:alltoall:vs_full"] < 1e-5
        assert res["yunchang_ring:vs_full"] < 1e-5
        assert res["yunchang_ulysses:vs_full"] < 1e-5
        assert res["pipefusion:raw_exact"]


def test_layers_steps_sessions_cfg_and_compile(gloo_results):
    expected = sorted(f"all_to_all:cfg1/blocks.{b}.a2a{n}->{dst}"
                      for b in range(2) for n in range(2) for dst in range(WORLD))
    for res in gloo_results:
        for gen in ("hooks:gen0", "hooks:gen1"):  # set_timesteps starts a new session
            assert res[gen] == {"exact": True, "names": expected, "steps": [4],
                                "handle_steps": 4}  # one step per scheduler.step
        assert res["hooks:compiled"] == {"exact": True, "streams": len(expected),
                                         "steps": [4]}


# ---------------------------------------------------------------------- in this process

def _originals():
    import yunchang.comm.all_to_all as ya
    import yunchang.ring.utils as yu
    from torch.distributed.tensor.experimental import _attention as reexport
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp
    return {"rotater": cp._create_rotater, "entry": cp._templated_ring_attention,
            "reexport": reexport._templated_ring_attention,
            "send_recv": vars(yu.RingComm)["send_recv"], "commit": vars(yu.RingComm)["commit"],
            "wait": vars(yu.RingComm)["wait"], "dist": ya.dist}


@pytest.fixture
def no_xfuser(monkeypatch):
    monkeypatch.delitem(sys.modules, "xfuser", raising=False)


def test_import_needs_no_optional_library():
    code = ("import sys, adapters.xdit; "
            "print(sorted(m for m in ('xfuser', 'yunchang', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_auto_binds_what_is_in_use_and_disable_restores_everything(no_xfuser):
    before = _originals()
    handle = enable_compression(torch.nn.Linear(2, 2))
    assert handle.points == ("torch_ring", "yunchang_ring", "yunchang_ulysses")
    assert handle.enabled
    after = _originals()
    assert all(after[k] is not before[k] for k in before)
    assert after["entry"] is after["reexport"]  # the re-export is rebound too
    handle.disable()
    assert _originals() == before and not handle.enabled
    handle.disable()  # twice: nothing left to do
    assert _originals() == before


def test_enabling_twice_is_refused_until_disabled(no_xfuser):
    first = enable_compression(torch.nn.Linear(2, 2), points=["yunchang_ring"])
    try:
        before = _originals()
        with pytest.raises(HookPointError, match="already compressed .*disable"):
            enable_compression(torch.nn.Linear(2, 2), points=["torch_ring", "yunchang_ring"])
        assert _originals() == before  # the refused call left nothing bound
    finally:
        first.disable()
    second = enable_compression(torch.nn.Linear(2, 2), points=["yunchang_ring"])
    second.disable()


def test_a_moved_hook_point_names_the_attribute_and_known_versions(monkeypatch):
    import yunchang.ring.utils as yu
    before = _originals()
    monkeypatch.delattr(yu.RingComm, "commit")
    with pytest.raises(HookPointError, match=r"RingComm has no attribute 'commit'.*yunchang "
                                             r"0\.6\.4"):
        enable_compression(torch.nn.Linear(2, 2), points=["torch_ring", "yunchang_ring"])
    monkeypatch.undo()
    assert _originals() == before  # torch_ring, bound first, was unbound again


def test_an_unimportable_hook_point_is_an_error_when_asked_for():
    point = HookPoint("x", "xfuser", "compressed_comm_no_such_module", "", ("f",), "a test")
    assert load_module(point, required=False) is None
    with pytest.raises(HookPointError, match="failed to import.*ModuleNotFoundError"):
        load_module(point, required=True)


def test_bad_arguments_are_refused(no_xfuser):
    with pytest.raises(ValueError, match="points is empty and patch is None"):
        enable_compression(torch.nn.Linear(2, 2), points=[])
    with pytest.raises(ValueError, match="unknown hook points \\['nccl'\\]"):
        enable_compression(torch.nn.Linear(2, 2), points=["nccl"])
    with pytest.raises(TypeError, match="pipeline .* or a torch.nn.Module; got int"):
        enable_compression(3)
    with pytest.raises(TypeError, match="CompressionConfig"):
        enable_compression(torch.nn.Linear(2, 2), {"codec": "binary"})
    with pytest.raises(ValueError, match="timeout"):
        enable_compression(torch.nn.Linear(2, 2), timeout=0)
    with pytest.raises(RuntimeError, match="compiled as a whole.*then compile it"):
        enable_compression(torch.compile(torch.nn.Linear(2, 2)))
    assert set(HOOK_POINTS) == {"ulysses", "torch_ring", "yunchang_ring", "yunchang_ulysses",
                                "pipefusion", "diffusers_ulysses", "diffusers_ring", "dtensor_reduce"}


def test_the_scheduler_hook_is_removed_on_disable(no_xfuser):
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = SimpleNamespace(transformer=torch.nn.Linear(2, 2),
                           scheduler=FlowMatchEulerDiscreteScheduler())
    signature = inspect.signature(pipe.scheduler.set_timesteps)
    handle = enable_compression(pipe, CompressionConfig(codec="int8"))
    assert "set_timesteps" in vars(pipe.scheduler)
    # diffusers' retrieve_timesteps looks for "sigmas" in the signature (FLUX, SD3)
    assert inspect.signature(pipe.scheduler.set_timesteps) == signature
    assert "sigmas" in signature.parameters
    assert "step" in vars(pipe.scheduler)
    pipe.scheduler.set_timesteps(4)
    pipe.transformer(torch.ones(2))
    pipe.transformer(torch.ones(2))  # guidance as a second call: its own streams
    assert handle.steps == 0 and handle.calls.prefix == "call1/"
    pipe.scheduler.step(torch.ones(2), pipe.scheduler.timesteps[0], torch.ones(2))
    assert handle.steps == 1
    pipe.scheduler.set_timesteps(4)  # a new generation
    assert handle.steps == 0
    handle.disable()
    assert "set_timesteps" not in vars(pipe.scheduler) and "step" not in vars(pipe.scheduler)
    assert not pipe.transformer._forward_pre_hooks


def test_the_scheduler_behind_an_xdit_style_wrapper_is_hooked_and_restored(no_xfuser):
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    class SchedulerWrapper:  # how xDiT's xFuserSchedulerBaseWrapper delegates
        def __init__(self, module):
            object.__setattr__(self, "module", module)
            object.__setattr__(self, "steps", 0)

        def __getattr__(self, name):
            return getattr(self.module, name)

        def __setattr__(self, name, value):  # forwarded to the wrapped scheduler
            setattr(self.module, name, value)

        def step(self, *args, **kwargs):  # under sequence parallelism: not the inner step
            object.__setattr__(self, "steps", self.steps + 1)

    inner = FlowMatchEulerDiscreteScheduler()
    wrapper = SchedulerWrapper(inner)
    pipe = SimpleNamespace(transformer=torch.nn.Linear(2, 2), scheduler=wrapper)
    handle = enable_compression(pipe)
    pipe.scheduler.set_timesteps(4)
    pipe.transformer(torch.ones(2))
    pipe.transformer(torch.ones(2))
    pipe.scheduler.step()
    assert handle.steps == 1 and wrapper.steps == 1  # the wrapper's own step() is hooked
    pipe.scheduler.set_timesteps(4)
    assert handle.steps == 0 and "set_timesteps" in vars(inner)
    assert "step" in vars(wrapper) and "step" not in vars(inner)
    handle.disable()
    assert "set_timesteps" not in vars(inner) and "step" not in vars(wrapper)
