"""Serving faults on the in-process transport: abandoned requests, failed waits, ranks that
disagree, two groups on one transport. Each ends in a clear error or a correct result, and
the group is usable again after ``new_session()`` on every rank."""

import time

import pytest
import torch

from compressed_comm import (
    CancelledError,
    CommTimeoutError,
    CompressedGroup,
    Keyframes,
    CompressionConfig,
    GroupFailedError,
    PeerFailedError,
    RawGroup,
    WireFormatError,
)
from compressed_comm.testing import run_ranks

SHAPE = (6, 5)


def data(rank, request, step):
    """A distinct tensor per (rank, request, step), so any mix-up shows."""
    gen = torch.Generator().manual_seed(10_000 * request + 100 * step + rank)
    return torch.randn(SHAPE, generator=gen) + 100 * request


def group(t, timeout=5.0, **cfg):
    cfg.setdefault("codec", "identity")  # exact: results compare with ==
    return CompressedGroup(t, CompressionConfig(**cfg), timeout=timeout)


def test_abandoned_p2p_request_never_leaks_into_the_next():
    """Request A: rank 0 sends 8 steps, rank 1 reads 3 and abandons. Request B is exact."""
    def body(t):
        g = group(t)
        if t.rank == 0:
            handles = [g.isend(data(0, 0, s), 1, stream="x") for s in range(8)]
            g.new_session()
            with pytest.raises(CancelledError, match="session ended"):
                handles[7].wait()
            for s in range(8):
                g.send(data(0, 1, s), 1, stream="x")
            return None
        got = [g.recv(torch.empty(SHAPE), 0, stream="x").clone() for _ in range(3)]
        assert all(torch.equal(x, data(0, 0, s)) for s, x in enumerate(got))
        g.new_session()
        return [g.recv(torch.empty(SHAPE), 0, stream="x").clone() for _ in range(8)]
    res = run_ranks(2, body)
    assert all(torch.equal(x, data(0, 1, s)) for s, x in enumerate(res[1]))


def test_posted_receives_the_sender_never_sent_are_satisfied_by_the_fence():
    def body(t):
        g = group(t)
        if t.rank == 1:
            pending = [g.irecv(torch.empty(SHAPE), 0, stream="x") for _ in range(3)]
        else:
            g.send(data(0, 0, 0), 1, stream="x")
        g.new_session()
        if t.rank == 1:
            with pytest.raises(CancelledError):
                pending[2].wait()
            return g.recv(torch.empty(SHAPE), 0, stream="x").clone()
        g.send(data(0, 1, 0), 1, stream="x")
    res = run_ranks(2, body)
    assert torch.equal(res[1], data(0, 1, 0))


@pytest.mark.parametrize("world", [2, 3])
def test_abandoned_ring_pass_and_all_gather(world):
    def body(t):
        g = group(t, codec="int8")
        ring = g.ring_iter(data(t.rank, 0, 0), stream="kv")
        next(ring), next(ring)  # abandoned after the first hop
        pending = g.all_gather_async(data(t.rank, 0, 1), stream="kv")  # never waited
        g.new_session()
        with pytest.raises(CancelledError):
            pending.wait()
        return (g.ring_pass(data(t.rank, 1, 0), stream="kv"),
                g.all_gather(data(t.rank, 1, 1), stream="kv"))
    res = run_ranks(world, body)
    for me in range(world):  # keyframes of request B: exact
        ring, gathered = res[me]
        assert all(torch.equal(ring[o], data(o, 1, 0)) for o in range(world))
        assert all(torch.equal(gathered[o], data(o, 1, 1)) for o in range(world))


