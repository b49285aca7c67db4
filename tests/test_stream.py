"""Closed-loop residual streams: lock-step references, error feedback, schedule, bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compressed_comm import (
    CompressionConfig,
    Keyframes,
    NonFiniteError,
    StreamDecoder,
    StreamEncoder,
    StreamMismatchError,
    StaleMessageError,
    StreamOrderError,
    UnsupportedDtypeError,
    WireFormatError,
    get_codec,
    read_header,
)
from compressed_comm.wire import FLAG_CONFIG, pack_fingerprint

CODECS = ["identity", "fp8", "int8", "int4", "int2", "binary", "lowrank:4", "lowrankq:4",
          "lowrank:3", "topk:0.05"]
LOSSY = [c for c in CODECS if c != "identity"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def pair(cfg, like, name="s", origin=0):
    return (StreamEncoder(name, like, cfg, origin=origin),
            StreamDecoder(name, like, cfg, origin=origin))


def random_walk(shape, steps, dtype, seed, step_size=0.1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    for _ in range(steps):
        yield x.to(dtype)
        x = x + step_size * torch.randn(shape, generator=gen)


def rel_err(x, xhat):
    x = x.float()
    return float((x - xhat.float()).norm() / x.norm())


# ------------------------------------------------------------------ lock-step references


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("order", [0, 1, 2])
@settings(max_examples=4)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.sampled_from([(24, 19), (3, 5, 7), (1, 33), (40,)]),
    warmup=st.integers(0, 3),
    period=st.sampled_from([0, 7]),
    seed=st.integers(0, 2**16),
)
def test_references_bit_identical_over_30_steps(codec, order, dtype, shape, warmup, period, seed):
    cfg = CompressionConfig(codec=codec, residual_order=order, warmup_steps=warmup, decay=0.7,
                            keyframes=Keyframes(period=period))
    walk = list(random_walk(shape, 30, dtype, seed))
    enc, dec = pair(cfg, walk[0])
    for step, x in enumerate(walk):
        payload = enc.encode(x)
        assert payload.numel() == enc.payload_nbytes(step) == dec.payload_nbytes(step)
        out = dec.decode(payload)
        assert out is dec.reference
        assert torch.equal(enc.reference, dec.reference), f"diverged at step {step}"
        assert out.shape == x.shape and out.dtype == x.dtype
    assert enc.step == dec.step == 30


def test_order0_reference_is_the_stateless_round_trip():
    cfg = CompressionConfig(codec="int4", residual_order=0, warmup_steps=0)
    codec = get_codec("int4")
    walk = list(random_walk((16, 12), 5, torch.float16, seed=1))
    enc, dec = pair(cfg, walk[0])
    for x in walk:
        dec.decode(enc.encode(x))
        assert torch.equal(dec.reference, codec.decode(codec.encode(x)))


def test_identity_stream_is_lossless_whatever_the_order():
    cfg = CompressionConfig(codec="identity", residual_order=2, warmup_steps=0)
    walk = list(random_walk((9, 10), 6, torch.float32, seed=2))
    enc, dec = pair(cfg, walk[0])
    for x in walk:
        assert torch.equal(dec.decode(enc.encode(x)), x)


# ------------------------------------------------------------------ error feedback


def drifting(steps, shape=(64, 48), seed=3, speed=0.02, noise=0.005):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    direction = torch.randn(shape, generator=gen)
    return [base + speed * t * direction + noise * torch.randn(shape, generator=gen)
            for t in range(steps)]


def errors(cfg, signal, closed_loop=True):
    cfg = CompressionConfig(**{**cfg.__dict__, "closed_loop": closed_loop})
    enc, dec = pair(cfg, signal[0])
    return [rel_err(x, dec.decode(enc.encode(x))) for x in signal]


@pytest.mark.parametrize("codec", ["binary", "int2", "int4", "lowrankq:8", "topk:0.05"])
def test_error_feedback_bounded_and_better_than_plain_compression(codec):
    signal = drifting(50)
    order1 = errors(CompressionConfig(codec=codec, residual_order=1, warmup_steps=1), signal)
    order0 = errors(CompressionConfig(codec=codec, residual_order=0, warmup_steps=1), signal)
    assert order1[0] == 0.0  # warmup keyframe is exact
    # bounded: no growth from the first half of the run to the second
    assert max(order1[25:]) <= 1.5 * max(order1[1:25])
    # residual coding with feedback beats compressing the tensor itself
    assert sum(order1[1:]) < 0.8 * sum(order0[1:])


@pytest.mark.parametrize("codec", ["binary", "int2", "lowrank:4", "topk:0.05"])
def test_error_feedback_converges_on_a_static_tensor(codec):
    x = torch.randn(32, 24, generator=torch.Generator().manual_seed(4))
    cfg = CompressionConfig(codec=codec, residual_order=1, warmup_steps=0)
    errs = errors(cfg, [x] * 40)
    # each step codes the remaining error, so the reconstruction converges to x
    assert errs[-1] < 0.01 * errs[0]
    assert all(b <= a for a, b in zip(errs, errs[1:]))


def test_open_loop_drifts_while_closed_loop_does_not():
    signal = drifting(50, speed=0.05, noise=0.02)
    cfg = CompressionConfig(codec="binary", residual_order=1, warmup_steps=1)
    closed = errors(cfg, signal, closed_loop=True)
    opened = errors(cfg, signal, closed_loop=False)
    assert opened[-1] > 3 * closed[-1]
    assert max(closed[25:]) <= 1.5 * max(closed[1:25])


def test_order2_predicts_linear_drift_better_than_order1():
    gen = torch.Generator().manual_seed(5)
    base, direction = torch.randn(48, 40, generator=gen), torch.randn(48, 40, generator=gen)
    signal = [base + 0.2 * t * direction for t in range(20)]
    common = dict(codec="binary", warmup_steps=2)
    order1 = errors(CompressionConfig(residual_order=1, **common), signal)
    order2 = errors(CompressionConfig(residual_order=2, decay=1.0, **common), signal)
    assert sum(order2[2:]) < 0.5 * sum(order1[2:])


def test_encoder_error_statistic_matches_the_reconstruction():
    signal = drifting(4)
    enc, dec = pair(CompressionConfig(codec="int2", track_error=True), signal[0])
    for x in signal:
        xhat = dec.decode(enc.encode(x))
        assert math.isclose(enc.stats().last_rel_error, rel_err(x, xhat), rel_tol=1e-5)


def test_error_statistic_is_off_by_default():
    signal = drifting(2)
    enc, dec = pair(CompressionConfig(codec="int2"), signal[0])
    for x in signal:
        dec.decode(enc.encode(x))
    assert enc.stats().last_rel_error is None


# ------------------------------------------------------------------ schedule


def test_warmup_and_keyframes_are_exact_and_flagged():
    cfg = CompressionConfig(codec="binary", warmup_steps=3, keyframes=Keyframes(period=5))
    walk = list(random_walk((20, 16), 12, torch.float16, seed=6))
    enc, dec = pair(cfg, walk[0])
    keyframes = {0, 1, 2, 5, 10}
    raw = get_codec("identity").payload_nbytes((20, 16), torch.float16)
    small = get_codec("binary").payload_nbytes((20, 16), torch.float16)
    for step, x in enumerate(walk):
        payload = enc.encode(x)
        header = read_header(payload)
        assert header.keyframe == (step in keyframes)
        assert header.seq == step
        # the first message ends with the sender's config fingerprint
        assert bool(header.flags & FLAG_CONFIG) == (step == 0)
        first = pack_fingerprint(cfg.fingerprint()).numel() if step == 0 else 0
        assert payload.numel() == (raw if step in keyframes else small) + first
        out = dec.decode(payload)
        if step in keyframes:
            assert torch.equal(out, x)
        else:
            assert not torch.equal(out, x)


def test_statistics_count_raw_and_wire_bytes():
    cfg = CompressionConfig(codec="int4", warmup_steps=2)
    walk = list(random_walk((10, 8), 6, torch.float32, seed=7))
    enc, dec = pair(cfg, walk[0])
    wire = 0
    for x in walk:
        payload = enc.encode(x)
        wire += payload.numel()
        dec.decode(payload)
    for s in (enc.stats(), dec.stats()):
        assert s.steps == 6
        assert s.raw_bytes == 6 * 10 * 8 * 4
        assert s.wire_bytes == wire
        assert s.ratio == pytest.approx(s.raw_bytes / wire)
    assert enc.stats().role == "encoder" and dec.stats().last_rel_error is None
    assert enc.reference_bytes == 10 * 8 * 4


def test_order2_holds_two_references():
    x = torch.zeros(10, 8, dtype=torch.float16)
    assert StreamEncoder("s", x, CompressionConfig(residual_order=2)).reference_bytes == 2 * x.nbytes
    assert StreamEncoder("s", x, CompressionConfig(residual_order=1)).reference_bytes == x.nbytes


def test_reference_bytes_count_the_low_rank_state():
    x = torch.randn(64, 48)
    enc = StreamEncoder("s", x, CompressionConfig(codec="lowrank:4"))
    for step in range(3):
        enc.encode(x * (1 + 0.1 * step))
    state = enc._codec_state
    assert state.basis is not None and state.test_matrix is not None
    assert enc.reference_bytes == x.nbytes + state.basis.nbytes + state.test_matrix.nbytes


def test_non_contiguous_input_encodes_like_its_contiguous_copy():
    x = torch.randn(12, 10).t()
    assert not x.is_contiguous()
    cfg = CompressionConfig(codec="int2", warmup_steps=0)
    a, b = StreamEncoder("s", x, cfg), StreamEncoder("s", x.contiguous(), cfg)
    assert torch.equal(a.encode(x), b.encode(x.contiguous()))
    assert torch.equal(a.reference, b.reference)


# ------------------------------------------------------------------ bad input


def sent(cfg=None, steps=3, name="layer0.k", origin=1):
    cfg = cfg or CompressionConfig(codec="binary")
    walk = list(random_walk((8, 6), steps, torch.float32, seed=8))
    enc, dec = pair(cfg, walk[0], name=name, origin=origin)
    return enc, dec, [enc.encode(x) for x in walk]


def test_missed_message_raises_and_names_the_stream():
    _, dec, payloads = sent()
    dec.decode(payloads[0])
    with pytest.raises(StreamOrderError, match=r"'layer0.k' \(origin 1\).*step 1.*step 2.*missed"):
        dec.decode(payloads[2])
    dec.decode(payloads[1])  # state untouched by the rejected payload
    dec.decode(payloads[2])


def test_repeated_message_raises():
    _, dec, payloads = sent()
    dec.decode(payloads[0])
    with pytest.raises(StreamOrderError, match="repeated"):
        dec.decode(payloads[0])


def test_payload_of_another_stream_raises():
    _, _, theirs = sent(name="layer1.v")
    _, dec, _ = sent(name="layer0.k")
    with pytest.raises(WireFormatError, match="another stream"):
        dec.decode(theirs[0])


def test_payload_of_another_codec_raises():
    cfg = CompressionConfig(codec="int2", warmup_steps=0)
    _, _, theirs = sent(cfg)
    _, dec, _ = sent(CompressionConfig(codec="binary", warmup_steps=0))
    with pytest.raises(WireFormatError, match="codec_id"):
        dec.decode(theirs[0])


def test_truncated_or_corrupt_payload_raises():
    _, dec, payloads = sent()
    with pytest.raises(WireFormatError, match="layer0.k"):
        dec.decode(payloads[0][:-8])
    bad = payloads[0].clone()
    bad[2] = 99  # version
    with pytest.raises(WireFormatError, match="version"):
        dec.decode(bad)
    assert dec.step == 0


def test_payload_of_another_session_is_stale():
    _, _, old = sent()
    dec = StreamDecoder("layer0.k", torch.zeros(8, 6), CompressionConfig(codec="binary"),
                        origin=1, session=1)
    with pytest.raises(StaleMessageError, match="session 0.*session 1"):
        dec.decode(old[0])
    assert dec.step == 0


@pytest.mark.parametrize("theirs,field", [
    (dict(residual_order=0), "residual_order=0 .expected 1"),
    (dict(residual_order=2), "residual_order=2 .expected 1"),
    (dict(closed_loop=False), "closed_loop=False"),
    (dict(warmup_steps=3), "warmup_steps=3 .expected 1"),
    (dict(keyframes=Keyframes(period=4)), "keyframes.period .keyframe_period=4 .expected 0"),
])
def test_config_mismatch_is_named_at_the_first_message(theirs, field):
    x = torch.randn(8, 6)
    enc = StreamEncoder("s", x, CompressionConfig(**theirs))
    dec = StreamDecoder("s", x, CompressionConfig())
    with pytest.raises(WireFormatError, match=f"CompressionConfig differs.*{field}"):
        dec.decode(enc.encode(x))


def test_decay_mismatch_is_named_for_order_2_only():
    x = torch.randn(8, 6)
    enc = StreamEncoder("s", x, CompressionConfig(residual_order=2, decay=0.25))
    dec = StreamDecoder("s", x, CompressionConfig(residual_order=2, decay=0.5))
    with pytest.raises(WireFormatError, match="decay=0.25 .expected 0.5"):
        dec.decode(enc.encode(x))
    enc = StreamEncoder("s", x, CompressionConfig(decay=0.25))
    dec = StreamDecoder("s", x, CompressionConfig(decay=0.5))  # order 1: decay unused
    dec.decode(enc.encode(x))


@pytest.mark.parametrize("codec", ["binary", "int2", "lowrank:2", "identity"])
def test_checksum_rejects_any_flipped_body_bit(codec):
    cfg = CompressionConfig(codec=codec, checksum=True, warmup_steps=0)
    x = torch.randn(8, 6)
    enc, dec = pair(cfg, x)
    good = enc.encode(x)
    hdr = read_header(good)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        bad = good.clone()
        i = int(torch.randint(hdr.nbytes, good.numel(), (1,), generator=gen))
        bad[i] ^= 1 << int(torch.randint(8, (1,), generator=gen))
        with pytest.raises(WireFormatError, match="checksum"):
            dec.decode(bad)
    assert dec.step == 0
    assert torch.equal(dec.decode(good), enc.reference)


def test_checksum_setting_must_agree():
    x = torch.randn(8, 6)
    enc = StreamEncoder("s", x, CompressionConfig(checksum=True))
    dec = StreamDecoder("s", x, CompressionConfig())
    with pytest.raises(WireFormatError, match="differs from this rank's in checksum .flags="):
        dec.decode(enc.encode(x))


def test_unaligned_payload_decodes():
    x = torch.randn(8, 6)
    enc, dec = pair(CompressionConfig(warmup_steps=0), x)
    p = enc.encode(x)
    shifted = torch.empty(p.numel() + 1, dtype=torch.uint8)[1:]
    shifted.copy_(p)
    assert torch.equal(dec.decode(shifted), enc.reference)


@pytest.mark.parametrize("wrong", [torch.zeros(8, 7), torch.zeros(8, 6, dtype=torch.float16)])
def test_encoder_rejects_other_shape_or_dtype(wrong):
    enc, _, _ = sent()
    with pytest.raises(StreamMismatchError, match=r"'layer0.k'.*\(8, 6\)"):
        enc.encode(wrong)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises_and_leaves_the_stream_intact(bad):
    enc, dec, payloads = sent()
    for p in payloads:
        dec.decode(p)
    ref = enc.reference.clone()
    x = torch.randn(8, 6)
    x[3, 2] = bad
    with pytest.raises(NonFiniteError, match="layer0.k"):
        enc.encode(x)
    assert enc.step == 3 and torch.equal(enc.reference, ref)
    x[3, 2] = 0.0
    dec.decode(enc.encode(x))
    assert torch.equal(enc.reference, dec.reference)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_input_is_caught_before_the_stream_changes(codec, order, dtype):
    # The fused codecs find NaN/Inf in the pass that computes their scales; every codec and
    # order must raise before touching the references, naming the stream and the step.
    cfg = CompressionConfig(codec=codec, residual_order=order, warmup_steps=2)
    xs = list(random_walk((16, 12), 4, dtype, seed=1))
    enc, dec = pair(cfg, xs[0], name="blk3.v")
    for x in xs[:3]:
        dec.decode(enc.encode(x))
    before = (enc.reference.clone(), dec.reference.clone())
    bad = xs[3].clone()
    bad[5, 7] = float("nan")
    with pytest.raises(NonFiniteError, match=r"'blk3.v'.*step 3.*1 NaN"):
        enc.encode(bad)
    assert enc.step == 3 and torch.equal(enc.reference, before[0])
    dec.decode(enc.encode(xs[3]))  # the stream goes on as if the bad call never happened
    assert torch.equal(enc.reference, dec.reference)
    assert not torch.equal(dec.reference, before[1]) or codec == "identity"


@pytest.mark.parametrize("codec", ["binary", "int2", "int8", "lowrank:3"])
def test_inputs_that_require_grad_are_encoded_detached(codec):
    x = torch.randn(8, 6, requires_grad=True)
    enc, dec = pair(CompressionConfig(codec=codec), x.detach())
    for step in range(3):
        xs = x * (1 + 0.1 * step)
        assert torch.equal(dec.decode(enc.encode(xs)), enc.reference)
        assert not enc.reference.requires_grad
    assert torch.equal(get_codec(codec).decode(get_codec(codec).encode(x)),
                       get_codec(codec).decode(get_codec(codec).encode(x.detach())))


def test_unchecked_nan_propagates_identically_until_a_keyframe():
    cfg = CompressionConfig(codec="int4", check_finite=False, keyframes=Keyframes(period=3))
    enc, dec = pair(cfg, torch.zeros(6, 5))
    xs = [torch.randn(6, 5) for _ in range(4)]
    xs[1][2, 2] = float("nan")
    outs = [dec.decode(enc.encode(x)).clone() for x in xs]
    assert torch.isnan(outs[1]).any() and torch.isnan(outs[2]).any()
    assert torch.equal(torch.isnan(enc.reference), torch.isnan(dec.reference))
    assert torch.equal(outs[3], xs[3])  # step 3 is a keyframe: recovered exactly


def test_unsupported_dtype_raises():
    with pytest.raises(UnsupportedDtypeError, match="float64"):
        StreamEncoder("s", torch.zeros(3, 3, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(codec=st.sampled_from(["binary", "int2", "int4", "lowrank:3"]),
       keyframe_codec=st.sampled_from(["int8", "fp8", "int4", "binary"]),
       order=st.sampled_from([0, 1, 2]), dtype=st.sampled_from(DTYPES),
       warmup=st.integers(1, 2), period=st.sampled_from([0, 3]), seed=st.integers(0, 99))
def test_lossy_keyframes_keep_references_identical_and_sizes_known(
        codec, keyframe_codec, order, dtype, warmup, period, seed):
    cfg = CompressionConfig(codec=codec, residual_order=order, warmup_steps=warmup,
                            keyframes=Keyframes(codec=keyframe_codec, period=period))
    walk = list(random_walk((12, 8), 8, dtype, seed))
    enc, dec = pair(cfg, walk[0])
    kf = get_codec(keyframe_codec)
    for step, x in enumerate(walk):
        expected = enc.payload_nbytes()
        key = enc.is_keyframe(step)
        payload = enc.encode(x)
        assert payload.numel() == expected  # known in advance, on both sides
        header = read_header(payload)
        assert header.keyframe == key
        if key:  # the keyframe is the tensor itself through the keyframe codec
            first = pack_fingerprint(cfg.fingerprint()).numel() if step == 0 else 0
            assert payload.numel() == kf.payload_nbytes(x.shape, dtype) + first
            assert header.codec_id == kf.codec_id
            assert torch.equal(enc.reference, kf.decode(payload))
        dec.decode(payload)
        assert torch.equal(enc.reference, dec.reference), step


def test_keyframe_codec_must_be_stateless_and_agree():
    with pytest.raises(ValueError, match="Keyframes.codec must be one of identity, fp8, int8"):
        CompressionConfig(keyframes=Keyframes(codec="lowrank:4"))
    x = torch.randn(8, 6)
    enc = StreamEncoder("s", x, CompressionConfig(keyframes=Keyframes(codec="int8")))
    dec = StreamDecoder("s", x, CompressionConfig())
    with pytest.raises(WireFormatError, match="codec_id"):
        dec.decode(enc.encode(x))


# ---------------------------------------------------------------- spread keyframes

@settings(max_examples=60, deadline=None)
@given(codec=st.sampled_from(["binary", "int2", "lowrank:3", "topk:0.1"]),
       keyframe_codec=st.sampled_from(["identity", "int8", "int4"]),
       order=st.sampled_from([0, 1, 2]), dtype=st.sampled_from(DTYPES),
       warmup=st.integers(0, 2), period=st.integers(2, 5), spread=st.integers(2, 5),
       rows=st.integers(1, 13), checksum=st.booleans(), seed=st.integers(0, 99))
def test_spread_keyframes_keep_references_identical_and_sizes_known(
        codec, keyframe_codec, order, dtype, warmup, period, spread, rows, checksum, seed):
    """Slice j of a keyframe spread over K steps is rows [j*N//K, (j+1)*N//K) of the (N, C)
    view, sent through the keyframe codec (exact for identity); every other row is a
    residual. Both references stay bit-identical and every size is known in advance."""
    spread = min(spread, period)
    cfg = CompressionConfig(codec=codec, residual_order=order, warmup_steps=warmup,
                            checksum=checksum,
                            keyframes=Keyframes(codec=keyframe_codec, period=period, spread=spread))
    walk = list(random_walk((rows, 2, 4), 3 * period + 2, dtype, seed))
    enc, dec = pair(cfg, walk[0])
    largest = enc.max_payload_nbytes()
    n, slices = rows * 2, 0
    for step, x in enumerate(walk):
        expected = enc.payload_nbytes()
        span = enc.spread_rows(step)
        cycle = step - step % period
        assert (span is not None) == (cycle >= warmup and step % period < spread)
        assert enc.is_keyframe(step) == (step < warmup)
        payload = enc.encode(x)
        assert payload.numel() == expected <= largest
        assert bool(read_header(payload).flags & 4) == (span is not None)
        dec.decode(payload)
        assert torch.equal(enc.reference, dec.reference), step
        if span is not None:
            j = step % period
            assert span == (j * n // spread, (j + 1) * n // spread)
            slices += 1
            if keyframe_codec == "identity":  # the slice's rows are the tensor itself
                got, want = enc.reference.reshape(n, 4), x.reshape(n, 4)
                assert torch.equal(got[span[0]:span[1]], want[span[0]:span[1]])
    assert slices > 0


def test_spread_slices_cover_every_row_once_per_keyframe():
    cfg = CompressionConfig(codec="binary", keyframes=Keyframes(period=6, spread=4))
    enc = StreamEncoder("s", torch.zeros(10, 3), cfg)
    spans = [enc.spread_rows(t) for t in range(13)]
    assert spans[:6] == [None] * 6  # step 0 is the warmup keyframe, whole
    assert spans[6:10] == [(0, 2), (2, 5), (5, 7), (7, 10)] and spans[10:12] == [None, None]
    assert spans[12] == (0, 2)


def test_a_spread_keyframe_costs_less_than_a_whole_one():
    x = torch.randn(64, 128, dtype=torch.float16)
    whole = StreamEncoder("s", x, CompressionConfig(keyframes=Keyframes(period=8)))
    spread = StreamEncoder("s", x, CompressionConfig(keyframes=Keyframes(period=8, spread=4)))
    assert whole.payload_nbytes(8) == get_codec("identity").payload_nbytes(x.shape, x.dtype)
    slices = [spread.payload_nbytes(8 + j) for j in range(4)]
    assert max(slices) < 0.4 * whole.payload_nbytes(8)
    assert spread.payload_nbytes(12) == whole.payload_nbytes(9)  # a plain residual again


@pytest.mark.parametrize("kwargs, message", [
    (dict(spread=0), "Keyframes.spread must be a positive integer"),
    (dict(spread=2), "Keyframes.spread=2 needs Keyframes.period >= 2"),
    (dict(spread=4, period=3), "needs Keyframes.period >= 4"),
])
def test_spread_needs_a_keyframe_period(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Keyframes(**kwargs)


def test_spread_mismatch_is_named_and_a_corrupt_slice_is_refused():
    x = torch.randn(8, 6)
    enc = StreamEncoder("s", x, CompressionConfig(keyframes=Keyframes(period=2, spread=2)))
    dec = StreamDecoder("s", x, CompressionConfig(keyframes=Keyframes(period=2)))
    with pytest.raises(WireFormatError, match="differs from this rank's in keyframes.spread"):
        dec.decode(enc.encode(x))  # named by the first message's config fingerprint
    cfg = CompressionConfig(residual_order=1, keyframes=Keyframes(period=2, spread=2))
    enc, dec = pair(cfg, x)
    for _ in range(2):
        dec.decode(enc.encode(x))
    payload = enc.encode(x + 0.1).clone()
    header = read_header(payload)
    payload[header.nbytes] ^= 0xFF  # the first sub-payload's magic
    before = dec.reference.clone()
    with pytest.raises(WireFormatError, match="rows 0:4 of the spread keyframe at step 2"):
        dec.decode(payload)
    assert torch.equal(dec.reference, before)  # checked before any row changed
