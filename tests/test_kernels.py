"""Torch reference kernels: bit packing against the documented layout, and dispatch."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compressed_comm.kernels import KERNELS_ENV, get_kernels, packed_nbytes
from compressed_comm.kernels import torch_ref
from compressed_comm.kernels.torch_ref import (
    torch_pack_bits,
    torch_pack_uint,
    torch_unpack_bits,
    torch_unpack_uint,
)

BITS = [1, 2, 4, 8]


@pytest.fixture(autouse=True)
def _no_kernel_env(monkeypatch):
    monkeypatch.delenv(KERNELS_ENV, raising=False)


def expected_packed_bits(codes, bits):
    """The docstring's layout: code i in bits [(i % p) * bits, ...) of byte i // p."""
    p = 8 // bits
    out = [0] * (-(-len(codes) * bits // 8))
    for i, c in enumerate(codes):
        out[i // p] |= c << ((i % p) * bits)
    return out


def expected_packed_uint(values, width):
    """Field i in bits [i * width, (i + 1) * width) of one little-endian bit stream."""
    acc = 0
    for i, v in enumerate(values):
        acc |= v << (i * width)
    return list(acc.to_bytes(-(-len(values) * width // 8), "little"))


def pack_bits(codes, bits):
    t = torch.tensor(codes, dtype=torch.uint8)
    out = torch.full((packed_nbytes(len(codes), bits),), 0xEE, dtype=torch.uint8)
    torch_pack_bits(t, bits, out)
    return out


# --------------------------------------------------------------------------- pack_bits


@settings(max_examples=60, deadline=None)
@given(data=st.data(), bits=st.sampled_from(BITS), n=st.integers(0, 200))
def test_pack_bits_round_trip(data, bits, n):
    codes = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n))
    out = pack_bits(codes, bits)
    assert out.dtype == torch.uint8 and out.numel() == -(-n * bits // 8)
    assert out.tolist() == expected_packed_bits(codes, bits)
    back = torch_unpack_bits(out, bits, n)
    assert back.dtype == torch.uint8 and back.shape == (n,)
    assert back.tolist() == codes


def test_pack_bits_docstring_example():
    # bits=2: codes [1, 2, 3, 0, 1] -> bytes [0x39, 0x01]
    out = pack_bits([1, 2, 3, 0, 1], 2)
    assert out.tolist() == [0x39, 0x01]
    assert torch_unpack_bits(out, 2, 5).tolist() == [1, 2, 3, 0, 1]


def test_pack_bits_one_bit_example():
    # bits 0..7 of byte 0 hold codes 0..7: 1,0,1,1,0,0,0,1 -> 0b10001101 = 0x8D;
    # codes 8, 9 = 1, 1 -> bits 0, 1 of byte 1 = 0x03 (the rest zero-padded).
    codes = [1, 0, 1, 1, 0, 0, 0, 1, 1, 1]
    out = pack_bits(codes, 1)
    assert out.tolist() == [0x8D, 0x03]
    assert torch_unpack_bits(out, 1, 10).tolist() == codes


def test_pack_bits_four_bit_example():
    # low nibble first: [0xA, 0x3, 0xF] -> [0x3A, 0x0F]
    out = pack_bits([0xA, 0x3, 0xF], 4)
    assert out.tolist() == [0x3A, 0x0F]
    assert torch_unpack_bits(out, 4, 3).tolist() == [0xA, 0x3, 0xF]


def test_pack_bits_eight_bit_is_copy():
    out = pack_bits([0, 7, 255, 128], 8)
    assert out.tolist() == [0, 7, 255, 128]


# --------------------------------------------------------------------------- pack_uint


@settings(max_examples=60, deadline=None)
@given(data=st.data(), width=st.integers(1, 40), n=st.integers(0, 60))
def test_pack_uint_round_trip(data, width, n):
    values = data.draw(st.lists(st.integers(0, 2**width - 1), min_size=n, max_size=n))
    out = torch.full((packed_nbytes(n, width),), 0xEE, dtype=torch.uint8)
    torch_pack_uint(torch.tensor(values, dtype=torch.int64), width, out)
    assert out.tolist() == expected_packed_uint(values, width)
    back = torch_unpack_uint(out, width, n)
    assert back.dtype == torch.int64 and back.shape == (n,)
    assert back.tolist() == values


def test_pack_uint_example():
    # width 3: 5 = 101b, 2 = 010b, 7 = 111b -> stream bits (LSB first) 101 010 111
    # byte 0 = bits 0..7 = 1,0,1,0,1,0,1,1 -> 0b11010101 = 0xD5; byte 1 = bit 8 = 1 -> 0x01
    out = torch.zeros(2, dtype=torch.uint8)
    torch_pack_uint(torch.tensor([5, 2, 7]), 3, out)
    assert out.tolist() == [0xD5, 0x01]
    assert torch_unpack_uint(out, 3, 3).tolist() == [5, 2, 7]


@pytest.mark.parametrize("numel,bits,want", [
    (0, 1, 0), (1, 1, 1), (8, 1, 1), (9, 1, 2), (5, 2, 2), (4, 2, 1), (3, 4, 2),
    (7, 8, 7), (3, 40, 15), (1, 33, 5), (1000, 1, 125), (1001, 4, 501),
])
def test_packed_nbytes(numel, bits, want):
    assert packed_nbytes(numel, bits) == want
    assert torch_ref.packed_nbytes(numel, bits) == want


# --------------------------------------------------------------------------- dispatch


def test_dispatch_picks_numba_on_cpu_and_torch_when_pinned(monkeypatch):
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    assert get_kernels("cpu").name == "numba"
    assert get_kernels(torch.device("cpu"), "auto").name == "numba"
    k = get_kernels("cpu", "torch")
    assert k.name == "torch"
    assert k.pack_bits is torch_pack_bits
    assert k.unpack_bits is torch_unpack_bits
    assert k.pack_uint is torch_pack_uint
    assert k.unpack_uint is torch_unpack_uint
    assert k.binary_encode is torch_ref.torch_binary_encode
    assert k.minmax_decode is torch_ref.torch_minmax_decode
    monkeypatch.setenv(KERNELS_ENV, "numba")
    assert get_kernels("cpu").name == "numba"


def test_pinned_implementation_that_cannot_run_falls_back_to_the_reference(caplog):
    # CuPy kernels take CUDA tensors; numba kernels take CPU tensors
    with caplog.at_level("WARNING", logger="compressed_comm.kernels"):
        assert get_kernels("cpu", "cupy").name == "torch"
        assert get_kernels("meta", "numba").name == "torch"
    assert get_kernels("meta").name == "torch"


def test_get_kernels_unknown_impl():
    with pytest.raises(ValueError) as err:
        get_kernels("cpu", "nope")
    msg = str(err.value)
    assert "nope" in msg and "auto" in msg and "torch" in msg


def test_env_unknown_impl(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "nope")
    assert KERNELS_ENV == "COMPRESSED_COMM_KERNELS"
    with pytest.raises(ValueError) as err:
        get_kernels("cpu")
    assert "nope" in str(err.value) and "torch" in str(err.value)
    # An explicit choice takes precedence over the environment.
    assert get_kernels("cpu", "torch").name == "torch"


@pytest.mark.parametrize("value", ["", "  ", "AUTO"])
def test_env_empty_or_auto_means_auto(monkeypatch, value):
    monkeypatch.setenv(KERNELS_ENV, value)
    assert get_kernels("cpu").name == "numba"


def test_env_torch(monkeypatch):
    monkeypatch.setenv("COMPRESSED_COMM_KERNELS", "torch")
    assert get_kernels("cpu").name == "torch"
    with pytest.raises(ValueError):
        get_kernels("cpu", "nope")
