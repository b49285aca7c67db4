"""The fault-injecting transport (compressed_comm.testing): each fault once, at a known message,
over two virtual ranks; reproducible random plans; a transparent plan."""

import inspect
import threading
import time

import numpy as np
import pytest
import torch

from compressed_comm.errors import CommError, CommTimeoutError
from compressed_comm.testing import (
    HEADER_BYTES,
    Fabric,
    Fault,
    FaultPlan,
    FaultyTransport,
    Injection,
    InProcessTransport,
    faulty_world,
    run_ranks,
)
from compressed_comm.transport import P2POp


def message(n, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator)


def run(plan, *fns, plans=None, timeout=20.0):
    """Run ``fns[r](transport_r)`` on len(fns) virtual ranks; per-rank plans if given."""
    if plans is None:
        fabric, ts = faulty_world(len(fns), plan)
    else:
        fabric = Fabric(len(fns))
        ts = [FaultyTransport(fabric.transport(r), p) for r, p in enumerate(plans)]
    results = run_ranks(len(fns), lambda t: fns[t.rank](ts[t.rank]), fabric=fabric,
                        timeout=timeout)
    return results, ts


def receive(t, sizes, src=0, timeout=5.0):
    out = []
    for n in sizes:
        buf = torch.zeros(n, dtype=torch.uint8)
        t.recv(buf, src, timeout)
        out.append(buf)
    return out


def outcome(call):
    """The exception ``call()`` raised and how long it took (None if it returned)."""
    start = time.monotonic()
    try:
        call()
    except CommError as e:
        return e, time.monotonic() - start
    return None, time.monotonic() - start


def differing_bits(a, b):
    """Bit positions (byte * 8 + bit) where two uint8 tensors differ."""
    xor = np.bitwise_xor(a.numpy(), b.numpy())
    return [i for i, bit in enumerate(np.unpackbits(xor, bitorder="little")) if bit]


# ------------------------------------------------------------------------------ transparent

def test_zero_probabilities_are_transparent():
    msgs = [message(n, n) for n in (1, 48, 49, 300)]

    def rank0(t):
        for m in msgs:
            t.send(m, 1)
        outs = [torch.zeros(8, dtype=torch.uint8) for _ in range(2)]
        t.all_gather(outs, message(8, 0)).wait(5)
        out = torch.zeros(10, dtype=torch.uint8)
        t.all_to_all_single(out, message(10, 0), [5, 5], [5, 5]).wait(5)
        return outs, out

    def rank1(t):
        got = receive(t, [m.numel() for m in msgs])
        outs = [torch.zeros(8, dtype=torch.uint8) for _ in range(2)]
        t.all_gather(outs, message(8, 1)).wait(5)
        out = torch.zeros(10, dtype=torch.uint8)
        t.all_to_all_single(out, message(10, 1), [5, 5], [5, 5]).wait(5)
        return got, outs, out

    (gathered0, a2a0), (got, gathered1, a2a1) = run(FaultPlan(seed=3), rank0, rank1)[0]
    for m, g in zip(msgs, got):
        assert torch.equal(m, g)
    for outs in (gathered0, gathered1):
        assert torch.equal(outs[0], message(8, 0)) and torch.equal(outs[1], message(8, 1))
    assert torch.equal(a2a0, torch.cat([message(10, 0)[:5], message(10, 1)[:5]]))
    assert torch.equal(a2a1, torch.cat([message(10, 0)[5:], message(10, 1)[5:]]))
    _, ts = run(FaultPlan(), lambda t: t.send(message(4, 0), 1), lambda t: receive(t, [4]))
    assert all(not t.injected and not t.records for t in ts)


# ------------------------------------------------------------------------------ point to point

def test_drop_makes_the_receiver_time_out():
    m0, m1 = message(64, 0), message(64, 1)

    def rank1(t):
        (first,) = receive(t, [64])
        return first, outcome(lambda: t.recv(torch.zeros(64, dtype=torch.uint8), 0, 0.5))

    results, ts = run(FaultPlan(schedule={1: Fault.DROP}),
                      lambda t: [t.send(m, 1) for m in (m0, m1)], rank1)
    first, (error, _) = results[1]
    assert torch.equal(first, m0)
    assert isinstance(error, CommTimeoutError)
    assert ts[0].records == [Injection(1, "isend", 1, Fault.DROP)]
    assert ts[0].injected == {Fault.DROP: 1} and not ts[1].injected


