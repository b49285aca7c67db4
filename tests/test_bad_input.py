"""Bad input: corrupt top-k indices, codec parameters beyond the header, and finite inputs at
the edge of the float range, whose residual against the reference overflows float32.

Expected values are derived in the test (indices read bit by bit from the payload), never
taken from the codec's own output.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compressed_comm import CompressionConfig, StreamDecoder, StreamEncoder, read_header
from compressed_comm.codecs import available_codecs, get_codec
from compressed_comm.errors import NonFiniteError, WireFormatError
from compressed_comm.kernels import available_implementations

KERNELS = list(available_implementations("cpu"))  # torch and numba
#: The fast implementations here, each with its device (CuPy only with a GPU).
FAST = [("numba", "cpu")] + ([("cupy", "cuda")] if torch.cuda.is_available()
                             and "cupy" in available_implementations("cuda") else [])
#: Every spec form of the registry, with a rank and a fraction filled in.
SPECS = [s.replace(":R", ":2").replace(":F", ":0.25") for s in available_codecs()]
EXTREME_DTYPES = [torch.float32, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t):
    """The bit patterns of ``t``, so that NaN compares equal to itself."""
    return t.view(INT_VIEW[t.dtype])


def body_of(codec, payload, shape, dtype):
    """The codec's sections of ``payload``, as views (writes go into the payload)."""
    n, c = math.prod(shape[:-1]), shape[-1]
    return codec.layout(n, c, dtype).views(payload[read_header(payload).nbytes:])


def read_fields(packed, width, count):
    """``count`` little-endian ``width``-bit fields of the byte string ``packed``."""
    stream = int.from_bytes(bytes(packed.tolist()), "little")
    return [(stream >> (i * width)) & ((1 << width) - 1) for i in range(count)]


# --------------------------------------------------------------------------- corrupt top-k


