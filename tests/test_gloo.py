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


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_and_wrapper_over_gloo(world, tmp_path):
    mp.spawn(workers.collectives_worker, args=(world, str(tmp_path / "store"), str(tmp_path)),
             nprocs=world, join=True)
    for rank in range(world):
        summary = torch.load(tmp_path / f"rank{rank}.pt")
        exact, binary = summary["identity"], summary["binary"]
        expected = OPS | ({"dist.send/recv"} if rank == 1 else set())
        assert set(exact["max_errors"]) == set(binary["max_errors"]) == expected
        assert all(e == 0.0 for e in exact["max_errors"].values())
        assert all(0.0 < e < workers.BOUND["binary"] for e in binary["max_errors"].values())
        # binary payloads are smaller than identity ones on the same traffic
        assert binary["wrapper_ratio"] > exact["wrapper_ratio"]
        assert binary["group_ratio"] > exact["group_ratio"]


def test_dead_or_silent_peer_raises_within_the_timeout(tmp_path):
    mp.spawn(workers.dead_peer_worker, args=(2, str(tmp_path / "store"), str(tmp_path)),
             nprocs=2, join=True)
    (silent, dead) = torch.load(tmp_path / "rank0.pt")
    kind, message, seconds = silent
    assert kind == "CommTimeoutError" and seconds < 10
    assert "recv of stream 'never-sent' from rank 1" in message
    kind, message, seconds = dead
    assert kind in ("CommError", "CommTimeoutError") and seconds < 10
    assert "'after-death' from rank 1" in message
