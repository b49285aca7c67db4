"""Multi-process runs over real gloo: CompressedGroup, the drop-in wrapper, a dead peer.

Few and grouped: each spawn costs seconds on 2 cores. The workers (cc_gloo_workers.py)
compare every compressed result with the uncompressed torch.distributed collective.
"""

import pytest
import torch
import torch.multiprocessing as mp

import cc_gloo_workers as workers

OPS = {"group.all_gather", "group.ring_pass", "group.all_to_all", "group.recv",
       "dist.all_gather", "dist.all_gather_into_tensor", "dist.all_to_all_single",
       "dist.all_to_all_single uneven", "dist.all_gather uneven", "dist.batch_isend_irecv"}


def spawn(worker, world, tmp_path):
    """Run ``worker(rank, world, store, out_dir)`` on ``world`` gloo processes; the summary
    each rank saved, in rank order (None for a rank that saved none)."""
    mp.spawn(worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
             join=True)
    files = [tmp_path / f"rank{rank}.pt" for rank in range(world)]
    return [torch.load(f) if f.exists() else None for f in files]


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_and_wrapper_over_gloo(world, tmp_path):
    for rank, summary in enumerate(spawn(workers.collectives_worker, world, tmp_path)):
        exact, binary = summary["identity"], summary["binary"]
        expected = OPS | ({"dist.send/recv"} if rank == 1 else set())
        assert set(exact["max_errors"]) == set(binary["max_errors"]) == expected
        assert all(e == 0.0 for e in exact["max_errors"].values())
        assert all(0.0 < e < workers.BOUND["binary"] for e in binary["max_errors"].values())
        # binary payloads are smaller than identity ones on the same traffic
        assert binary["wrapper_ratio"] > exact["wrapper_ratio"]
        assert binary["group_ratio"] > exact["group_ratio"]


def test_dead_or_silent_peer_raises_within_the_timeout(tmp_path):
    (silent, after, resync) = spawn(workers.dead_peer_worker, 2, tmp_path)[0]
    kind, message, seconds = silent
    assert kind == "CommTimeoutError" and seconds < 10
    assert "recv of stream 'never-sent' from rank 1" in message
    kind, message, seconds = after  # the group refuses work, naming the first failure
    assert kind == "GroupFailedError" and seconds < 1
    assert "never-sent" in message and "new_session" in message
    kind, message, seconds = resync  # the peer is dead: the group closes, within the timeout
    assert kind == "GroupFailedError" and seconds < 10
    assert "could not re-synchronise" in message


def test_serving_faults_through_the_drop_in_group(tmp_path):
    r0, r1 = spawn(workers.serving_faults_worker, 2, tmp_path)
    assert r1["a_first3"] and r1["b_exact"]  # request B never sees request A's data
    assert r0["a_cancelled"][0] == "CancelledError"
    # a message longer than expected is reported from its header, not by a gloo abort
    assert r1["p2p_skipped_step"][0] == "WireFormatError"
    assert "another stream" in r1["p2p_skipped_step"][1]
    for r in (r0, r1):  # a Python exception on both ranks, not a SIGABRT
        assert r["skipped_step"] is not None and "disagree" in r["skipped_step"][1]
        assert r["recovered"] and r["no_step_exact"]
        assert r["no_step_warned"] == 1 and r["streams"] == 4 * 2  # 4 calls x (enc + dec)


@pytest.mark.parametrize("world", [2, 3])
def test_reductions_through_the_drop_in_group_and_tensor_parallelism(world, tmp_path):
    for out in spawn(workers.reduce_worker, world, tmp_path):
        exact, int8 = out["identity"], out["int8"]
        assert exact["ranks differ"] == int8["ranks differ"] == 0.0
        assert exact["passthrough"] == int8["passthrough"] == 0.0
        for op in ("all_reduce sum", "all_reduce avg", "all_reduce_coalesced",
                   "reduce_scatter_tensor"):
            assert exact[op] < 1e-6, op  # lossless codec: only the summation order differs
            assert 0 < int8[op] < 5e-3, op
        assert exact["streams"] > 0 and int8["streams"] > 0
        assert out["off"] == {"exact": True, "streams": 0}  # reduce=False: untouched
        # tensor parallelism: DTensor's all-reduce of the row-parallel output, compressed
        assert "dtensor_reduce" in out["tp int8 points"] and out["tp int8 streams"] > 0
        assert out["tp identity"] < 1e-6
        assert 0 < out["tp int8"] < 5e-3


@pytest.mark.parametrize("world", [2, 3])
def test_drop_in_all_to_all_follows_splits_that_change_every_step(world, tmp_path):
    """Token routing changes the splits of dist.all_to_all_single at every step (zero-size
    blocks among them): a changed block renews its stream on both ranks, identity stays
    exact, and memory stays bounded over 100 steps."""
    largest = 2 * (world - 1) * 6 * 16 * 2  # an encoder and a decoder per peer, fp16 rows
    for out in spawn(workers.split_changes_worker, world, tmp_path):
        assert out["identity"]["max_error"] == 0.0
        assert 0 < out["int8"]["max_error"] < 0.05
        for codec in ("identity", "int8"):
            assert out[codec]["streams"] <= 2 * (world - 1)
            assert out[codec]["memory"] <= largest, out


def test_control_plane_over_gloo(tmp_path):
    """One control exchange per steady step; a fault one rank sees (NaN in its input, an
    exception in its caller's code reported with fail(), a changed shape) is an error on
    both ranks within seconds, at a 30 s timeout, and new_session() recovers; patterns that
    aborted the process are Python errors."""
    results = spawn(workers.control_plane_worker, 2, tmp_path)
    for rank, out in enumerate(results):
        clean = out["faults"]["none"]
        assert clean["outcome"][0] is None and clean["recovered"]
        assert clean["exchanges"] == [3, 1, 1, 1]  # 2 handshakes + the step's, then 1
        for fault in ("nan", "user", "shape"):
            kind, message, seconds = out["faults"][fault]["outcome"]
            assert kind is not None and seconds < 5.0, (rank, fault, kind, seconds)
            assert out["faults"][fault]["recovered"], (rank, fault)
        if rank == 0:  # the peer of the faulty rank names it and the cause
            for fault, cause in (("nan", "NonFiniteError"), ("user", "boom")):
                kind, message, _ = out["faults"][fault]["outcome"]
                assert kind == "PeerFailedError" and "rank 1 failed" in message
                assert cause in message
        assert out["faults"]["shape"]["outcome"][0] == "WireFormatError"
        for pattern in ("one_handshake", "skipped_step_at_cap"):
            kind, _, seconds = out[pattern]
            assert kind is not None and seconds < 10.0, (rank, pattern, kind)


def test_a_timeout_is_recovered_on_fresh_connections(tmp_path):
    for rank, out in enumerate(spawn(workers.rebuild_worker, 2, tmp_path)):
        assert out["timed_out"][0] is not None, rank  # a Python error, not an abort
        assert out["rebuild_s"] < 10.0
        assert out["after"] < 0.05 and out["world_ok"], out