def test_duplicate_delivers_the_same_bytes_twice():
    m0, m1 = message(64, 0), message(64, 1)
    results, ts = run(FaultPlan(schedule={0: Fault.DUPLICATE}),
                      lambda t: [t.send(m, 1) for m in (m0, m1)],
                      lambda t: receive(t, [64, 64, 64]))
    got = results[1]
    assert torch.equal(got[0], m0) and torch.equal(got[1], m0) and torch.equal(got[2], m1)
    assert ts[0].injected == {Fault.DUPLICATE: 1}


def test_reorder_swaps_two_messages():
    m0, m1, m2 = message(64, 0), message(64, 1), message(64, 2)
    results, ts = run(FaultPlan(schedule={0: Fault.REORDER}),
                      lambda t: [t.send(m, 1) for m in (m0, m1, m2)],
                      lambda t: receive(t, [64, 64, 64]))
    got = results[1]
    assert [torch.equal(g, m) for g, m in zip(got, (m1, m0, m2))] == [True] * 3
    assert ts[0].records == [Injection(0, "isend", 1, Fault.REORDER)]


def test_a_held_message_waits_for_the_next_one_or_a_flush():
    m0 = message(64, 0)
    sent, waited = threading.Event(), threading.Event()

    def rank0(t):
        t.send(m0, 1)
        sent.set()
        assert waited.wait(5)  # flush only after the receiver's short wait ran out
        t.flush()

    def rank1(t):
        assert sent.wait(5)
        early = outcome(lambda: t.recv(torch.zeros(64, dtype=torch.uint8), 0, 0.1))[0]
        waited.set()
        return early, receive(t, [64])

    results, _ = run(FaultPlan(schedule={0: Fault.REORDER}), rank0, rank1)
    early, (got,) = results[1]
    assert isinstance(early, CommTimeoutError) and torch.equal(got, m0)


def test_reorder_within_a_batch():
    m0, m1 = message(32, 0), message(32, 1)

    def rank0(t):
        back = torch.zeros(8, dtype=torch.uint8)
        works = t.batch_isend_irecv([P2POp("send", m0, 1), P2POp("recv", back, 1),
                                     P2POp("send", m1, 1)])
        for w in works:
            w.wait(5)
        return back

    def rank1(t):
        t.send(message(8, 9), 0)
        return receive(t, [32, 32])

    plans = [FaultPlan(schedule={0: Fault.REORDER}), FaultPlan()]
    results, ts = run(None, rank0, rank1, plans=plans)
    assert torch.equal(results[0], message(8, 9))
    assert torch.equal(results[1][0], m1) and torch.equal(results[1][1], m0)
    assert ts[0].records == [Injection(0, "batch_isend_irecv", 1, Fault.REORDER)]


@pytest.mark.skipif("tag" not in inspect.signature(InProcessTransport.isend).parameters,
                    reason="the in-process transport has no message tags")
def test_reorder_is_per_tag():
    m0, m1, m2 = message(16, 0), message(16, 1), message(16, 2)

    def rank0(t):
        for m, tag in ((m0, 0), (m1, 1), (m2, 0)):
            t.isend(m, 1, tag).wait(5)

    def rank1(t):
        outs = [torch.zeros(16, dtype=torch.uint8) for _ in range(3)]
        for out, tag in zip(outs, (1, 0, 0)):
            t.irecv(out, 0, tag).wait(5)
        return outs

    results, ts = run(FaultPlan(schedule={0: Fault.REORDER}), rank0, rank1)
    assert ts[0].injected == {Fault.REORDER: 1}
    assert [torch.equal(g, m) for g, m in zip(results[1], (m1, m2, m0))] == [True] * 3


@pytest.mark.parametrize("fault, region", [(Fault.CORRUPT_HEADER, range(HEADER_BYTES)),
                                           (Fault.CORRUPT_BODY, range(HEADER_BYTES, 200))])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_corruption_flips_one_bit_in_its_region(fault, region, seed):
    m = message(200, seed)
    original = m.clone()
    results, ts = run(FaultPlan(seed=seed, schedule={0: fault}),
                      lambda t: t.send(m, 1), lambda t: receive(t, [200]))
    (got,) = results[1]
    bits = differing_bits(got, original)
    assert len(bits) == 1 and bits[0] // 8 in region
    assert torch.equal(m, original)  # the sender's tensor is untouched
    assert ts[0].records == [Injection(0, "isend", 1, fault)]


