"""FLUX with residual-compressed communication between GPUs (or a tiny CPU stand-in).

Real model, with xDiT (``pip install -e ".[xdit]"``; every option of xDiT's own
``examples/flux_example.py`` is accepted and handed to ``xFuserArgs``)::

    torchrun --nproc_per_node 2 examples/flux_example.py \\
        --model black-forest-labs/FLUX.1-dev --ulysses_degree 2 \\
        --prompt "a lighthouse at dusk" --num_inference_steps 28 --codec binary --out results
    # the same without compression, for comparison:
    torchrun --nproc_per_node 2 examples/flux_example.py \\
        --model black-forest-labs/FLUX.1-dev --ulysses_degree 2 \\
        --prompt "a lighthouse at dusk" --num_inference_steps 28 --no-compression

``enable_compression(pipe, config)`` is the only change to xDiT's example: it binds the
Ulysses all-to-all, the ring K/V hops and PipeFusion's patches to compressed streams. Each
rank prints what it sent; the last data-parallel group saves the images to ``--out``.

Tiny mode, on CPU over gloo, no downloads: a small random-weight diffusers
``FluxTransformer2DModel`` denoised for a few steps, split over the ranks by patch
parallelism (``adapters.dit``, through the same ``enable_compression``), once with an
exact raw K/V exchange and once compressed::

    torchrun --nproc_per_node 2 examples/flux_example.py --tiny --out results
    torchrun --nproc_per_node 2 examples/flux_example.py --tiny --parallelism ring --codec int2
    torchrun --nproc_per_node 2 examples/flux_example.py --tiny --distrifusion

It prints the K/V bytes each rank sends per step in both runs, their ratio and the PSNR of
the compressed run's final latents against the raw run's, and writes ``flux_tiny.png``
(first three latent channels; raw left, compressed right).
"""

from __future__ import annotations

import argparse
from functools import partial

import common  # examples/common.py: this script's folder is on sys.path
import torch

from adapters.dit import ParallelConfig
from adapters.xdit import enable_compression
from compressed_comm import CompressionConfig
from simulator.workloads import Workload, make_workload

# ---------------------------------------------------------------------- GPU mode: xDiT

def run_xdit(args: argparse.Namespace, xdit_argv: list[str]) -> None:
    """xDiT's FLUX example with ``enable_compression`` added."""
    xdit = common.start_xdit("xFuserFluxPipeline", xdit_argv)  # initialises torch.distributed
    xdit.engine_config.runtime_config.dtype = torch.bfloat16
    input_config = xdit.input_config

    pipe = common.load_pipeline(xdit)
    if xdit.engine_args.enable_sequential_cpu_offload:
        pipe.enable_sequential_cpu_offload(gpu_id=xdit.local_rank)
    else:
        pipe = pipe.to(f"cuda:{xdit.local_rank}")

    handle = (None if args.no_compression else
              enable_compression(pipe, CompressionConfig(codec=args.codec)))

    pipe.prepare_run(input_config, steps=1)  # warm-up generation (its own session)

    output, elapsed = common.timed_on_gpu(lambda: pipe(
        **common.generation_kwargs(input_config),  # height, width, prompt, steps, generator
        output_type=input_config.output_type,
        max_sequence_length=input_config.max_sequence_length,
        guidance_scale=input_config.guidance_scale,
    ))
    rank = common.report_xdit(handle, args.codec, elapsed, input_config.num_inference_steps)

    if input_config.output_type == "pil" and pipe.is_dp_last_group():
        args.out.mkdir(parents=True, exist_ok=True)
        tag = common.output_tag(handle, args.codec)
        for i, image in enumerate(output.images):
            path = args.out / f"flux_{tag}_rank{rank}_{i}.png"
            image.save(path)
            print(f"[rank {rank}] saved {path}", flush=True)

    common.finish_xdit(handle)


# ---------------------------------------------------------------------- tiny mode: CPU

def tiny_generate(workload: Workload, steps: int, parallel: ParallelConfig,
                  codec: str) -> common.TinyRun:
    """Denoise the workload's noise with FLUX's flow-matching Euler scheduler, its model
    split over the ranks as ``parallel`` says; compression and parallelism are removed
    afterwards."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    def velocity(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return workload.forward(workload.model, latents, (t / 1000).expand(len(latents)))

    return common.denoise(workload.model, FlowMatchEulerDiscreteScheduler(shift=3.0),
                          workload.noise, steps, parallel, codec, velocity)


def run_tiny(args: argparse.Namespace) -> None:
    with common.gloo_job() as rank:
        workload = make_workload("flux", batch=1, seed=0)  # the same model on every rank
        result = common.compare_raw_compressed(args, partial(tiny_generate, workload))
        if rank == 0:
            common.print_summary("tiny FLUX (random weights, 16x16 image tokens)", args,
                                 result)
            path = args.out / "flux_tiny.png"
            common.save_side_by_side([workload.to_images(result.raw.latents)[0],
                                      workload.to_images(result.compressed.latents)[0]], path)
            print(f"wrote {path} (raw | {result.method})")


if __name__ == "__main__":
    common.main("FLUX", run_tiny, run_xdit)
