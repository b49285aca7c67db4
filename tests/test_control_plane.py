"""The control plane on virtual ranks: one agreement per step, steps that change, faults one
rank sees (every rank raises at once, ``new_session()`` recovers), and recovery that is
symmetric and idempotent."""

import time

import pytest
import torch

from compressed_comm import (
    CompressedCommError,
    CompressedGroup,
    CompressionConfig,
    NonFiniteError,
    PeerFailedError,
    WireFormatError,
)
from compressed_comm.testing import Fault, FaultPlan, faulty_world, run_ranks

WORLD = 3
C = 8


def value(rank, step, request=0, rows=4):
    gen = torch.Generator().manual_seed(1000 * request + 10 * step + rank)
    return torch.randn(rows, C, generator=gen) + 100 * request


def run_op(g, op, x):
    """Every rank's ``x`` (or their sum) through ``op``; results comparable across ranks."""
    if op == "all_gather":
        return torch.cat(g.all_gather(x, stream=op))
    if op == "ring":
        return torch.cat(g.ring_pass(x, stream=op))
    if op == "all_to_all":
        return g.all_to_all(torch.cat([x] * WORLD), stream=op)
    return g.all_reduce(x, stream=op)


def expected(op, rank, step, request=0):
    xs = [value(r, step, request) for r in range(WORLD)]
    if op in ("all_gather", "ring", "all_to_all"):
        return torch.cat(xs)
    return sum(xs)


def make(t, timeout=30.0, **cfg):
    return CompressedGroup(t, CompressionConfig(codec="identity", checksum=True, **cfg),
                           timeout=timeout)


