"""The test doubles users import (compressed_comm.testing): their own code over virtual ranks
and injected faults; the transport Work they return; the old simulator paths."""

import importlib
import sys

import pytest
import torch

import compressed_comm.testing
from compressed_comm import (
    CommTimeoutError,
    CompressedCommError,
    CompressedGroup,
    CompressionConfig,
    StreamOrderError,
    Work,
)
from compressed_comm.testing import Fault, FaultPlan, Injection, faulty_world, run_ranks


def frame(step):
    return torch.full((4, 8), float(step)) + torch.arange(32.0).view(4, 8)


def users_pipeline(transport, steps):
    """A user's code under test: rank 0 streams ``steps`` frames to rank 1, which returns
    what it got, or the error that stopped it."""
    g = CompressedGroup(transport, CompressionConfig(codec="identity"), timeout=3.0)
    if transport.rank == 0:
        for s in range(steps):
            g.send(frame(s), 1, stream="frames")
        return None
    got = []
    try:
        for _ in range(steps):
            got.append(g.recv(torch.empty(4, 8), 0, stream="frames").clone())
    except CompressedCommError as e:
        return got, e
    return got, None


@pytest.mark.parametrize("dropped, error", [(2, CommTimeoutError), (1, StreamOrderError)])
def test_a_dropped_message_stops_the_users_receiver_with_a_named_error(dropped, error):
    """The last frame lost: the receiver times out; a middle one: the next frame's header
    says a message was missed."""
    fabric, transports = faulty_world(2, FaultPlan(schedule={dropped: Fault.DROP}))
    _, (got, raised) = run_ranks(2, lambda t: users_pipeline(transports[t.rank], 3),
                                 fabric=fabric, timeout=30)
    assert len(got) == dropped, raised
    assert all(torch.equal(x, frame(s)) for s, x in enumerate(got))
    assert type(raised) is error
    assert transports[0].records == [Injection(dropped, "isend", 1, Fault.DROP)]


def test_a_plan_without_faults_delivers_every_frame_exactly():
    fabric, transports = faulty_world(2, FaultPlan())
    _, (got, error) = run_ranks(2, lambda t: users_pipeline(transports[t.rank], 3),
                                fabric=fabric, timeout=30)
    assert error is None and all(torch.equal(x, frame(s)) for s, x in enumerate(got))
    assert not transports[0].records and fabric.link_bytes()[(0, 1)] > 3 * frame(0).nbytes


def test_work_retries_a_failed_wait_and_completes_once():
    calls = []

    def finish(timeout):
        calls.append(timeout)
        if len(calls) == 1:
            raise CommTimeoutError("not yet")

    work = Work.all_of([Work.done(), Work(finish)])
    with pytest.raises(CommTimeoutError):
        work.wait(1.0)
    work.wait(None)  # tries again: the transfer was still pending
    work.wait(1.0)  # complete: returns at once
    assert len(calls) == 2 and calls[1] is None
    Work.done().wait(0.0)


@pytest.mark.parametrize("old", ["simulator.inprocess", "simulator.faults"])
def test_the_old_paths_warn_and_name_the_same_objects(old, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match="compressed_comm.testing"):
        module = importlib.import_module(old)
    assert module.__all__
    for name in module.__all__:
        assert getattr(module, name) is getattr(compressed_comm.testing, name)