def test_a_failed_wait_fails_the_group_until_new_session():
    def body(t):
        g = group(t, timeout=0.3)
        if t.rank == 1:
            with pytest.raises(CommTimeoutError):
                g.recv(torch.empty(SHAPE), 0, stream="x")  # rank 0 never sends
            for call in (lambda: g.recv(torch.empty(SHAPE), 0, stream="x"),
                         lambda: g.all_gather(data(1, 0, 0), stream="y")):
                with pytest.raises(GroupFailedError, match="CommTimeoutError.*new_session"):
                    call()
        g.timeout = 5.0
        g.new_session()
        return g.all_gather(data(t.rank, 1, 0), stream="y")
    res = run_ranks(2, body)
    assert all(torch.equal(res[m][o], data(o, 1, 0)) for m in range(2) for o in range(2))


@pytest.mark.parametrize("theirs,field", [
    (dict(residual_order=0), "residual_order"),
    (dict(warmup_steps=2), "warmup_steps"),
    (dict(keyframes=Keyframes(period=3)), "keyframes.period"),
    (dict(closed_loop=False), "closed_loop"),
    (dict(codec="int4"), "codec"),
])
def test_ranks_that_disagree_on_config_all_raise_naming_the_field(theirs, field):
    def body(t):
        cfg = dict(codec="int8") | (theirs if t.rank == 1 else {})
        g = group(t, **cfg)
        with pytest.raises(WireFormatError, match=f"CompressionConfig differs in .*{field}"):
            g.all_gather(data(t.rank, 0, 0), stream="k")
        return True
    assert run_ranks(2, body) == [True, True]


def p2p_disagreement(sender, receiver, match):
    """Rank 0 (config ``sender``) sends to rank 1 (``receiver``), which raises ``match``."""
    def body(t):
        g = group(t, **(sender if t.rank == 0 else receiver))
        if t.rank == 0:
            g.send(data(0, 0, 0), 1, stream="x")
            return None
        with pytest.raises(WireFormatError, match=match):
            g.recv(torch.empty(SHAPE), 0, stream="x")
        return True
    assert run_ranks(2, body)[1]


def test_config_disagreement_on_p2p_shows_the_header_values():
    p2p_disagreement(dict(codec="int8"), dict(codec="int8", residual_order=2),
                     "in residual_order .residual_order=1 .expected 2")


def test_a_rank_that_skips_step_is_caught_before_the_payloads_move():
    """Rank 1 restarts its streams (as a missed step() does in the drop-in group): the
    sizes differ, and every rank raises instead of exchanging mismatched buffers."""
    def body(t):
        g = group(t, codec="int8")
        g.all_gather(data(t.rank, 0, 0), stream="k")
        name = "k" if t.rank == 0 else "k2"
        with pytest.raises(WireFormatError, match="disagree"):
            g.all_gather(data(t.rank, 0, 1), stream=name)
        g.new_session()
        return g.all_gather(data(t.rank, 1, 0), stream="k")
    res = run_ranks(2, body)
    assert all(torch.equal(res[m][o], data(o, 1, 0)) for m in range(2) for o in range(2))


def test_ranks_that_issued_different_collectives_raise_and_recover():
    """Rank 0 issues a collective rank 1 does not (it times out); rank 1 starts a new session
    meanwhile, which finds nothing to end. Rank 0's new session meets rank 1's next call,
    which raises naming rank 0; then every rank recovers and the next request is exact."""
    def body(t):
        g = group(t, timeout=0.5)
        if t.rank == 0:
            with pytest.raises(CommTimeoutError):
                g.all_gather(data(0, 0, 0), stream="k")
            g.timeout = 5.0
            g.new_session()
        else:
            time.sleep(1.0)  # after rank 0 timed out
            g.timeout = 5.0
            g.new_session()  # fresh: nothing to end
            with pytest.raises(PeerFailedError, match="rank 0 failed .CommTimeoutError"):
                g.all_gather(data(1, 0, 0), stream="k")
            g.new_session()
        return g.all_gather(data(t.rank, 1, 0), stream="k")
    res = run_ranks(2, body)
    assert all(torch.equal(res[m][o], data(o, 1, 0)) for m in range(2) for o in range(2))