def test_body_corruption_of_a_header_only_message_is_not_injected():
    m = message(HEADER_BYTES, 0)
    results, ts = run(FaultPlan(schedule={0: Fault.CORRUPT_BODY}),
                      lambda t: t.send(m, 1), lambda t: receive(t, [HEADER_BYTES]))
    assert torch.equal(results[1][0], m) and not ts[0].injected


def test_delay_delivers_later():
    m = message(64, 0)

    def rank0(t):
        start = time.monotonic()
        t.send(m, 1)
        return start

    def rank1(t):
        (got,) = receive(t, [64])
        return got, time.monotonic()

    results, ts = run(FaultPlan(delay=0.3, schedule={0: Fault.DELAY}), rank0, rank1)
    got, arrived = results[1]
    assert torch.equal(got, m) and arrived - results[0] >= 0.29
    assert ts[0].injected == {Fault.DELAY: 1}


def test_kill_makes_both_ranks_raise_comm_error_not_hang():
    def rank0(t):
        t.send(message(8, 0), 1)
        killed = outcome(lambda: t.send(message(8, 1), 1))[0]
        later = [outcome(lambda: t.send(message(8, 2), 1))[0],
                 outcome(lambda: t.recv(torch.zeros(8, dtype=torch.uint8), 1, 1.0))[0]]
        return killed, later, t.killed

    def rank1(t):
        receive(t, [8])
        return outcome(lambda: t.recv(torch.zeros(8, dtype=torch.uint8), 0, 10.0))

    results, ts = run(FaultPlan(schedule={1: Fault.KILL}), rank0, rank1)
    killed, later, is_killed = results[0]
    assert is_killed and str(killed) == "rank 0 was killed (injected fault)"
    assert all(type(e) is CommError and "killed (injected fault)" in str(e) for e in later)
    peer_error, waited = results[1]
    assert type(peer_error) is CommError and "rank 0 was killed" in str(peer_error)
    assert waited < 5.0  # raised on the abort, not at the end of its 10 s timeout
    assert ts[0].injected == {Fault.KILL: 1}


def test_kill_propagates_through_run_ranks():
    fabric, ts = faulty_world(2, FaultPlan(schedule={0: Fault.KILL}))
    fns = [lambda t: t.send(message(8, 0), 1),
           lambda t: t.recv(torch.zeros(8, dtype=torch.uint8), 0, 10.0)]
    start = time.monotonic()
    with pytest.raises(CommError, match="killed"):
        run_ranks(2, lambda t: fns[t.rank](ts[t.rank]), fabric=fabric, timeout=20)
    assert time.monotonic() - start < 5.0


# ------------------------------------------------------------------------------ collectives

def gather(t, n=64, timeout=5.0):
    outs = [torch.zeros(n, dtype=torch.uint8) for _ in range(2)]
    mine = message(n, t.rank)
    t.all_gather(outs, mine).wait(timeout)
    assert torch.equal(mine, message(n, t.rank))  # the contribution itself is untouched
    return outs


def test_corrupted_all_gather_contribution():
    plans = [FaultPlan(schedule={0: Fault.CORRUPT_HEADER}), FaultPlan()]
    results, ts = run(None, gather, gather, plans=plans)
    for outs in results:
        bits = differing_bits(outs[0], message(64, 0))
        assert len(bits) == 1 and bits[0] // 8 < HEADER_BYTES
        assert torch.equal(outs[1], message(64, 1))
    assert ts[0].records == [Injection(0, "all_gather", None, Fault.CORRUPT_HEADER)]


def test_corrupted_all_to_all_chunk():
    def a2a(t):
        out = torch.zeros(200, dtype=torch.uint8)
        mine = message(200, t.rank)
        t.all_to_all_single(out, mine, [100, 100], [100, 100]).wait(5)
        assert torch.equal(mine, message(200, t.rank))
        return out

    plans = [FaultPlan(schedule={0: Fault.CORRUPT_BODY}), FaultPlan()]
    results, ts = run(None, a2a, a2a, plans=plans)
    assert torch.equal(results[0], torch.cat([message(200, 0)[:100], message(200, 1)[:100]]))
    assert torch.equal(results[1][100:], message(200, 1)[100:])
    bits = differing_bits(results[1][:100], message(200, 0)[100:])
    assert len(bits) == 1 and bits[0] // 8 >= HEADER_BYTES
    assert ts[0].records == [Injection(0, "all_to_all_single", 1, Fault.CORRUPT_BODY)]


