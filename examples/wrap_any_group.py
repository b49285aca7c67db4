"""Make plain torch.distributed code send less: wrap its process group.

The loop below is ordinary ``torch.distributed`` code: every "denoising step" each rank
all-gathers a float16 activation and passes a float32 activation once around the ring with
send/recv. Both activations drift slowly from step to step, as a diffusion transformer's
do. The same loop runs twice: on the default group (raw), then on the group returned by
``compressed_comm.wrap_process_group``, which sends residual-compressed payloads instead;
the only other change is ``pg.step()`` at the end of each step. Rank 0 prints the bytes
each rank sent in both runs, the ratio and the largest relative error against the raw run.

    torchrun --nproc_per_node 2 examples/wrap_any_group.py
    torchrun --nproc_per_node 4 examples/wrap_any_group.py --codec int4 --steps 28 --size 4096x3072

gloo on CPU, nccl when CUDA is available (one GPU per process).
"""

from __future__ import annotations

import argparse
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from compressed_comm import CompressionConfig, available_codecs, wrap_process_group


@dataclass(frozen=True)
class RankSummary:
    """One rank's numbers, gathered to rank 0 for the table."""

    rank: int
    raw_bytes: int
    wrapped_bytes: int
    max_rel_error: float


def parse_size(text: str) -> tuple[int, int]:
    """``"2048x512"`` -> (2048, 512); ``"1024"`` -> (1024, 1024)."""
    parts = text.lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be ROWSxCOLS, got {text!r}") from None
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"size must be ROWSxCOLS, got {text!r}")
    return dims[0], dims[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codec", default="binary",
                        help=f"compressed_comm codec spec (default binary; e.g. "
                             f"{', '.join(available_codecs())})")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--size", type=parse_size, default=(2048, 512),
                        help="activation shape ROWSxCOLS per rank (default 2048x512)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def activations(rank: int, step: int, shape: tuple[int, int],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (float16, float32) activations at ``step``: a fixed base plus a slow,
    smooth drift (a few percent of the base per step), identical in every run."""
    g = torch.Generator().manual_seed(1000 + rank)
    base = torch.randn(2, *shape, generator=g) * torch.rand(1, 1, shape[1], generator=g)
    direction = torch.randn(2, *shape, generator=g) * 0.3
    wobble = torch.randn(2, *shape, generator=g) * 0.02
    x = base + direction * (step / 10) + wobble * torch.sin(torch.tensor(step * 0.7))
    return x[0].to(device, torch.float16), x[1].to(device, torch.float32)


def logical_bytes(world: int, half: torch.Tensor, single: torch.Tensor) -> int:
    """Bytes one rank sends per step raw: its fp16 tensor to every peer (all_gather) and
    one fp32 block per ring hop."""
    return (world - 1) * (half.numel() * half.element_size()
                          + single.numel() * single.element_size())


def run_loop(group: dist.ProcessGroup | None, steps: int, shape: tuple[int, int],
             device: torch.device,
             step_end: Callable[[], None]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The user's code: all_gather + ring of send/recv, once per step. Returns, per step,
    every rank's fp16 activation (concatenated) and the fp32 blocks received around the
    ring, as float32 on the CPU."""
    rank, world = dist.get_rank(), dist.get_world_size()
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    results = []
    for step in range(steps):
        half, single = activations(rank, step, shape, device)

        outputs = [torch.empty_like(half) for _ in range(world)]
        dist.all_gather(outputs, half, group=group)

        received, block = [], single
        for _ in range(world - 1):  # pass blocks around the ring: rank-1's first
            incoming = torch.empty_like(block)
            ops = [dist.P2POp(dist.isend, block, nxt, group=group),
                   dist.P2POp(dist.irecv, incoming, prv, group=group)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            received.append(incoming)
            block = incoming

        results.append((torch.cat(outputs).float().cpu(),
                        torch.cat(received).cpu() if received else single.cpu()))
        step_end()
    return results


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm()
                 / want.double().norm().clamp_min(1e-30))



def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if world < 2:
            raise SystemExit("nothing to send with one process: run it with "
                             "torchrun --nproc_per_node 2 (or more)")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")

        # 1. the code as it is: the default group
        half, single = activations(rank, 0, args.size, device)
        raw = run_loop(None, args.steps, args.size, device, step_end=lambda: None)
        raw_bytes = args.steps * logical_bytes(world, half, single)

        # 2. the same code on a wrapped group (every rank calls wrap_process_group)
        pg = wrap_process_group(dist.group.WORLD, CompressionConfig(codec=args.codec))
        wrapped = run_loop(pg, args.steps, args.size, device, step_end=pg.step)
        wrapped_bytes = pg.compressed.bytes_sent

        err = max(rel_error(w, r) for wr, rr in zip(wrapped, raw) for w, r in zip(wr, rr))
        summaries: list[RankSummary | None] = [None] * world
        dist.all_gather_object(summaries, RankSummary(rank, raw_bytes, wrapped_bytes, err))
        if rank == 0:
            print_summary(args, world, "nccl" if cuda else "gloo",
                          [s for s in summaries if s is not None])
        dist.barrier()
    finally:
        dist.destroy_process_group()
        gc.collect()  # free cycles while the interpreter is whole (pytorch#190489)


def print_summary(args: argparse.Namespace, world: int, backend: str,
                  ranks: list[RankSummary]) -> None:
    rows, cols = args.size
    print(f"wrap_any_group: {world} ranks over {backend}, codec {args.codec}, {args.steps} steps; "
          f"per step each rank all-gathers a {rows}x{cols} float16 activation and passes a "
          f"{rows}x{cols} float32 one around the ring")
    print(f"{'rank':>4}  {'raw bytes sent':>16}  {'wrapped bytes sent':>18}  {'ratio':>7}  "
          f"{'max rel. error':>14}")
    for s in ranks:
        print(f"{s.rank:>4}  {s.raw_bytes:>16,}  {s.wrapped_bytes:>18,}  "
              f"{s.raw_bytes / s.wrapped_bytes:>6.2f}x  {s.max_rel_error:>14.2e}")
    raw = sum(s.raw_bytes for s in ranks)
    wrapped = sum(s.wrapped_bytes for s in ranks)
    print(f"ratio {raw / wrapped:.2f}x  (raw / wrapped bytes, all ranks, warm-up step included)")
    print(f"max relative error vs raw: {max(s.max_rel_error for s in ranks):.2e}")


if __name__ == "__main__":
    main()
