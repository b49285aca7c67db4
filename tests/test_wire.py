"""Wire format: header round trip, a byte-exact example, malformed payloads, body layouts.

Expected bytes are assembled by hand from the layout documented in ``wire.py``'s module
docstring (never by calling the code under test).
"""

import dataclasses
import struct
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compressed_comm.errors import WireFormatError
from compressed_comm.wire import (Header, Layout, Section, contiguous_payload, header_nbytes,
                                  read_header, verify_checksum)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The documented dtype codes: 1 float32, 2 float16, 3 bfloat16.
DTYPE_CODE = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
U32 = 2**32 - 1


def as_payload(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(
        0, dtype=torch.uint8)


def hand_header(codec_id, dtype_code, shape, body_nbytes, param=0, seq=0, tag=0, flags=0,
                magic=b"CC", version=4, session=0, stream_cfg=0, warmup=0, period=0, decay=0.0,
                crc=0):
    """The header bytes, field by field, from the docstring's table (little-endian)."""
    out = bytearray()
    out += magic                                  # 0  magic
    out += bytes([version])                       # 2  version
    out += bytes([codec_id])                      # 3  codec id
    out += bytes([dtype_code])                    # 4  dtype code
    out += bytes([flags])                         # 5  flags
    out += bytes([len(shape)])                    # 6  ndim
    out += bytes([stream_cfg])                    # 7  order | open loop << 2
    out += param.to_bytes(4, "little")            # 8  codec parameter
    out += seq.to_bytes(4, "little")              # 12 sequence number
    out += tag.to_bytes(4, "little")              # 16 stream tag
    out += session.to_bytes(4, "little")          # 20 session id
    out += warmup.to_bytes(4, "little")           # 24 warmup steps
    out += period.to_bytes(4, "little")           # 28 keyframe period
    out += struct.pack("<f", decay)               # 32 decay (float32)
    out += crc.to_bytes(4, "little")              # 36 body CRC-32
    out += body_nbytes.to_bytes(8, "little")      # 40 body length
    for d in shape:                               # 48 shape
        out += d.to_bytes(8, "little")
    return bytes(out)


# --------------------------------------------------------------------------- round trip

headers = st.builds(
    Header,
    codec_id=st.integers(0, 8),
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 2**40), min_size=0, max_size=5).map(tuple),
    body_nbytes=st.integers(0, 80),
    param=st.integers(0, U32),
    seq=st.integers(0, U32),
    tag=st.integers(0, U32),
    flags=st.sampled_from([0, 1]),
    session=st.integers(0, U32),
    residual_order=st.integers(0, 2),
    closed_loop=st.booleans(),
    warmup_steps=st.integers(0, U32),
    keyframe_period=st.integers(0, U32),
    decay=st.sampled_from([0.0, 0.5, 0.25, 1.0]),
)


@settings(max_examples=150, deadline=None)
@given(hdr=headers, fill=st.integers(0, 255))
def test_header_round_trip(hdr, fill):
    raw = hdr.to_bytes()
    assert len(raw) == 48 + 8 * len(hdr.shape) == hdr.nbytes == header_nbytes(len(hdr.shape))
    # The bytes are exactly the documented layout.
    assert raw == hand_header(hdr.codec_id, DTYPE_CODE[hdr.dtype], hdr.shape, hdr.body_nbytes,
                              hdr.param, hdr.seq, hdr.tag, hdr.flags, session=hdr.session,
                              stream_cfg=hdr.residual_order | (0 if hdr.closed_loop else 4),
                              warmup=hdr.warmup_steps, period=hdr.keyframe_period,
                              decay=hdr.decay)
    payload = as_payload(raw + bytes([fill]) * hdr.body_nbytes)
    got = read_header(payload)
    assert got == hdr
    assert got.keyframe == (hdr.flags == 1)
    assert got.mismatches(hdr) == []


@settings(max_examples=40, deadline=None)
@given(hdr=headers, body=st.integers(0, 80))
def test_header_write_into_payload(hdr, body):
    hdr = dataclasses.replace(hdr, body_nbytes=body)
    payload = torch.full((hdr.nbytes + body,), 0xAB, dtype=torch.uint8)
    hdr.write(payload)
    assert read_header(payload) == hdr
    # The body is untouched.
    assert bool((payload[hdr.nbytes:] == 0xAB).all())