def test_steady_state_takes_one_control_exchange_per_step():
    """Five collectives a step: five handshakes and one step exchange in the first step,
    then only the step exchange; results exact throughout."""
    ops = ("all_gather", "all_to_all", "ring")

    def body(t):
        g = make(t)
        exchanges = []
        for step in range(5):
            before = g.handshake_messages_sent
            for op in ops:
                got = run_op(g, op, value(t.rank, step))
                assert torch.equal(got, expected(op, t.rank, step))
            g.all_gather(value(t.rank, step)[:2], stream="small")
            g.all_gather(value(t.rank, step)[:3], stream="smaller")
            g.step()
            exchanges.append((g.handshake_messages_sent - before) // (WORLD - 1))
        return exchanges, g.bytes_sent
    for exchanges, _ in run_ranks(WORLD, body):
        assert exchanges == [5 + 1, 1, 1, 1, 1]


def test_steps_that_grow_shrink_and_change_shape_are_agreed():
    """A step with an extra collective (a third transformer call), a shorter one (guidance
    stopped), and one whose shapes change on every rank (a renewed stream): no error, exact
    results, and the changed entry is agreed by a handshake in every later step."""
    def body(t):
        g = CompressedGroup(t, CompressionConfig(codec="identity"), timeout=30.0,
                            renew_streams=True)
        plan = [["a", "b"], ["a", "b", "c"], ["a"], ["a", "b"], ["a", "b"], ["a", "b"]]
        exchanges = []
        for step, names in enumerate(plan):
            before = g.handshake_messages_sent
            for name in names:
                rows = 6 if (name == "b" and step >= 4) else 4
                got = g.all_gather(value(t.rank, step, rows=rows), stream=name)
                assert torch.equal(torch.cat(got),
                                   torch.cat([value(r, step, rows=rows) for r in range(WORLD)]))
            g.step()
            exchanges.append((g.handshake_messages_sent - before) // (WORLD - 1))
        return exchanges
    for exchanges in run_ranks(WORLD, body):
        # step 0: 2 handshakes + step; 1: "c" is new; 2: voids "b" and "c" (data, not
        # control); 3: "b" is new again; 4: "b" changes shape on every rank (a void "b",
        # then a handshake); 5: "b" has changed before, so it is agreed by a handshake
        assert exchanges == [3, 2, 1, 2, 2, 2]


FAULTS = ("nan", "user", "shape", "corrupt")
OPS = ("all_gather", "all_to_all", "ring", "all_reduce")
#: messages one rank sends per call of each op on 3 ranks (for the corruption's index)
MESSAGES = {"all_gather": 1, "all_to_all": 2, "ring": 2, "all_reduce": 3}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("fault_step", [0, 2])
def test_a_fault_one_rank_sees_is_an_error_on_every_rank_at_once(fault, op, fault_step):
    """At a 30 s timeout, every rank raises within 5 s of the faulty call; new_session() on
    every rank recovers and the next request is exact."""
    schedule = ({MESSAGES[op] * fault_step: Fault.CORRUPT_BODY} if fault == "corrupt" else {})
    fabric, transports = faulty_world(WORLD, FaultPlan(schedule=schedule))

    def body(t):
        ft = transports[t.rank]
        g = make(ft)
        for step in range(fault_step):
            assert torch.equal(run_op(g, op, value(t.rank, step)), expected(op, t.rank, step))
            g.step()
        x = value(t.rank, fault_step)
        if t.rank == 1 and fault == "nan":
            x[0, 0] = float("nan")
        if t.rank == 1 and fault == "shape":
            x = value(t.rank, fault_step, rows=5)
        if ft.rank != 0:  # only rank 0's messages carry the corruption
            ft.plan = FaultPlan()
        t0 = time.monotonic()
        try:
            if t.rank == 1 and fault == "user":
                try:
                    raise RuntimeError("boom in the caller's code")
                except RuntimeError as e:
                    g.fail(e)
                    raise
            run_op(g, op, x)
            g.step()
            outcome = None
        except (CompressedCommError, RuntimeError) as e:
            outcome = e
        seconds = time.monotonic() - t0
        g.new_session()
        after = run_op(g, op, value(t.rank, 0, request=1))
        return outcome, seconds, torch.equal(after, expected(op, t.rank, 0, request=1))

    results = run_ranks(WORLD, body, fabric=fabric)
    for rank, (outcome, seconds, exact) in enumerate(results):
        assert outcome is not None, (rank, "raised nothing")
        assert seconds < 5.0, (rank, seconds, outcome)
        assert exact, rank
    errors = [r[0] for r in results]
    if fault in ("nan", "user"):  # the faulty rank raises its own error, the others name it
        assert isinstance(errors[1], NonFiniteError if fault == "nan" else RuntimeError)
        for e in (errors[0], errors[2]):
            assert isinstance(e, PeerFailedError) and e.rank == 1, e
            assert ("NonFiniteError" if fault == "nan" else "boom") in str(e)
    elif fault == "shape":
        assert all(isinstance(e, WireFormatError) and "disagree" in str(e) for e in errors)
    else:  # a receiver of rank 0's corrupt payload fails; every other rank names it
        assert any(isinstance(e, WireFormatError) and "checksum" in str(e) for e in errors)
        assert all(isinstance(e, (WireFormatError, PeerFailedError)) for e in errors)


def test_a_skipped_step_is_caught_before_the_payloads_move():
    def body(t):
        g = make(t)
        for step in range(2):
            g.all_gather(value(t.rank, step), stream="k")
            g.step()
        g.all_gather(value(t.rank, 2), stream="k")
        try:
            if t.rank == 0:
                g.step()  # rank 1 skips this step()
            g.all_gather(value(t.rank, 3), stream="k")
            outcome = None
        except WireFormatError as e:
            outcome = str(e)
        g.new_session()
        return outcome, torch.equal(torch.cat(g.all_gather(value(t.rank, 0, 1), stream="k")),
                                    torch.cat([value(r, 0, 1) for r in range(WORLD)]))
    for outcome, exact in run_ranks(WORLD, body):
        assert outcome is not None and "disagree" in outcome and exact


def test_new_session_twice_or_after_the_peers_recovered_keeps_the_group():
    def body(t):
        g = make(t)
        g.all_gather(value(t.rank, 0), stream="k")
        g.new_session()
        if t.rank == 0:
            g.new_session()  # again: the session is fresh, the peers are at work in it
        got = [torch.cat(g.all_gather(value(t.rank, s, 1), stream="k")) for s in range(2)]
        return all(torch.equal(x, torch.cat([value(r, s, 1) for r in range(WORLD)]))
                   for s, x in enumerate(got))
    assert run_ranks(WORLD, body) == [True] * WORLD
