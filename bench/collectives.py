"""Compressed vs raw collectives over real gloo, measured side by side in one run.

    python bench/collectives.py [--world 4] [--shape 4096 3072] [--dtype float16]
        [--codecs binary,int2,int4,lowrank:8] [--ops all_gather,ring,all_reduce] [--repeat 5]
        [--rate R] [--timeout 1800]
    python bench/collectives.py --rate 1gbit      # the ranks share a 1 Gbit/s link
    python bench/collectives.py --rate 100mbit    # ... a 100 Mbit/s link
    python bench/collectives.py --rate 10gbit     # ... a 10 Gbit/s link

Spawns ``world`` processes on this machine (gloo over loopback, one torch and one numba
thread each; all are killed after ``--timeout`` seconds). Each rank holds a (4096, 3072)
float16 activation that drifts a little every step. For the plain ``torch.distributed``
all-gather, a ``batch_isend_irecv`` ring pass and ``all_reduce`` (raw) and for
:class:`CompressedGroup` with each codec (default config, residual order 1, after the warmup
keyframe; ``all_reduce`` is a compressed reduce-scatter and all-gather), it reports the
median wall time per call of the slowest rank (encode + transfer + decode), the speedup
raw / compressed, and the bytes each rank sends per call.

Without ``--rate`` the link is plain loopback: fast, so this mostly measures kernel cost.
With ``--rate R`` (a ``tc`` rate) the ranks run in a fresh network namespace whose loopback
is shaped by a token bucket (``tc qdisc ... tbf rate R burst 256kb``). All ranks' traffic
shares that one bucket: it models one link of rate R for the whole group, not R per rank, so
while every rank sends at once each gets about R / world (and the 256 kB burst lets small
messages through unshaped). This needs root and iproute2 (``ip``, ``tc``); the namespace is
deleted afterwards.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from shaped_link import end_rank, run_behind  # bench/ is this script's folder

from compressed_comm import CompressedGroup, CompressionConfig

OP_TIMEOUT_S = 300  # gloo and CompressedGroup: no single collective waits longer than this
Row = tuple[str, str, float, int]  # op, method, seconds per call, bytes sent per rank per call


def _median_s(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _raw_ring(x: torch.Tensor) -> list[torch.Tensor]:
    world, rank = dist.get_world_size(), dist.get_rank()
    out, packet = [x], x
    for _ in range(world - 1):
        buf = torch.empty_like(x)
        ops = [dist.P2POp(dist.isend, packet, (rank + 1) % world),
               dist.P2POp(dist.irecv, buf, (rank - 1) % world)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        out.append(buf)
        packet = buf
    return out


def _time_compressed(op: str, codec: str, drift: list[torch.Tensor], repeat: int) -> Row:
    """Time ``CompressedGroup.all_gather`` or ``.ring_pass`` (default config) after warmup."""
    group = CompressedGroup(None, CompressionConfig(codec=codec), timeout=OP_TIMEOUT_S)
    call = {"all_gather": group.all_gather, "ring": group.ring_pass,
            "all_reduce": group.all_reduce}[op]
    call(drift[0], stream="kv")  # warmup keyframe (sent in full)
    steps, sent = iter(drift[1:]), group.bytes_sent
    seconds = _median_s(lambda: call(next(steps), stream="kv"), repeat)
    return op, codec, seconds, (group.bytes_sent - sent) // repeat


def _worker(rank: int, args: argparse.Namespace, init: str) -> None:
    torch.set_num_threads(1)
    world, shape, dtype = args.world, tuple(args.shape), getattr(torch, args.dtype)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=OP_TIMEOUT_S))
    gen = torch.Generator().manual_seed(rank)
    base = torch.randn(*shape, generator=gen)
    drift = [(base + 0.02 * i * torch.randn(*shape, generator=gen)).to(dtype)
             for i in range(args.repeat + 1)]
    x = drift[0]
    raw_bytes = x.nbytes * (world - 1)  # gloo's all-gather is a ring too: world - 1 blocks

    def gather_raw() -> None:
        dist.all_gather([torch.empty_like(x) for _ in range(world)], x)

    raw = {"all_gather": (gather_raw, raw_bytes), "ring": (lambda: _raw_ring(x), raw_bytes),
           # gloo's ring all-reduce: a reduce-scatter and an all-gather of world blocks
           "all_reduce": (lambda: dist.all_reduce(x.clone()),
                          2 * (world - 1) * x.nbytes // world)}
    rows: list[Row] = [(op, "raw", _median_s(raw[op][0], args.repeat), raw[op][1])
                       for op in args.ops]
    rows += [_time_compressed(op, codec, drift, args.repeat)
             for codec in args.codecs.split(",") for op in args.ops]
    slowest = torch.tensor([seconds for _, _, seconds, _ in rows], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if rank == 0:
        _print_table([(op, m, s, b) for (op, m, _, b), s in zip(rows, slowest.tolist())], args)
    dist.barrier()
    dist.destroy_process_group()
    end_rank()


def _print_table(rows: list[Row], args: argparse.Namespace) -> None:
    link = f"loopback shaped to {args.rate} (tbf)" if args.rate else "loopback (no --rate)"
    print(f"{args.world} ranks, gloo over {link}, "
          f"({args.shape[0]}, {args.shape[1]}) {args.dtype} per rank, median of {args.repeat} "
          "calls (slowest rank), 1 thread per rank")
    head = (f"{'op':<11} {'method':<10} {'ms/call':>9} {'speedup':>8} "
            f"{'bytes sent/rank':>16} {'byte ratio':>10}")
    print(head + "\n" + "-" * len(head))
    raw = {op: (seconds, nbytes) for op, method, seconds, nbytes in rows if method == "raw"}
    for op, method, seconds, nbytes in rows:
        print(f"{op:<11} {method:<10} {1e3 * seconds:>9.1f} {raw[op][0] / seconds:>7.2f}x "
              f"{nbytes:>16,} {raw[op][1] / nbytes:>9.1f}x", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4, help="gloo processes (default: 4)")
    p.add_argument("--shape", type=int, nargs=2, default=(4096, 3072), metavar=("N", "C"),
                   help="each rank's tensor (default: 4096 3072)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="tensor dtype (default: float16)")
    p.add_argument("--codecs", default="binary,int2,int4,lowrank:8",
                   help="codec specs beside raw (default: %(default)s)")
    p.add_argument("--ops", type=lambda t: t.split(","), default=["all_gather", "ring",
                                                                   "all_reduce"],
                   help="collectives to time (default: all_gather,ring,all_reduce)")
    p.add_argument("--repeat", type=int, default=5,
                   help="calls after the keyframe; the median is shown (default: 5)")
    p.add_argument("--rate", help="shape loopback to this tc rate (1gbit, 100mbit, 10gbit)")
    p.add_argument("--timeout", type=float, default=1800.0, help="kill the run after (s)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)  # run the ranks here
    args = p.parse_args()
    unknown = set(args.ops) - {"all_gather", "ring", "all_reduce"}
    if unknown:
        p.error(f"unknown --ops {sorted(unknown)}; choose from all_gather, ring, all_reduce")
    if args.inner:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(args, os.path.join(tmp, "store")), nprocs=args.world)
        return
    run_behind("collectives.py", sys.argv[1:], __file__, args.rate, None, args.timeout)


if __name__ == "__main__":
    main()
