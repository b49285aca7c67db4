"""Compressed vs raw collectives over real gloo, measured side by side in one run.

    python bench/collectives.py [--world 4] [--shape 4096 3072] [--codecs binary,int4] [--repeat 3]

Spawns ``world`` processes on this machine (gloo over loopback). Each rank holds a
(4096, 3072) float16 activation that drifts a little every step. For the plain
``torch.distributed`` all-gather and ring pass (raw) and for :class:`CompressedGroup` with each
codec, it reports the median wall time per call (encode + transfer + decode, residual order 1,
after the warmup keyframe), the time ratio raw / compressed, and the bytes each rank sends.
On loopback the link is fast and the torch reference kernels are slow, so this mostly
measures kernel cost; on a real network the byte ratio dominates.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compressed_comm import CompressedGroup, CompressionConfig, get_codec


def _median_s(fn, repeat: int) -> float:
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


def _worker(rank: int, world: int, init: str, shape: tuple[int, int], codecs: list[str],
            repeat: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    gen = torch.Generator().manual_seed(rank)
    base = torch.randn(*shape, generator=gen)
    drift = [(base + 0.02 * i * torch.randn(*shape, generator=gen)).half()
             for i in range(repeat + 1)]
    x = drift[0]
    rows = []
    raw_bytes = x.nbytes * (world - 1)

    def gather_raw() -> None:
        outs = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(outs, x)

    rows.append(("all_gather", "raw", _median_s(gather_raw, repeat), raw_bytes))
    rows.append(("ring", "raw", _median_s(lambda: _raw_ring(x), repeat), raw_bytes))
    for codec in codecs:
        for op in ("all_gather", "ring"):
            group = CompressedGroup(None, CompressionConfig(codec=codec, track_error=False),
                                    timeout=600)
            call = group.all_gather if op == "all_gather" else group.ring_pass
            call(drift[0], stream="kv")  # warmup keyframe
            steps = iter(drift[1:])
            seconds = _median_s(lambda: call(next(steps), stream="kv"), repeat)
            # both move world - 1 payloads per rank (gloo's all-gather is a ring too)
            payload = get_codec(codec).payload_nbytes(shape, torch.float16)
            rows.append((op, codec, seconds, payload * (world - 1)))
    if rank == 0:
        raw_time = {op: s for op, c, s, _ in rows if c == "raw"}
        print(f"{world} ranks, gloo over loopback, ({shape[0]}, {shape[1]}) float16 per rank, "
              f"median of {repeat} calls, torch threads 1 per rank")
        head = (f"{'op':<11} {'method':<8} {'ms/call':>9} {'speedup':>8} "
                f"{'bytes sent/rank':>16} {'byte ratio':>10}")
        print(head)
        print("-" * len(head))
        for op, codec, seconds, sent_bytes in rows:
            print(f"{op:<11} {codec:<8} {1e3 * seconds:>9.1f} {raw_time[op] / seconds:>7.2f}x "
                  f"{sent_bytes:>16,} {raw_bytes / sent_bytes:>9.1f}x")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--shape", type=int, nargs=2, default=(4096, 3072))
    p.add_argument("--codecs", default="binary,int4")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args.world, os.path.join(tmp, "store"), tuple(args.shape),
                                args.codecs.split(","), args.repeat), nprocs=args.world)


if __name__ == "__main__":
    main()