def test_abort_closes_the_group():
    def body(t):
        g = group(t)
        h = g.all_gather_async(data(t.rank, 0, 0), stream="k")
        g.abort()
        with pytest.raises(CancelledError, match="aborted"):
            h.wait()
        with pytest.raises(GroupFailedError, match="aborted"):
            g.all_gather(data(t.rank, 0, 0), stream="k")
        return True
    assert run_ranks(2, body) == [True, True]


def test_two_groups_on_one_transport_never_swap_data():
    def body(t):
        a, b = group(t, codec="int8"), group(t, codec="int8")
        if t.rank == 0:
            a.send(data(0, 0, 0), 1, stream="x")
            b.send(data(0, 1, 0), 1, stream="x")
            return None
        with pytest.raises(WireFormatError, match="another stream"):
            b.recv(torch.empty(SHAPE), 0, stream="x")  # a's message comes first
        return True
    assert run_ranks(2, body)[1]


def test_raw_group_recovers_too():
    def body(t):
        g = RawGroup(t, timeout=5.0)
        pending = g.irecv(torch.empty(SHAPE), 1 - t.rank, stream="x")
        g.new_session()  # nothing was sent: the fence satisfies the receive
        with pytest.raises(CancelledError):
            pending.wait()
        return g.all_gather(data(t.rank, 0, 0), stream="y")
    res = run_ranks(2, body)
    assert all(torch.equal(res[m][o], data(o, 0, 0)) for m in range(2) for o in range(2))


def test_skip_patterns_match_the_callers_stream_names():
    def body(t):
        g = group(t, codec="binary", skip=("layer7.*",), warmup_steps=0)
        exact = g.all_gather(data(t.rank, 0, 0), stream="layer7.k")
        lossy = g.all_gather(data(t.rank, 0, 0), stream="layer8.k")
        return exact, lossy
    res = run_ranks(2, body)
    assert torch.equal(res[0][0][1], data(1, 0, 0))
    assert not torch.equal(res[0][1][1], data(1, 0, 0))


#: per shared config field, the sender's value (the receiver keeps the default but for
#: ``base``), chosen so that the sender's first message fits the receiver's buffer
DIFFERENT = {
    "codec": dict(codec="int4"),
    "residual_order": dict(residual_order=2),
    "decay": dict(residual_order=2, decay=0.25),
    "warmup_steps": dict(warmup_steps=2),
    "keyframes.period": dict(keyframes=Keyframes(period=3)),
    "keyframes.codec": dict(keyframes=Keyframes(codec="int8")),
    "keyframes.spread": dict(keyframes=Keyframes(period=4, spread=2)),
    "min_bytes": dict(min_bytes=10**9),
    "skip": dict(skip=("x*",)),
    "closed_loop": dict(closed_loop=False),
    "checksum": dict(checksum=True),
    "max_rel_error": dict(codec="auto", max_rel_error=0.05),
}


def test_every_shared_field_has_a_p2p_case():
    from compressed_comm.config import SHARED_FIELDS
    assert set(DIFFERENT) == set(SHARED_FIELDS)


@pytest.mark.parametrize("field", list(DIFFERENT))
def test_config_disagreement_on_p2p_names_every_shared_field(field):
    base = dict(codec="int8") | {"decay": dict(residual_order=2),
                                 "keyframes.spread": dict(keyframes=Keyframes(period=4)),
                                 "max_rel_error": dict(codec="auto"),
                                 }.get(field, {})
    p2p_disagreement(base | DIFFERENT[field], base,
                     f"CompressionConfig differs from this rank's in {field}")


@pytest.mark.parametrize("sender,receiver", [(1, 2), (2, 1), (2, 3), (3, 4), (4, 2)])
def test_keyframe_spreads_that_differ_are_named_on_p2p(sender, receiver):
    p2p_disagreement(dict(codec="int8", keyframes=Keyframes(period=4, spread=sender)),
                     dict(codec="int8", keyframes=Keyframes(period=4, spread=receiver)),
                     "differs from this rank's in keyframes.spread")
