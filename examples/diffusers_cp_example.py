"""diffusers' own context parallelism with residual-compressed communication.

diffusers (>= 0.36) splits a DiT over GPUs itself:
``pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` (or
``ring_degree=N``). One more call, ``adapters.xdit.enable_compression(pipe, config)``,
compresses what it sends: the Ulysses all-to-alls and the ring's K/V all-gather.

Real model on GPUs (needs the weights; not run on the CPU-only development machine)::

    torchrun --nproc_per_node 2 examples/diffusers_cp_example.py \\
        --model black-forest-labs/FLUX.1-dev --mode ulysses --codec binary --steps 28

Tiny mode, on CPU over gloo, no downloads: a small random-weight diffusers
``FluxTransformer2DModel`` denoised for a few steps under diffusers' CP, once uncompressed
and once compressed::

    torchrun --nproc_per_node 2 examples/diffusers_cp_example.py --tiny
    torchrun --nproc_per_node 2 examples/diffusers_cp_example.py --tiny --mode ring --asynchronous

Both print the bytes each rank sent per step through the compressed hook points (the
uncompressed run through the identity codec: the raw bytes plus headers), their ratio, and
the PSNR of the compressed run's output against the uncompressed one. On CPU, ring
attention needs the log-sum-exp, which none of diffusers' CP backends returns there; tiny
mode substitutes a small math attention op for it (``adapters.hooks.diffusers_cp``).
"""

from __future__ import annotations

import argparse
import gc
import os
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist

from adapters.xdit import enable_compression
from adapters.hooks.diffusers_cp import lse_attention_on_cpu
from compressed_comm import CompressionConfig
from simulator.metrics import range_psnr
from simulator.workloads import make_workload


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="random-weight model on CPU (gloo)")
    p.add_argument("--model", default="black-forest-labs/FLUX.1-dev")
    p.add_argument("--prompt", default="a lighthouse at dusk")
    p.add_argument("--mode", choices=("ulysses", "ring"), default="ulysses")
    p.add_argument("--codec", default="binary")
    p.add_argument("--steps", type=int, default=None, help="default: 28 (GPU), 8 (--tiny)")
    p.add_argument("--asynchronous", action="store_true",
                   help="ring only: DistriFusion-style stale K/V of the other ranks")
    return p.parse_args()


def parallel_config(mode: str, world: int) -> Any:
    from diffusers import ContextParallelConfig
    return ContextParallelConfig(**{f"{mode}_degree": world})


def compare(generate: Callable[[str], tuple[torch.Tensor, float]], args: argparse.Namespace,
            rank: int) -> None:
    """``generate(codec)`` uncompressed (identity) and compressed; rank 0 prints the table."""
    exact, raw_bytes = generate("identity")
    got, bytes_ = generate(args.codec)
    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, (raw_bytes, bytes_))
    if rank == 0:
        name = args.codec + (" + stale K/V" if args.asynchronous else "")
        print(f"diffusers CP ({args.mode}, {len(per_rank)} ranks), {args.steps} steps")
        print(f"{'rank':>4} {'uncompressed B/step':>20} {name + ' B/step':>24}")
        for r, (a, b) in enumerate(per_rank):
            print(f"{r:>4} {a:>20,.0f} {b:>24,.0f}")
        total = sum(a for a, _ in per_rank) / sum(b for _, b in per_rank)
        print(f"ratio {total:.2f}x  (uncompressed / compressed bytes per step, warm-up step "
              f"included)")
        print(f"PSNR {range_psnr(got, exact):.1f} dB  (compressed output vs uncompressed)")


# ---------------------------------------------------------------------- tiny mode: CPU

def run_tiny(args: argparse.Namespace) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        workload = make_workload("flux", batch=1, seed=0)  # the same model on every rank
        model = workload.model.eval()
        # diffusers divides the rank by the accelerator count, which is 0 on a CPU machine
        with mock.patch.object(torch.accelerator, "device_count", return_value=1):
            model.enable_parallelism(config=parallel_config(args.mode, world))
        lse = lse_attention_on_cpu() if args.mode == "ring" else nullcontext()

        def generate(codec: str) -> tuple[torch.Tensor, float]:
            scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
            handle = enable_compression(model, CompressionConfig(codec=codec),
                                        asynchronous=args.asynchronous)
            try:
                handle.new_session()
                scheduler.set_timesteps(args.steps)
                latents = workload.noise.clone()
                with torch.no_grad(), lse:
                    for t in scheduler.timesteps:
                        v = workload.forward(model, latents, (t / 1000).expand(len(latents)))
                        latents = scheduler.step(v, t, latents, return_dict=False)[0]
                return latents, handle.bytes_sent / args.steps
            finally:
                handle.disable()

        compare(generate, args, rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()
        gc.collect()  # free cycles while the interpreter is whole (pytorch#190489)


# ---------------------------------------------------------------------- GPU mode

def run_gpu(args: argparse.Namespace) -> None:
    from diffusers import DiffusionPipeline

    dist.init_process_group("nccl")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16)
        pipe = pipe.to(f"cuda:{local}")
        pipe.transformer.enable_parallelism(config=parallel_config(args.mode, world))

        def generate(codec: str) -> tuple[torch.Tensor, float]:
            handle = enable_compression(pipe, CompressionConfig(codec=codec),
                                        asynchronous=args.asynchronous)
            try:
                image = pipe(args.prompt, num_inference_steps=args.steps, output_type="pt",
                             generator=torch.Generator("cpu").manual_seed(0)).images
                return image.float().cpu(), handle.bytes_sent / args.steps
            finally:
                handle.disable()

        compare(generate, args, rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()
        gc.collect()  # free cycles while the interpreter is whole (pytorch#190489)


def main() -> None:
    args = parse_args()
    if args.asynchronous and args.mode != "ring":
        raise SystemExit("--asynchronous applies to --mode ring (stale K/V of the ring's "
                         "all-gather)")
    if args.steps is None:
        args.steps = 8 if args.tiny else 28
    (run_tiny if args.tiny else run_gpu)(args)


if __name__ == "__main__":
    main()
