"""Parallel attention on the four diffusers DiT classes, on virtual ranks."""

import copy

import pytest
import torch

from adapters.dit import ParallelConfig, parallelize, token_split
from compressed_comm import CompressionConfig
from compressed_comm.testing import run_ranks
from simulator.workloads import make_workload, sample

MODELS = ["sd3", "flux", "pixart", "cogvideox"]
STEPS = 3


@pytest.fixture(scope="module", params=MODELS)
def workload(request):
    return make_workload(request.param, batch=2, seed=0)


def parallel_sample(workload, world, config, steps=STEPS):
    """Every rank samples with its own parallelised copy; returns (latents per rank, handles)."""
    def body(t):
        model = copy.deepcopy(workload.model)
        par = parallelize(model, t, config)
        latents = sample(workload, model, steps)
        par.finish()
        return latents, par
    return run_ranks(world, body)


def single_forward(workload, world, config):
    x, t = workload.noise, torch.full((workload.noise.shape[0],), 0.7)

    def body(tr):
        model = copy.deepcopy(workload.model)
        parallelize(model, tr, config)
        with torch.no_grad():
            return workload.forward(model, x, t)
    with torch.no_grad():
        ref = workload.forward(workload.model, x, t)
    return ref, run_ranks(world, body)


@pytest.mark.parametrize("parallelism, world", [("patch", 2), ("patch", 3), ("ring", 2),
                                                ("ring", 3), ("ulysses", 2), ("ulysses", 4)])
def test_exact_parallel_equals_single_device(workload, parallelism, world):
    ref, outs = single_forward(workload, world, ParallelConfig(parallelism))
    for out in outs:
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parallelism", ["patch", "ring", "ulysses"])
def test_identity_codec_equals_raw_exactly(workload, parallelism):
    raw = parallel_sample(workload, 2, ParallelConfig(parallelism))
    ident = parallel_sample(workload, 2, ParallelConfig(
        parallelism, CompressionConfig(codec="identity")))
    for (a, _), (b, _) in zip(raw, ident):
        assert torch.equal(a, b)


@pytest.mark.parametrize("codec", ["binary", "lowrank:4", "int2"])
@pytest.mark.parametrize("parallelism", ["patch", "ring", "ulysses"])
def test_compressed_modes_run_close_to_exact_in_lock_step(workload, codec, parallelism):
    world = 2
    raw = parallel_sample(workload, world, ParallelConfig(parallelism))[0][0]
    res = parallel_sample(workload, world, ParallelConfig(
        parallelism, CompressionConfig(codec=codec)))
    latents = [r[0] for r in res]
    assert all(torch.equal(latents[0], x) for x in latents)  # every rank holds the same output
    assert torch.isfinite(latents[0]).all()
    assert float((latents[0] - raw).norm() / raw.norm()) < 0.05
    # receivers' references equal the senders' own, stream by stream
    sessions = [r[1].exchange.session for r in res]
    encoders = [{s.name: s for s in sess if s.role == "encoder"} for sess in sessions]
    checked = 0
    for sess in sessions:
        for s in sess:
            if s.role == "decoder":
                assert torch.equal(s.reference, encoders[s.origin][s.name].reference), s.name
                checked += 1
    assert checked > 0
    # streams are named by layer and K/V, never by a global counter
    names = {s.name for s in sessions[0]}
    assert any(".k" in n and "attn" in n for n in names)
    assert res[0][1].exchange.bytes_sent > 0


def test_distrifusion_with_all_steps_synchronous_is_exact(workload):
    raw = parallel_sample(workload, 2, ParallelConfig("patch"))
    sync = parallel_sample(workload, 2, ParallelConfig("patch", asynchronous=True,
                                                       warmup=STEPS))
    stale = parallel_sample(workload, 2, ParallelConfig("patch", asynchronous=True, warmup=1))
    assert torch.equal(raw[0][0], sync[0][0])
    assert not torch.equal(raw[0][0], stale[0][0])
    assert float((stale[0][0] - raw[0][0]).norm() / raw[0][0].norm()) < 0.05


def test_compression_combines_with_asynchronous_exchange(workload):
    raw = parallel_sample(workload, 3, ParallelConfig("patch"))[0][0]
    both = parallel_sample(workload, 3, ParallelConfig(
        "patch", CompressionConfig(codec="binary"), asynchronous=True, warmup=1))
    assert all(torch.equal(both[0][0], r[0]) for r in both)
    assert float((both[0][0] - raw).norm() / raw.norm()) < 0.05


def test_uneven_token_split():
    split = token_split(35, 4)
    assert split.counts == (9, 9, 9, 8)
    assert [split.slice(r) for r in range(4)] == [slice(0, 9), slice(9, 18), slice(18, 27),
                                                  slice(27, 35)]
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4,
                                  num_layers=1, attention_head_dim=8, num_attention_heads=4,
                                  joint_attention_dim=16, caption_projection_dim=32,
                                  pooled_projection_dim=16, pos_embed_max_size=16)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()
    kw = dict(hidden_states=torch.randn(1, 4, 10, 14), encoder_hidden_states=torch.randn(1, 3, 16),
              pooled_projections=torch.randn(1, 16), timestep=torch.tensor([500.0]))
    with torch.no_grad():
        ref = model(**kw, return_dict=False)[0]

    def body(t):
        m = copy.deepcopy(model)
        par = parallelize(m, t, ParallelConfig("ring"))
        with torch.no_grad():
            out = m(**kw, return_dict=False)[0]
        return out, par.split.counts
    for out, counts in run_ranks(4, body):  # 35 tokens over 4 ranks
        assert counts == (9, 9, 9, 8)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_remove_restores_the_model(workload):
    x, t = workload.noise, torch.full((workload.noise.shape[0],), 0.5)
    with torch.no_grad():
        before = workload.forward(workload.model, x, t)

    def body(tr):
        model = copy.deepcopy(workload.model)
        par = parallelize(model, tr, ParallelConfig("patch"))
        par.remove()
        with torch.no_grad():
            return workload.forward(model, x, t)
    for out in run_ranks(2, body):
        assert torch.equal(out, before)


def test_bad_configurations_raise():
    with pytest.raises(ValueError, match="unknown parallelism 'tensor'"):
        ParallelConfig("tensor")
    with pytest.raises(ValueError, match="needs patch parallelism"):
        ParallelConfig("ring", asynchronous=True)

    def unsupported(t):
        parallelize(torch.nn.Linear(2, 2), t)
    with pytest.raises(ValueError, match="unsupported model Linear; supported: Flux"):
        run_ranks(1, unsupported)

    workload = make_workload("sd3", batch=1)

    def odd_processor(t):
        from diffusers.models.attention_processor import AttnProcessor
        model = copy.deepcopy(workload.model)
        model.transformer_blocks[0].attn.set_processor(AttnProcessor())
        parallelize(model, t)
    with pytest.raises(ValueError, match="unsupported attention processor AttnProcessor; "
                                         "expected JointAttnProcessor2_0"):
        run_ranks(1, odd_processor)

    def ulysses_three(t):
        model = copy.deepcopy(workload.model)
        parallelize(model, t, ParallelConfig("ulysses"))
        with torch.no_grad():
            workload.forward(model, workload.noise, torch.ones(1))
    with pytest.raises(ValueError, match=r"head count \(4\) to be a multiple of the world size"):
        run_ranks(3, ulysses_three)