@settings(max_examples=60)
@given(n=st.integers(1, 9), c=st.integers(1, 13), fraction=st.sampled_from([0.05, 0.3, 0.5, 1.0]),
       seed=st.integers(0, 99), flips=st.lists(st.integers(0, 2**20), min_size=1, max_size=4),
       kernels=st.sampled_from(KERNELS), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_corrupt_topk_indices_raise_or_decode_what_they_say(n, c, fraction, seed, flips, kernels,
                                                            dtype):
    codec = get_codec(f"topk:{fraction}", kernels=kernels)
    x = torch.randn(n, c, generator=torch.Generator().manual_seed(seed)).to(dtype)
    payload = codec.encode(x)
    body = body_of(codec, payload, (n, c), dtype)
    nbits = body["idx"].numel() * 8
    for f in flips:
        body["idx"][f % nbits // 8] ^= 1 << (f % 8)
    numel, k = n * c, body["val"].numel()
    idx = read_fields(body["idx"], max(1, (numel - 1).bit_length()), k)
    if all(a < b for a, b in zip(idx, idx[1:])) and idx[-1] < numel:
        want = torch.zeros(numel, dtype=dtype)
        want[idx] = body["val"]
        assert torch.equal(codec.decode(payload), want.view(n, c))
    else:
        with pytest.raises(WireFormatError, match=rf"^topk:{fraction}: corrupt payload: index "
                           rf"\d+ at position \d+ .*indices in 0 \.\. {numel - 1}$"):
            codec.decode(payload)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("order", [0, 1])
def test_a_stream_rejects_corrupt_topk_indices_and_stays_intact(kernels, order):
    cfg = CompressionConfig(codec="topk:0.5", residual_order=order, kernels=kernels)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, generator=gen)
    enc, dec = StreamEncoder("s", x, cfg), StreamDecoder("s", x, cfg)
    dec.decode(enc.encode(x))
    x = x + 0.1 * torch.randn(6, 10, generator=gen)
    good = enc.encode(x)
    bad = good.clone()
    # 30 indices of 6 bits: the last two bytes hold bits 168-183, so indices 28 and 29 -> 63
    body_of(enc.codec, bad, (6, 10), x.dtype)["idx"][-2:] = 0xFF
    ref = dec.reference.clone()
    with pytest.raises(WireFormatError, match=r"topk:0.5: corrupt payload: index 63 at "
                       r"position 28 is out of range; expected 30 strictly increasing indices "
                       r"in 0 \.\. 59"):
        dec.decode(bad)
    assert dec.step == 1 and torch.equal(dec.reference, ref)
    assert torch.equal(dec.decode(good), enc.reference)


def test_an_order_2_decoder_that_rejected_a_body_refuses_to_go_on():
    """Order 2 predicts in place before the body is read: after a rejected body the decoder
    is out of step with its sender, and says so instead of decoding wrong data."""
    cfg = CompressionConfig(codec="topk:0.5", residual_order=2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, generator=gen)
    enc, dec = StreamEncoder("s", x, cfg), StreamDecoder("s", x, cfg)
    dec.decode(enc.encode(x))
    good = enc.encode(x + 0.1 * torch.randn(6, 10, generator=gen))
    bad = good.clone()
    body_of(enc.codec, bad, (6, 10), x.dtype)["idx"][-2:] = 0xFF
    with pytest.raises(WireFormatError, match=r"stream 's' .*corrupt payload"):
        dec.decode(bad)
    with pytest.raises(WireFormatError, match="out of step with its sender since step 1.*new "
                                              "session"):
        dec.decode(good)


def test_repeated_topk_index_is_named():
    codec = get_codec("topk:0.5")
    payload = codec.encode(torch.arange(8.0))  # keeps indices 4, 5, 6, 7 (3 bits each)
    body_of(codec, payload, (8,), torch.float32)["idx"][0] ^= 0b111000  # 4, 5 -> 4, 2
    with pytest.raises(WireFormatError, match=r"index 2 at position 1 does not exceed the one "
                       r"before it \(4\); expected 4 strictly increasing indices in 0 \.\. 7"):
        codec.decode(payload)


# --------------------------------------------------------------------------- header limits


@settings(max_examples=30)
@given(rank=st.integers(2**31, 2**80), name=st.sampled_from(["lowrank", "lowrankq"]))
def test_ranks_beyond_the_header_are_rejected_by_get_codec(rank, name):
    with pytest.raises(ValueError, match=rf"^{name}:{rank}: rank {rank} is too large .*"
                       r"expected 1 \.\. 2\*\*31-1"):
        get_codec(f"{name}:{rank}")


@pytest.mark.parametrize("name", ["lowrank", "lowrankq"])
def test_the_largest_rank_round_trips(name):
    codec = get_codec(f"{name}:{2**31 - 1}")
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    payload = codec.encode(x)
    assert read_header(payload).param == 2**31 - 1
    full = get_codec(f"{name}:4")  # min(rank, 5, 4): the same factors
    assert torch.equal(codec.decode(payload), full.decode(full.encode(x)))


@settings(max_examples=30)
@given(n=st.integers(2**16, 2**20), c=st.integers(2**16, 2**20),
       fraction=st.sampled_from([0.5, 0.75, 1.0]))
def test_topk_k_beyond_the_header_is_a_value_error_at_header_time(n, c, fraction):
    codec = get_codec(f"topk:{fraction}")
    k = math.ceil(fraction * n * c)
    if k <= 2**32 - 1:
        assert codec.header((n, c), torch.float16).param == k
        return
    with pytest.raises(ValueError, match=rf"^topk:{fraction}: .* keeps k = {k} entries, more "
                       r"than the header's 32-bit k field holds \(at most 4294967295\)"):
        codec.header((n, c), torch.float16)


def test_a_stream_of_a_tensor_too_large_for_topk_says_so():
    like = torch.empty(2**16, 2**16 + 1, dtype=torch.float16, device="meta")
    enc = StreamEncoder("s", like, CompressionConfig(codec="topk:1", warmup_steps=0))
    with pytest.raises(ValueError, match="32-bit k field"):
        enc.payload_nbytes()


# --------------------------------------------------------------------------- extreme values


@st.composite
def extremes(draw, dtype):
    """3 to 6 steps of one tensor whose entries are +-(0.9 .. 1.0) * finfo(dtype).max, the
    sign alternating from step to step (optionally mixed within a step), some entries 0."""
    n, c = draw(st.integers(1, 6)), draw(st.integers(1, 9))
    steps = draw(st.integers(3, 6))
    seed = draw(st.integers(0, 2**16))
    mixed, zeros = draw(st.booleans()), draw(st.booleans())
    gen = torch.Generator().manual_seed(seed)
    top = torch.finfo(dtype).max
    out = []
    for t in range(steps):
        v = (0.9 + 0.1 * torch.rand(n, c, generator=gen, dtype=torch.float64)) * top
        if mixed:
            v = v * (torch.randint(0, 2, (n, c), generator=gen) * 2 - 1)
        if zeros:
            v = v * (torch.rand(n, c, generator=gen) > 0.3)
        out.append((v * (-1) ** t).to(dtype))  # float64 -> dtype: at most the dtype's max
    return out


def run_extremes(xs, spec, order, kernels, check, warmup, decay):
    cfg = CompressionConfig(codec=spec, residual_order=order, kernels=kernels,
                            check_finite=check, warmup_steps=warmup, decay=decay)
    enc, dec = StreamEncoder("s", xs[0], cfg), StreamDecoder("s", xs[0], cfg)
    for t, x in enumerate(xs):
        assert bool(torch.isfinite(x).all())
        dec.decode(enc.encode(x))
        assert bool(torch.isfinite(enc.reference).all()), f"step {t}: {enc.reference}"
        assert torch.equal(bits(enc.reference), bits(dec.reference)), f"step {t}"


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dtype", EXTREME_DTYPES)
@pytest.mark.parametrize("order, spec", [(order, spec) for order in (0, 1, 2) for spec in SPECS])
@settings(max_examples=12)
@given(data=st.data(), check=st.booleans(), warmup=st.integers(0, 2),
       decay=st.sampled_from([0.0, 0.5, 1.0]))
def test_extreme_finite_inputs_keep_both_references_finite_and_identical(
        order, spec, dtype, kernels, data, check, warmup, decay):
    xs = data.draw(extremes(dtype))
    run_extremes(xs, spec, order, kernels, check, warmup, decay)


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_order_2_prediction_saturates(decay):
    # after two keyframes ref = max * a, prev = -max * a: ref - prev overflows to Inf (and
    # 0 * Inf is NaN); binary's rank-1 magnitude at [0, 0] is 4/3 max, Inf, against it
    top = torch.finfo(torch.float32).max
    a = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    run_extremes([-top * a, top * a, -top * a], "binary", 2, "torch", True, 2, decay)


@pytest.mark.parametrize("spec", ["binary", "int2", "int4", "int8", "fp8", "topk:1",
                                  "lowrank:2"])
@pytest.mark.parametrize("kernels", KERNELS)
def test_an_overflowing_residual_saturates(spec, kernels):
    # 0.9 max against a reference of -0.9 max: the residual is float32's max, not Inf
    top = torch.finfo(torch.float32).max
    x = torch.full((4, 6), 0.9 * top)
    cfg = CompressionConfig(codec=spec, kernels=kernels)
    enc, dec = StreamEncoder("s", x, cfg), StreamDecoder("s", x, cfg)
    dec.decode(enc.encode(-x))  # the keyframe: ref = -x
    dec.decode(enc.encode(x))
    assert torch.equal(enc.reference, dec.reference)
    # finite, and moved towards x (low-rank only part of the way: its s is capped)
    assert bool((enc.reference > -x).all()), enc.reference


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("spec", ["binary", "int2", "int4", "int8"])
@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_non_finite_input_is_still_rejected_next_to_an_overflow(kernels, spec, bad):
    # a NaN/Inf among values whose residual overflows: the fused check must not mistake it
    # for an overflow (which saturates)
    top = torch.finfo(torch.float32).max
    x = torch.full((4, 6), 0.9 * top)
    cfg = CompressionConfig(codec=spec, kernels=kernels)
    enc = StreamEncoder("s", x, cfg)
    enc.encode(-x)
    ref = enc.reference.clone()
    y = x.clone()
    y[2, 3] = bad
    with pytest.raises(NonFiniteError, match=r"step 1 contains [01] NaN and [01] Inf values"):
        enc.encode(y)
    assert enc.step == 1 and torch.equal(enc.reference, ref)


@pytest.mark.parametrize("impl, device", FAST)
@pytest.mark.parametrize("spec", ["binary", "int2", "int4", "int8", "topk:0.5"])
@pytest.mark.parametrize("dtype", EXTREME_DTYPES)
def test_extreme_payloads_are_identical_across_implementations(impl, device, spec, dtype):
    # the fast kernels saturate overflowing residuals exactly like the reference
    top = torch.finfo(dtype).max
    gen = torch.Generator().manual_seed(5)
    signs = torch.randint(0, 2, (7, 12), generator=gen) * 2 - 1
    xs = [(signs * (-1) ** t * (0.9 + 0.1 * torch.rand(7, 12, generator=gen)) * top)
          .to(dtype).to(device) for t in range(5)]
    runs = {}
    for kernels in ("torch", impl):
        enc = StreamEncoder("s", xs[0], CompressionConfig(codec=spec, kernels=kernels))
        runs[kernels] = [enc.encode(x).cpu() for x in xs], enc.reference.cpu()
    (p_ref, r_ref), (p_fast, r_fast) = runs["torch"], runs[impl]
    for t, (a, b) in enumerate(zip(p_ref, p_fast)):
        assert torch.equal(a, b), f"step {t}"
    assert torch.equal(bits(r_ref), bits(r_fast))
