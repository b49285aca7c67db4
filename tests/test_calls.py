"""Several transformer calls per denoising step (classifier-free guidance as two calls,
skip-layer guidance as a third): each call has its own streams and its own warm-up."""

import copy

import pytest
import torch

from adapters.calls import MAX_MARKED_CALLS, StepCalls
from adapters.dit import ParallelConfig, parallelize
from compressed_comm import CompressionConfig
from compressed_comm.testing import run_ranks
from simulator.workloads import flux_workload

GUIDANCE = 5.0


def prefixes(calls, tags):
    """The stream prefix of each call (None: untagged), and the step each one ran in."""
    out = []
    for tag in tags:
        if tag is None:
            calls.begin_call()
        else:
            with calls.tagged(tag):
                calls.begin_call()
        out.append((calls.prefix, calls.step))
    return out


def test_unmarked_untagged_calls_are_steps_of_one_call():
    assert prefixes(StepCalls(), [None] * 3) == [("", 0), ("", 1), ("", 2)]


def test_tags_key_the_calls_of_a_step_and_a_repeated_tag_starts_the_next():
    calls = StepCalls()
    got = prefixes(calls, ["cond", "uncond", "cond", "uncond", "slg", "cond", "cond"])
    assert got == [("cond/", 0), ("uncond/", 0), ("cond/", 1), ("uncond/", 1), ("slg/", 1),
                   ("cond/", 2), ("cond/", 3)]  # guidance stopped: one call per step


def test_marked_steps_key_untagged_calls_by_their_index():
    calls = StepCalls(marked=True)
    ends = []
    calls.on_step_end(lambda: ends.append(calls.step))
    got = prefixes(calls, [None, None])
    calls.end_step()
    got += prefixes(calls, [None, None, None])  # a third call (skip-layer guidance)
    calls.end_step()
    got += prefixes(calls, [None])  # guidance stopped
    assert got == [("", 0), ("call1/", 0), ("", 1), ("call1/", 1), ("call2/", 1), ("", 2)]
    assert ends == [1, 2]
    calls.end_step()
    calls.end_step()  # a step without transformer calls (hook points driven directly)
    assert calls.step == 4 and ends == [1, 2, 3, 4]
    calls.reset()
    assert calls.step == 0 and prefixes(calls, [None]) == [("", 0)]


def test_marked_steps_that_never_end_fall_back_to_one_call_per_step(caplog):
    calls = StepCalls(marked=True)
    got = prefixes(calls, [None] * (MAX_MARKED_CALLS + 2))
    assert [p for p, _ in got[:MAX_MARKED_CALLS]] == [""] + [
        f"call{i}/" for i in range(1, MAX_MARKED_CALLS)]
    assert got[MAX_MARKED_CALLS:] == [("", 0), ("", 1)]  # memory stays bounded
    assert not calls.marked and "without a scheduler step" in caplog.text


@pytest.mark.parametrize("tag", ["", "a/b", None, 3])
def test_bad_tags_are_refused(tag):
    with pytest.raises(ValueError, match="call tag"):
        with StepCalls().tagged(tag):
            pass


# ---------------------------------------------------------------------- guidance end to end


def guided_latents(workload, mode, compression, world=2, steps=6):
    """Final latents of a guided flow-matching run, on ``world`` virtual ranks with patch
    parallelism: ``batched`` (cond and uncond in one call of batch 2) or ``tagged`` (two
    calls per step, tagged); also this rank's stream names."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(1, 8, 32, generator=g), torch.zeros(1, 8, 32)
    pooled = torch.randn(1, 32, generator=g)
    tokens = workload.noise.shape[1]
    side = int(tokens ** 0.5)
    img_ids = torch.zeros(tokens, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(tokens) // side, torch.arange(tokens) % side

    def forward(model, x, t, text):
        b = x.shape[0]
        return model(hidden_states=x, timestep=t.expand(b), encoder_hidden_states=text,
                     pooled_projections=pooled.expand(b, -1), img_ids=img_ids,
                     txt_ids=torch.zeros(8, 3), return_dict=False)[0]

    def body(tr):
        model = copy.deepcopy(workload.model)
        par = parallelize(model, tr, ParallelConfig("patch", compression=compression))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(steps)
        latents = workload.noise[:1].clone()
        with torch.no_grad():
            for t in scheduler.timesteps:
                t = (t / 1000).reshape(1)
                if mode == "batched":
                    c, u = forward(model, latents.expand(2, -1, -1), t,
                                   torch.cat([cond, uncond])).chunk(2)
                else:
                    with par.tag("cond"):
                        c = forward(model, latents, t, cond)
                    with par.tag("uncond"):
                        u = forward(model, latents, t, uncond)
                latents = scheduler.step(u + GUIDANCE * (c - u), t * 1000, latents,
                                         return_dict=False)[0]
        par.finish()
        names = sorted({s.name for s in par.exchange.session}) if compression else []
        return latents, names
    return run_ranks(world, body)


def test_two_guided_calls_per_step_are_as_accurate_as_batched_guidance():
    workload = flux_workload(1, 0)
    exact = guided_latents(workload, "batched", None)[0][0]
    binary = CompressionConfig(codec="binary")
    errors = {}
    for mode in ("batched", "tagged"):
        results = guided_latents(workload, mode, binary)
        latents = [r[0] for r in results]
        assert all(torch.equal(latents[0], x) for x in latents)
        errors[mode] = float((latents[0] - exact).norm() / exact.norm())
        if mode == "tagged":  # each call has its own streams
            names = results[0][1]
            assert any(n.startswith("all_gather:cond/") for n in names)
            assert any(n.startswith("all_gather:uncond/") for n in names)
    assert 0 < errors["tagged"] <= 1.5 * errors["batched"], errors