def test_worked_example_bytes():
    hdr = Header(codec_id=5, dtype=torch.bfloat16, shape=(3, 513), body_nbytes=0x1234,
                 param=7, seq=0x01020304, tag=0xDEADBEEF, flags=1, session=0x0A0B0C0D,
                 residual_order=2, closed_loop=False, warmup_steps=2, keyframe_period=10,
                 decay=0.5)
    expected = bytes.fromhex(
        "4343"              # magic "CC"
        "04"                # version 4
        "05"                # codec id 5 (binary)
        "03"                # dtype code 3 (bfloat16)
        "01"                # flags: keyframe
        "02"                # ndim 2
        "06"                # order 2 | open loop (4)
        "07000000"          # param 7
        "04030201"          # seq 0x01020304
        "efbeadde"          # tag 0xDEADBEEF
        "0d0c0b0a"          # session 0x0A0B0C0D
        "02000000"          # warmup 2
        "0a000000"          # keyframe period 10
        "0000003f"          # decay 0.5 as float32
        "00000000"          # no checksum
        "3412000000000000"  # body length 0x1234
        "0300000000000000"  # shape[0] = 3
        "0102000000000000"  # shape[1] = 513 = 0x201
    )
    assert len(expected) == 64
    assert hdr.to_bytes() == expected
    # And the same bytes written with struct.
    assert expected == struct.pack("<2sBBBBBBIIIIIIfIQQQ", b"CC", 4, 5, 3, 1, 2, 6, 7,
                                   0x01020304, 0xDEADBEEF, 0x0A0B0C0D, 2, 10, 0.5, 0, 0x1234,
                                   3, 513)
    got = read_header(as_payload(expected + b"\x00" * 0x1234))
    assert got == hdr
    assert got.keyframe and got.nbytes == 64


def test_worked_example_scalar_float32():
    # A 0-d float32 tensor: 48-byte header, no shape entries.
    expected = struct.pack("<2sBBBBBBIIIIIIfIQ", b"CC", 4, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                           0.0, 0, 8)
    assert len(expected) == 48
    hdr = Header(codec_id=0, dtype=torch.float32, shape=(), body_nbytes=8)
    assert hdr.to_bytes() == expected
    assert read_header(as_payload(expected + bytes(8))) == hdr


def test_checksum_sealed_and_verified():
    hdr = Header(codec_id=0, dtype=torch.float32, shape=(2,), body_nbytes=8, flags=2)
    payload = torch.zeros(hdr.payload_nbytes, dtype=torch.uint8)
    hdr.write(payload)
    payload[hdr.nbytes:] = torch.arange(8, dtype=torch.uint8)
    hdr.seal(payload)
    crc = zlib.crc32(bytes(range(8)))
    assert bytes(payload[36:40].tolist()) == crc.to_bytes(4, "little")
    verify_checksum(payload, read_header(payload), "test")
    payload[hdr.nbytes + 3] ^= 0x10
    with pytest.raises(WireFormatError, match="checksum"):
        verify_checksum(payload, read_header(payload), "test")


def test_unaligned_payload_is_copied():
    base = torch.arange(41, dtype=torch.uint8)
    odd = base[1:]
    assert odd.data_ptr() % 8 != 0
    got = contiguous_payload(odd)
    assert got.data_ptr() % 8 == 0 and torch.equal(got, odd)
    aligned = torch.zeros(16, dtype=torch.uint8)
    assert contiguous_payload(aligned) is aligned


# --------------------------------------------------------------------------- bad input

GOOD = hand_header(2, 1, (4, 6), 16, param=0, seq=3, tag=9)


def good_payload(raw=GOOD, body=16):
    return as_payload(raw + bytes(body))


def test_good_payload_reads():
    assert read_header(good_payload()) == Header(2, torch.float32, (4, 6), 16, 0, 3, 9, 0)


@pytest.mark.parametrize("magic", [b"CD", b"cc", b"\x00\x00", b"XC"])
def test_bad_magic(magic):
    with pytest.raises(WireFormatError, match="magic"):
        read_header(good_payload(hand_header(2, 1, (4, 6), 16, magic=magic)))


@pytest.mark.parametrize("version", [0, 1, 2, 3, 5, 255])
def test_bad_version(version):
    with pytest.raises(WireFormatError, match="version"):
        read_header(good_payload(hand_header(2, 1, (4, 6), 16, version=version)))


@pytest.mark.parametrize("code", [0, 4, 5, 255])
def test_unknown_dtype_code(code):
    with pytest.raises(WireFormatError, match="dtype"):
        read_header(good_payload(hand_header(2, code, (4, 6), 16)))


