"""Guidance as two calls per step against batched, on the trained photos model."""

import dataclasses

import pytest

from simulator.guidance import MODES, guided_run, photos_guided
from simulator.metrics import quality
from simulator.run import make_methods


@pytest.fixture(scope="module")
def work():
    return photos_guided(batch=1, seed=3)


def test_exact_two_calls_match_batched_guidance(work):
    raw = make_methods("patch", [], distrifusion=False)[0]
    batched = guided_run(work, "batched", raw, world=2, steps=3)
    two = guided_run(work, "two calls", raw, world=2, steps=3)
    assert quality(two.images, batched.images, two.latents, batched.latents).rel_l2 < 1e-5
    # both branches moved K/V: twice the one-call traffic, in two calls or one of batch 2
    assert two.bytes_per_step == pytest.approx(batched.bytes_per_step, rel=0.01)


def test_guidance_changes_the_output(work):
    raw = make_methods("patch", [], distrifusion=False)[0]
    guided = guided_run(work, "batched", raw, world=2, steps=3)
    plain = guided_run(dataclasses.replace(work, scale=1.0), "batched", raw, world=2, steps=3)
    assert quality(plain.images, guided.images, plain.latents, guided.latents).rel_l2 > 0.01


def test_unknown_mode_is_refused(work):
    raw = make_methods("patch", [], distrifusion=False)[0]
    with pytest.raises(ValueError, match="mode must be one of"):
        guided_run(work, "interleaved", raw, world=2, steps=1)
    assert "two calls" in MODES
