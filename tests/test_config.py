"""CompressionConfig validation."""

import dataclasses

import pytest

from compressed_comm import CompressionConfig


def test_defaults_are_the_seed_configuration():
    cfg = CompressionConfig()
    assert (cfg.codec, cfg.residual_order, cfg.warmup_steps, cfg.closed_loop) == ("binary", 1, 1, True)
    assert cfg.check_finite


@pytest.mark.parametrize("kwargs, message", [
    (dict(codec="int3"), "unknown codec 'int3'"),
    (dict(codec="lowrank:0"), "rank must be a positive integer"),
    (dict(residual_order=3), "residual_order must be 0, 1 or 2"),
    (dict(decay=1.5), r"decay must be in \[0, 1\]"),
    (dict(warmup_steps=-1), "warmup_steps must be a non-negative integer"),
    (dict(keyframe_period=2.5), "keyframe_period must be a non-negative integer"),
    (dict(min_bytes=-4), "min_bytes must be a non-negative integer"),
    (dict(skip="attn*"), "skip must be a sequence"),
    (dict(kernels="fortran"), "unknown kernel implementation 'fortran'"),
])
def test_bad_values_raise_with_guidance(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig(**kwargs)


def test_frozen_and_skip_patterns():
    cfg = CompressionConfig(skip=["*.norm", "time_embed"])
    assert cfg.skip == ("*.norm", "time_embed")
    assert cfg.skips("blk1.norm") and cfg.skips("time_embed") and not cfg.skips("blk1.k")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.codec = "int2"