@pytest.mark.parametrize("n", [0, 1, 8, 24, 31, 47])
def test_truncated_below_fixed_header(n):
    with pytest.raises(WireFormatError):
        read_header(as_payload(GOOD[:n]))


@pytest.mark.parametrize("ndim,keep", [(1, 48), (2, 48), (2, 56), (2, 63), (5, 87)])
def test_truncated_below_shape(ndim, keep):
    raw = hand_header(2, 1, (1,) * ndim, 0)
    assert keep < len(raw)
    with pytest.raises(WireFormatError):
        read_header(as_payload(raw[:keep]))


@pytest.mark.parametrize("body", [0, 15, 17, 24, 1000])
def test_length_mismatch(body):
    # The header announces 16 body bytes.
    with pytest.raises(WireFormatError):
        read_header(good_payload(body=body))


@settings(max_examples=30, deadline=None)
@given(hdr=headers, delta=st.integers(-8, 8).filter(lambda d: d != 0))
def test_length_mismatch_any_header(hdr, delta):
    body = hdr.body_nbytes + delta
    if body < 0:
        body = hdr.body_nbytes + 1
    with pytest.raises(WireFormatError):
        read_header(as_payload(hdr.to_bytes() + bytes(body)))


@pytest.mark.parametrize("make", [
    lambda p: p.to(torch.int8),
    lambda p: p.to(torch.int32),
    lambda p: p.to(torch.float32),
    lambda p: p.view(1, -1),
    lambda p: p.view(-1, 8),
    lambda p: p[0],
    lambda p: bytes(p.tolist()),
    lambda p: p.numpy(),
], ids=["int8", "int32", "float32", "2d-row", "2d", "0d", "bytes", "numpy"])
def test_not_a_1d_uint8_tensor(make):
    p = good_payload()
    with pytest.raises(WireFormatError):
        read_header(make(p))


# --------------------------------------------------------------------------- layout

def align8(n):
    return -(-n // 8) * 8


def test_layout_worked_example():
    lay = Layout(Section("a", torch.float32, 3), Section("b", torch.uint8, 5),
                 Section("c", torch.float16, 7), Section("d", torch.bfloat16, 0),
                 Section("e", torch.float32, 1))
    # a: [0, 12) -> 16; b: [16, 21) -> 24; c: [24, 38) -> 40; d: [40, 40); e: [40, 44) -> 48
    assert lay.offsets == (0, 16, 24, 40, 40)
    assert lay.nbytes == 48


section_dtypes = st.sampled_from([torch.uint8, torch.float16, torch.bfloat16, torch.float32,
                                  torch.int64])


@settings(max_examples=60, deadline=None)
@given(specs=st.lists(st.tuples(section_dtypes, st.integers(0, 40)), min_size=1, max_size=6),
       ndim=st.integers(0, 5))
def test_layout_offsets_and_views(specs, ndim):
    sections = [Section(f"s{i}", dt, n) for i, (dt, n) in enumerate(specs)]
    lay = Layout(*sections)
    # Independent offsets: each section starts at the next multiple of 8.
    pos, want = 0, []
    for dt, n in specs:
        want.append(pos)
        pos = align8(pos + n * dt.itemsize)
    assert lay.offsets == tuple(want)
    assert lay.nbytes == pos
    assert all(o % 8 == 0 for o in lay.offsets) and lay.nbytes % 8 == 0
    # Views sit in a payload behind a header (which is itself a multiple of 8 bytes).
    hdr = header_nbytes(ndim)
    payload = torch.zeros(hdr + lay.nbytes, dtype=torch.uint8)
    views = lay.views(payload[hdr:])
    assert list(views) == [s.name for s in sections]
    for s, off in zip(sections, lay.offsets):
        v = views[s.name]
        assert v.dtype == s.dtype and v.dim() == 1 and v.numel() == s.numel
        if s.numel:
            # The view aliases its bytes of the payload.
            v.fill_(1)
            region = payload[hdr + off: hdr + off + s.numel * s.dtype.itemsize]
            assert bool((region.view(s.dtype) == 1).all())
    # Sections do not overlap: filling each with a distinct byte leaves the others intact.
    payload.zero_()
    for i, s in enumerate(sections):
        raw = payload[hdr + lay.offsets[i]: hdr + lay.offsets[i] + s.numel * s.dtype.itemsize]
        raw.fill_(i + 1)
    for i, s in enumerate(sections):
        raw = payload[hdr + lay.offsets[i]: hdr + lay.offsets[i] + s.numel * s.dtype.itemsize]
        assert bool((raw == i + 1).all())
