"""Session: stream table, codec choice, statistics, reset, isolation."""

import pytest
import torch

from compressed_comm import (
    CompressionConfig,
    Session,
    StreamDecoder,
    StreamEncoder,
    StreamMismatchError,
    get_codec,
)
from compressed_comm.wire import pack_fingerprint


def test_streams_are_created_once_and_reused():
    s = Session(CompressionConfig(codec="int4"), rank=2)
    x = torch.randn(6, 5)
    enc = s.encoder("attn0.k", x)
    assert isinstance(enc, StreamEncoder) and enc.origin == 2
    assert s.encoder("attn0.k", x) is enc
    dec = s.decoder("attn0.k", 0, x)
    assert isinstance(dec, StreamDecoder) and dec.origin == 0
    assert s.decoder("attn0.k", 0, x) is dec
    assert s.decoder("attn0.k", 1, x) is not dec
    assert len(s) == 3


def test_three_virtual_ranks_stay_in_lock_step():
    """Every rank broadcasts its tensor; every other rank decodes it with the origin's stream."""
    world = 3
    sessions = [Session(CompressionConfig(codec="binary"), rank=r) for r in range(world)]
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(7, 9, generator=gen).half() for _ in range(world)]
    for _ in range(10):
        xs = [(x.float() + 0.1 * torch.randn(7, 9, generator=gen)).half() for x in xs]
        payloads = [sessions[r].encoder("blk.k", xs[r]).encode(xs[r]) for r in range(world)]
        for me in range(world):
            for origin in range(world):
                if origin != me:
                    sessions[me].decoder("blk.k", origin, xs[origin]).decode(payloads[origin])
    for me in range(world):
        for origin in range(world):
            if origin != me:
                ref = sessions[me].decoder("blk.k", origin, xs[origin]).reference
                assert torch.equal(ref, sessions[origin].encoder("blk.k", xs[origin]).reference)


def test_shape_dtype_and_role_conflicts_raise():
    s = Session(rank=0)
    s.encoder("a", torch.zeros(4, 4))
    with pytest.raises(StreamMismatchError, match=r"'a'.*\(4, 4\).*\(4, 5\)"):
        s.encoder("a", torch.zeros(4, 5))
    with pytest.raises(StreamMismatchError, match="float16"):
        s.encoder("a", torch.zeros(4, 4, dtype=torch.float16))
    with pytest.raises(StreamMismatchError, match="encoder"):
        s.decoder("a", 0, torch.zeros(4, 4))


def test_small_and_skipped_streams_go_raw():
    cfg = CompressionConfig(codec="binary", min_bytes=1024, skip=("*.norm",))
    s = Session(cfg)
    small = torch.randn(8, 8)           # 256 bytes
    big = torch.randn(32, 32)           # 4096 bytes
    assert s.encoder("small", small).codec.spec == "identity"
    assert s.encoder("big", big).codec.spec == "binary"
    assert s.encoder("blk3.norm", big).codec.spec == "identity"
    for name, x in (("small", small), ("blk3.norm", big)):
        payload = s.encoder(name, x).encode(x)
        first = pack_fingerprint(cfg.fingerprint()).numel()  # ends a stream's first message
        assert payload.numel() == get_codec("identity").payload_nbytes(x.shape, x.dtype) + first
        assert torch.equal(s.encoder(name, x).reference, x)


def test_stats_totals_and_memory():
    cfg = CompressionConfig(codec="int2", residual_order=2, warmup_steps=1)
    s = Session(cfg)
    a, b = torch.randn(10, 6), torch.randn(4, 3, dtype=torch.bfloat16)
    for _ in range(3):
        s.encoder("a", a).encode(a)
    s.encoder("b", b).encode(b)
    st = s.stats()
    assert {x.name for x in st.streams} == {"a", "b"}
    assert st.raw_bytes == 3 * a.nbytes + b.nbytes
    assert st.wire_bytes == sum(x.wire_bytes for x in st.streams)
    assert st.ratio == pytest.approx(st.raw_bytes / st.wire_bytes)
    assert s.reference_bytes == st.reference_bytes == 2 * (a.nbytes + b.nbytes)


def test_reset_starts_every_stream_over():
    s = Session(CompressionConfig(codec="binary", warmup_steps=1))
    x = torch.randn(5, 5)
    enc = s.encoder("a", x)
    enc.encode(x)
    enc.encode(x)
    s.reset()
    assert len(s) == 0 and s.stats().wire_bytes == 0
    fresh = s.encoder("a", torch.randn(5, 6))  # a new request may use new shapes
    assert fresh is not enc and fresh.step == 0 and fresh.is_keyframe(0)


def test_sessions_do_not_share_state():
    x = torch.randn(6, 4)
    s1, s2 = Session(CompressionConfig(codec="int4")), Session(CompressionConfig(codec="int4"))
    s1.encoder("a", x).encode(x)
    assert s2.encoder("a", x).step == 0
    assert s1.encoder("a", x) is not s2.encoder("a", x)


def test_stream_keys_name_streams_for_skip_and_stats():
    from compressed_comm import StreamKey

    s = Session(CompressionConfig(codec="binary", skip=("layer7.*",)))
    x = torch.randn(8, 8)
    raw = s.encoder(StreamKey("all_gather", "layer7.k"), x)
    lossy = s.encoder(StreamKey("p2p", "layer8.k", 1), x)
    plain = s.encoder("layer7.v", x)  # a plain name is its own key
    assert raw.codec.spec == "identity" and plain.codec.spec == "identity"
    assert lossy.codec.spec == "binary"
    assert [str(st.key) for st in s.stats().streams] == ["all_gather:layer7.k", "p2p:layer8.k->1",
                                                       "layer7.v"]
    assert [st.name for st in s.stats().streams] == [str(st.key) for st in s.stats().streams]
    assert s.encoder(StreamKey("all_gather", "layer7.k"), x) is raw
    assert s.encoder(StreamKey("ring", "layer7.k"), x) is not raw  # another operation