def test_dropped_collective_times_out_then_the_next_one_works():
    def body(t):
        outs = [torch.zeros(8, dtype=torch.uint8) for _ in range(2)]
        lost = outcome(lambda: t.all_gather(outs, message(8, t.rank)).wait(0.5))[0]
        return lost, gather(t, 8)

    plans = [FaultPlan(schedule={0: Fault.DROP}), FaultPlan()]
    results, ts = run(None, body, body, plans=plans)
    for lost, outs in results:
        assert isinstance(lost, CommTimeoutError)
        assert torch.equal(outs[0], message(8, 0)) and torch.equal(outs[1], message(8, 1))
    assert ts[0].injected == {Fault.DROP: 1}


def test_duplicate_and_reorder_do_not_apply_to_collectives():
    plan = FaultPlan(schedule={0: Fault.DUPLICATE, 1: Fault.REORDER})
    results, ts = run(plan, lambda t: [gather(t), gather(t)], lambda t: [gather(t), gather(t)])
    for rounds in results:
        for outs in rounds:
            assert torch.equal(outs[0], message(64, 0)) and torch.equal(outs[1], message(64, 1))
    assert all(not t.injected and not t.records for t in ts)


def test_delayed_and_killed_collectives():
    plans = [FaultPlan(delay=0.3, schedule={0: Fault.DELAY}), FaultPlan()]
    start = time.monotonic()
    results, _ = run(None, gather, gather, plans=plans)
    assert time.monotonic() - start >= 0.29
    assert torch.equal(results[1][0], message(64, 0))

    plans = [FaultPlan(schedule={0: Fault.KILL}), FaultPlan()]
    results, _ = run(None, lambda t: outcome(lambda: gather(t, timeout=10)),
                     lambda t: outcome(lambda: gather(t, timeout=10)), plans=plans)
    (killed, _), (peer, waited) = results
    assert str(killed) == "rank 0 was killed (injected fault)"
    assert type(peer) is CommError and waited < 5.0


# ------------------------------------------------------------------------------ random plans

RANDOM = {"p_drop": 0.05, "p_duplicate": 0.05, "p_reorder": 0.05, "p_corrupt_header": 0.05,
          "p_corrupt_body": 0.05, "p_delay": 0.01}


def random_run(seed, rank=0, n=400):
    fabric = Fabric(2)
    t = FaultyTransport(fabric.transport(rank), FaultPlan(seed=seed, delay=0.0, **RANDOM))
    for i in range(n):
        t.isend(message(100, i), 1 - rank)  # buffered: nobody needs to receive
    return t


def test_random_faults_are_reproducible_with_a_fixed_seed():
    a, b = random_run(7), random_run(7)
    assert a.injected == b.injected and a.records == b.records
    assert sum(a.injected.values()) == len(a.records)
    for fault in (Fault.DROP, Fault.DUPLICATE, Fault.REORDER, Fault.CORRUPT_HEADER,
                  Fault.CORRUPT_BODY):
        assert 5 <= a.injected[fault] <= 45  # ~20 of 400 each
    assert Fault.KILL not in a.injected
    assert random_run(8).records != a.records
    assert random_run(7, rank=1).records != a.records  # each rank draws from seed + rank


def test_plan_validation():
    with pytest.raises(ValueError, match="p_drop"):
        FaultPlan(p_drop=1.5)
    with pytest.raises(ValueError, match="sum"):
        FaultPlan(p_drop=0.6, p_kill=0.6)
    with pytest.raises(ValueError, match="schedule"):
        FaultPlan(schedule={-1: Fault.DROP})
    with pytest.raises(TypeError, match="schedule"):
        FaultPlan(schedule={0: "drop"})
    plan = FaultPlan(seed=1, schedule={0: Fault.DROP})
    assert hash(plan) == hash(FaultPlan(seed=1)) and plan != FaultPlan(seed=1)
    with pytest.raises(TypeError):
        plan.schedule[1] = Fault.KILL
