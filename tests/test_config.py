"""CompressionConfig validation."""

import dataclasses

import pytest

from compressed_comm import CompressionConfig, Keyframes, KeyframeSchedule
from compressed_comm.config import SHARED_FIELDS


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
    (dict(keyframes=Keyframes), "keyframes must be a Keyframes"),
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


def test_keyframe_settings_are_one_value_checked_on_their_own():
    with pytest.raises(ValueError, match="Keyframes.period must be a non-negative integer"):
        Keyframes(period=2.5)
    cfg = CompressionConfig(keyframes=Keyframes(codec="int8", period=6, spread=3))
    assert cfg.keyframes == Keyframes("int8", 6, 3)
    assert [n for n in SHARED_FIELDS if n.startswith("keyframes.")] == [
        "keyframes.codec", "keyframes.period", "keyframes.spread"]
    other = CompressionConfig(keyframes=Keyframes(codec="int8", period=6))
    assert cfg.differences(other.fingerprint()) == ["keyframes.spread"]


@pytest.mark.parametrize("old, new", [
    (dict(keyframe_codec="fp8"), dict(keyframes=Keyframes(codec="fp8"))),
    (dict(keyframe_period=4, keyframe_spread=2), dict(keyframes=Keyframes(period=4, spread=2))),
    (dict(keyframe_period=4, keyframes=Keyframes(codec="int8")),
     dict(keyframes=Keyframes(codec="int8", period=4))),
])
def test_moved_keyframe_arguments_still_work_for_one_release_and_warn(old, new):
    with pytest.warns(DeprecationWarning, match="keyframes=Keyframes"):
        cfg = CompressionConfig(**old)
    assert cfg == CompressionConfig(**new)
    with pytest.warns(DeprecationWarning, match="CompressionConfig.keyframe_codec is deprecated"):
        assert cfg.keyframe_codec == new["keyframes"].codec
    with pytest.raises(ValueError, match="Keyframes.spread=3 needs Keyframes.period >= 3"):
        with pytest.warns(DeprecationWarning):
            CompressionConfig(keyframe_spread=3)


def test_reduce_moved_to_the_drop_in_group_and_replace_does_not_warn(recwarn):
    with pytest.warns(DeprecationWarning, match="wrap_process_group.reduce"):
        cfg = CompressionConfig(reduce=True)
    with pytest.warns(DeprecationWarning):
        assert cfg.reduce is True
    recwarn.clear()
    assert dataclasses.replace(cfg, codec="int2").legacy_reduce is True
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
    with pytest.raises(AttributeError, match="no attribute 'keyframe'"):
        cfg.keyframe  # noqa: B018


def test_keyframe_schedule_is_a_function_of_the_step():
    s = KeyframeSchedule(warmup_steps=2, period=6, spread=3)
    assert [s.is_keyframe(t) for t in range(8)] == [True, True] + [False] * 6
    assert [s.slice_rows(t, 9) for t in range(6, 10)] == [(0, 3), (3, 6), (6, 9), None]
    assert s.slice_rows(0, 9) is None and s.slice_rows(1, 9) is None  # warmup stays whole
    assert list(s.first_spread_steps()) == [6, 7, 8]
    whole = KeyframeSchedule(warmup_steps=1, period=4)
    assert [t for t in range(10) if whole.is_keyframe(t)] == [0, 4, 8]
    assert [t for t in range(10) if whole.keyed(t)] == [0, 4, 8]
