"""CogVideoX with residual-compressed communication between GPUs (or a tiny CPU stand-in).

Real model, with xDiT (``pip install -e ".[xdit]"``; every option of xDiT's own
``examples/cogvideox_example.py`` is accepted and handed to ``xFuserArgs``)::

    torchrun --nproc_per_node 2 examples/cogvideox_example.py \\
        --model THUDM/CogVideoX-2b --ulysses_degree 2 --height 480 --width 720 \\
        --num_frames 49 --prompt "a panda playing guitar" --num_inference_steps 50 \\
        --enable_tiling --codec binary --out results
    # the same without compression, for comparison: add --no-compression

``enable_compression(pipe, config)`` is the only change to xDiT's example: it binds the
Ulysses all-to-all, the ring K/V hops and PipeFusion's patches to compressed streams. Each
rank prints what it sent; the last data-parallel group saves the frames to ``--out``.

Tiny mode, on CPU over gloo, no downloads: a small random-weight diffusers
``CogVideoXTransformer3DModel`` (3 latent frames of 16x16 tokens) denoised for a few DDIM
steps, split over the ranks by patch parallelism (``adapters.dit``, through the same
``enable_compression``), once with an exact raw K/V exchange and once compressed::

    torchrun --nproc_per_node 2 examples/cogvideox_example.py --tiny --out results
    torchrun --nproc_per_node 2 examples/cogvideox_example.py --tiny --parallelism ring --codec int2
    torchrun --nproc_per_node 2 examples/cogvideox_example.py --tiny --distrifusion

It prints the K/V bytes each rank sends per step in both runs, their ratio and the PSNR of
the compressed run's final latents against the raw run's, and writes one PNG per latent
frame, ``cogvideox_tiny_frame<i>.png`` (first three channels; raw left, compressed right).
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import TYPE_CHECKING

import common  # examples/common.py: this script's folder is on sys.path
import torch

from adapters.dit import ParallelConfig
from adapters.xdit import enable_compression
from compressed_comm import CompressionConfig
from simulator.workloads import Workload, make_workload

if TYPE_CHECKING:
    from diffusers import CogVideoXDDIMScheduler

# ---------------------------------------------------------------------- GPU mode: xDiT

def run_xdit(args: argparse.Namespace, xdit_argv: list[str]) -> None:
    """xDiT's CogVideoX example with ``enable_compression`` added."""
    xdit = common.start_xdit("xFuserCogVideoXPipeline", xdit_argv)  # initialises torch.distributed
    engine_args, input_config = xdit.engine_args, xdit.input_config

    pipe = common.load_pipeline(xdit)
    heads = pipe.transformer.config.num_attention_heads
    if heads % engine_args.ulysses_degree:
        raise ValueError(f"--ulysses_degree {engine_args.ulysses_degree} must divide the "
                         f"model's {heads} attention heads")
    if engine_args.enable_sequential_cpu_offload:
        pipe.enable_sequential_cpu_offload(gpu_id=xdit.local_rank)
    elif engine_args.enable_model_cpu_offload:
        pipe.enable_model_cpu_offload(gpu_id=xdit.local_rank)
    else:
        pipe = pipe.to(f"cuda:{xdit.local_rank}")
    if engine_args.enable_tiling:
        pipe.vae.enable_tiling()
    if engine_args.enable_slicing:
        pipe.vae.enable_slicing()

    # xDiT's CogVideoX example has no prepare_run warm-up: generation starts right away
    handle = (None if args.no_compression else
              enable_compression(pipe, CompressionConfig(codec=args.codec)))

    frames, elapsed = common.timed_on_gpu(lambda: pipe(
        **common.generation_kwargs(input_config),  # height, width, prompt, steps, generator
        num_frames=input_config.num_frames,
        guidance_scale=6,
    ).frames[0])
    rank = common.report_xdit(handle, args.codec, elapsed, input_config.num_inference_steps)

    if pipe.is_dp_last_group():
        folder = args.out / f"cogvideox_{common.output_tag(handle, args.codec)}_rank{rank}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames):  # PIL images (output_type "pil")
            frame.save(folder / f"frame{i:03d}.png")
        print(f"[rank {rank}] saved {len(frames)} frames to {folder}", flush=True)

    common.finish_xdit(handle)


# ---------------------------------------------------------------------- tiny mode: CPU

def tiny_scheduler() -> CogVideoXDDIMScheduler:
    """CogVideoX-2b's DDIM scheduler settings (v-prediction, zero terminal SNR)."""
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
        snr_shift_scale=3.0, timestep_spacing="trailing")


def tiny_generate(workload: Workload, steps: int, parallel: ParallelConfig,
                  codec: str) -> common.TinyRun:
    """Denoise the workload's noise with DDIM steps, its model split over the ranks as
    ``parallel`` says; compression and parallelism are removed afterwards."""
    scheduler = tiny_scheduler()

    def velocity(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return workload.forward(workload.model, scheduler.scale_model_input(latents, t),
                                (t / 1000).expand(len(latents)))

    return common.denoise(workload.model, scheduler,
                          workload.noise * scheduler.init_noise_sigma, steps, parallel, codec,
                          velocity)


def run_tiny(args: argparse.Namespace) -> None:
    with common.gloo_job() as rank:
        workload = make_workload("cogvideox", batch=1, seed=0)  # the same model on every rank
        result = common.compare_raw_compressed(args, partial(tiny_generate, workload))
        if rank == 0:
            frames = workload.noise.shape[1]
            common.print_summary(f"tiny CogVideoX (random weights, {frames} latent frames x "
                                 "16x16 tokens)", args, result)
            for i in range(frames):
                common.save_side_by_side(
                    [workload.to_images(run.latents[:, i:i + 1])[0]
                     for run in (result.raw, result.compressed)],
                    args.out / f"cogvideox_tiny_frame{i}.png")
            print(f"wrote {frames} frames to {args.out}/cogvideox_tiny_frame*.png "
                  f"(raw | {result.method})")


if __name__ == "__main__":
    common.main("CogVideoX", run_tiny, run_xdit)
