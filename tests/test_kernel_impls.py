"""Fast kernels held to the torch reference: every implementation available on this machine.

Packed bits and codes must be bit-exact; scales and reconstructions equal the reference up
to the float64 summation order of the binary codec's scales (stated tolerance: one unit in
the last place of the output dtype); encoder and decoder references bit-identical within
one implementation.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compressed_comm import CompressionConfig, StreamDecoder, StreamEncoder, get_codec
from compressed_comm.kernels import available_implementations, get_kernels, packed_nbytes
from compressed_comm.kernels import torch_ref as ref_k

FAST = [("numba", "cpu")] + ([("cupy", "cuda")] if torch.cuda.is_available()
                             and "cupy" in available_implementations("cuda") else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# awkward shapes: single elements, C not a multiple of 8, rows that share bytes, wide rows
SHAPES = [(1, 1), (1, 8), (3, 5), (7, 13), (16, 24), (33, 64), (5, 3), (2, 1000), (65, 7)]
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def data(shape, dtype, device, seed, zero_block=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    if zero_block and shape[0] > 2:
        x[: shape[0] // 2, : max(1, shape[1] // 3)] = 0.0  # exercise the zero/epsilon paths
    pred = x + 0.3 * torch.randn(shape, generator=g)
    return x.to(dtype).to(device), pred.to(dtype).to(device)


def sections(kind, n, c, device, bits=1):
    u8 = dict(dtype=torch.uint8, device=device)
    f32 = dict(dtype=torch.float32, device=device)
    if kind == "binary":
        return dict(codes=torch.empty(packed_nbytes(n * c, 1), **u8),
                    a=torch.empty(n, **f32), b=torch.empty(c, **f32))
    if kind == "absmax":
        return dict(codes=torch.empty(n * c, **u8), a=torch.empty(c, **f32))
    return dict(codes=torch.empty(packed_nbytes(n * c, bits), **u8),
                a=torch.empty(c, **f32), b=torch.empty(c, **f32))


def run(k, kind, x, pred, s, bits):
    """Encode (with a reference update) then decode; returns (ref_out, decoded)."""
    ref = torch.empty_like(x)
    out = torch.empty_like(x)
    if kind == "binary":
        k.binary_encode(x, pred, ref, s["codes"], s["a"], s["b"])
        k.binary_decode(s["codes"], s["a"], s["b"], pred, out)
    elif kind == "absmax":
        k.absmax_encode(x, pred, ref, s["codes"], s["a"], 8)
        k.absmax_decode(s["codes"], s["a"], 8, pred, out)
    else:
        k.minmax_encode(x, pred, ref, s["codes"], s["a"], s["b"], bits)
        k.minmax_decode(s["codes"], s["a"], s["b"], bits, pred, out)
    return ref, out


KINDS = [("binary", 1), ("minmax", 2), ("minmax", 4), ("absmax", 8)]


@pytest.mark.parametrize("impl, device", FAST)
@pytest.mark.parametrize("kind, bits", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_pred", [True, False])
def test_fast_kernels_match_the_reference(impl, device, kind, bits, dtype, shape, with_pred):
    x, pred = data(shape, dtype, device, seed=hash((shape, bits)) % 1000)
    pred = pred if with_pred else None
    fast, slow = get_kernels(device, impl), get_kernels(device, "torch")
    assert fast.name == impl
    n, c = shape
    s_fast, s_ref = sections(kind, n, c, device, bits), sections(kind, n, c, device, bits)
    ref_fast, out_fast = run(fast, kind, x, pred, s_fast, bits)
    ref_ref, out_ref = run(slow, kind, x, pred, s_ref, bits)
    assert torch.equal(s_fast["codes"], s_ref["codes"])  # packed payload: bit-exact
    for name in ("a", "b"):
        if name in s_ref:
            torch.testing.assert_close(s_fast[name], s_ref[name], rtol=1e-6, atol=0)
    tol = dict(rtol=ULP[dtype], atol=1e-30)
    torch.testing.assert_close(ref_fast.float(), ref_ref.float(), **tol)
    torch.testing.assert_close(out_fast.float(), out_ref.float(), **tol)
    assert torch.equal(ref_fast, out_fast)  # sender and receiver agree bit for bit


@pytest.mark.parametrize("impl, device", FAST)
@pytest.mark.parametrize("codec", ["binary", "int2", "int4", "int8", "topk:0.1", "lowrankq:4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_streams_are_identical_across_implementations(impl, device, codec, dtype):
    """The same payloads and references, step after step, with the fast and reference kernels."""
    runs = {}
    for kernels in ("torch", impl):
        cfg = CompressionConfig(codec=codec, residual_order=2, kernels=kernels)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(12, 40, generator=g)
        enc = StreamEncoder("s", x.to(dtype).to(device), cfg)
        dec = StreamDecoder("s", x.to(dtype).to(device), cfg)
        payloads = []
        for _ in range(6):
            x = x + 0.1 * torch.randn(12, 40, generator=g)
            p = enc.encode(x.to(dtype).to(device))
            dec.decode(p)
            assert torch.equal(enc.reference, dec.reference)
            payloads.append(p.cpu())
        runs[kernels] = (payloads, enc.reference.float().cpu())
    (p_ref, r_ref), (p_fast, r_fast) = runs["torch"], runs[impl]
    assert all(torch.equal(a, b) for a, b in zip(p_ref, p_fast))
    torch.testing.assert_close(r_fast, r_ref, rtol=ULP[dtype], atol=1e-30)


@pytest.mark.parametrize("impl, device", FAST)
def test_extreme_values_saturate_like_the_reference(impl, device):
    # a rank-1 magnitude estimate that overshoots float16's range must saturate, not overflow
    x = torch.tensor([[60000.0, 60000.0] * 4, [60000.0, 0.0] * 4], dtype=torch.float16,
                     device=device)
    k = get_kernels(device, impl)
    s = sections("binary", 2, 8, device)
    ref, out = run(k, "binary", x, None, s, 1)
    assert torch.isfinite(out).all() and float(out.max()) == 65504.0
    assert torch.equal(ref, out)


@settings(max_examples=40)
@given(bits=st.sampled_from([1, 2, 4, 8]), numel=st.integers(0, 300), seed=st.integers(0, 99))
def test_numba_bit_packing_matches_the_reference(bits, numel, seed):
    k = get_kernels("cpu", "numba")
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (numel,), generator=g, dtype=torch.int64).to(torch.uint8)
    out_fast = torch.empty(packed_nbytes(numel, bits), dtype=torch.uint8)
    out_ref = torch.empty_like(out_fast)
    k.pack_bits(codes, bits, out_fast)
    ref_k.torch_pack_bits(codes, bits, out_ref)
    assert torch.equal(out_fast, out_ref)
    assert torch.equal(k.unpack_bits(out_fast, bits, numel), codes)


def test_numba_worked_byte_example():
    out = torch.empty(2, dtype=torch.uint8)
    get_kernels("cpu", "numba").pack_bits(torch.tensor([1, 2, 3, 0, 1], dtype=torch.uint8), 2,
                                          out)
    assert out.tolist() == [0x39, 0x01]


@settings(max_examples=40)
@given(width=st.integers(1, 40), numel=st.integers(0, 70), seed=st.integers(0, 99))
def test_numba_index_packing_matches_the_reference(width, numel, seed):
    k = get_kernels("cpu", "numba")
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**width, (numel,), generator=g, dtype=torch.int64)
    out_fast = torch.empty(packed_nbytes(numel, width), dtype=torch.uint8)
    out_ref = torch.empty_like(out_fast)
    k.pack_uint(values, width, out_fast)
    ref_k.torch_pack_uint(values, width, out_ref)
    assert torch.equal(out_fast, out_ref)
    assert torch.equal(k.unpack_uint(out_fast, width, numel), values)


def test_numba_half_conversions_are_exact_and_round_to_nearest_even():
    import numba

    from compressed_comm.kernels import numba_cpu

    @numba.njit
    def to_half(values, out16, outbf):
        for i in range(values.shape[0]):
            out16[i] = numba_cpu._f32_to_f16_bits(values[i])
            outbf[i] = numba_cpu._f32_to_bf16_bits(values[i])

    @numba.njit
    def from_half(bits, out):
        for i in range(bits.shape[0]):
            out[i] = numba_cpu._f16_bits_to_f32(bits[i])

    every_half = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    widened = np.empty(1 << 16, np.float32)
    from_half(every_half.view(torch.int16).numpy().view(np.uint16), widened)
    finite = torch.isfinite(every_half)
    assert torch.equal(torch.from_numpy(widened)[finite], every_half.float()[finite])
    assert np.isnan(widened[~finite.numpy() & every_half.isnan().numpy()]).all()
    assert np.array_equal(widened[every_half.isinf().numpy()], every_half.float()[every_half.isinf()].numpy())
    h = every_half.float()[finite]
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65520.0, 2.0**-24,
                             2.0**-25, 3 * 2.0**-26, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11])
    values = torch.cat([h, h * (1 + 2.0**-11), h * (1 - 2.0**-11), specials,
                        torch.randn(100_000) * 1e3, torch.randn(10_000) * 1e-6])
    out16 = np.empty(len(values), np.uint16)
    outbf = np.empty(len(values), np.int16)
    to_half(values.numpy(), out16, outbf)
    assert np.array_equal(out16, values.half().view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(outbf, values.bfloat16().view(torch.int16).numpy())


def test_stateless_codecs_use_the_fast_path_by_default_and_agree():
    x = torch.randn(64, 48)
    for spec in ("binary", "int2", "int4", "int8"):
        fast, slow = get_codec(spec), get_codec(spec, kernels="torch")
        assert fast.kernels(x.device).name == "numba"
        assert torch.equal(fast.encode(x), slow.encode(x))


@pytest.mark.parametrize("impl, device", FAST)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_finiteness_and_error_statistics_match_the_reference(impl, device, dtype, bad):
    x, ref = data((9, 21), dtype, device, seed=5)
    if bad is not None:
        x[4, 7] = bad
    fast, slow = get_kernels(device, impl), get_kernels(device, "torch")
    assert fast.all_finite(x) is slow.all_finite(x) is (bad is None)
    if bad is None:
        torch.testing.assert_close(fast.error_norms(x, ref).cpu(), slow.error_norms(x, ref).cpu(),
                                   rtol=1e-5, atol=0)
    assert fast.all_finite(x[:0]) and fast.all_finite(x.t()) is (bad is None)  # empty, strided


def test_a_kernel_that_cannot_compile_falls_back_to_the_reference(caplog):
    from numba.core.errors import TypingError

    from compressed_comm.kernels import TORCH_KERNELS, Kernels, with_fallback

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise TypingError("no implementation of this on this machine")

    fields = {f: getattr(TORCH_KERNELS, f) for f in Kernels.__dataclass_fields__ if f != "name"}
    fast = with_fallback(Kernels(name="fast", **(fields | {"pack_bits": broken})),
                         TORCH_KERNELS, (TypingError,))
    codes = (torch.randn(37) > 0).to(torch.uint8)
    want = torch.empty(5, dtype=torch.uint8)
    TORCH_KERNELS.pack_bits(codes, 1, want)
    for _ in range(3):
        got = torch.empty(5, dtype=torch.uint8)
        with caplog.at_level("WARNING", logger="compressed_comm.kernels"):
            fast.pack_bits(codes, 1, got)
        assert torch.equal(got, want)
    assert len(calls) == 1  # tried once, then the reference
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 1 and "fast kernel pack_bits cannot compile" in logged[0]
    assert "TypingError" in logged[0] and "torch reference" in logged[0]
