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
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import common  # examples/common.py: this script's folder is on sys.path
import torch

from adapters.dit import ParallelConfig
from adapters.xdit import enable_compression
from compressed_comm import CompressionConfig

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

@dataclass(frozen=True)
class TinyInputs:
    """Conditioning, rotary table and starting noise of the tiny model (same on every rank)."""

    noise: torch.Tensor                          # (B, frames, 4, 32, 32) latents
    text: torch.Tensor                           # (B, text tokens, text_embed_dim)
    rotary: tuple[torch.Tensor, torch.Tensor]    # cos, sin over all video tokens


def tiny_cogvideox(seed: int) -> torch.nn.Module:
    """A random-weight CogVideoXTransformer3DModel (2 layers, 4 heads of 16, 3-D RoPE).

    diffusers zero-initialises output projections and adaLN modulations, which makes a
    random model output zeros; PyTorch's default init on every linear/conv layer avoids that.
    """
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
        time_embed_dim=16, text_embed_dim=32, num_layers=2, sample_width=32, sample_height=32,
        sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8,
        use_rotary_positional_embeddings=True)
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            module.reset_parameters()
    return model.eval()


def tiny_inputs(seed: int, frames: int = 3, side: int = 32) -> TinyInputs:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    grid = side // 2  # patch size 2
    g = torch.Generator().manual_seed(seed)
    cos, sin = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (grid, grid)),
                                       grid_size=(grid, grid), temporal_size=frames)
    return TinyInputs(noise=torch.randn(1, frames, 4, side, side, generator=g),
                      text=torch.randn(1, 8, 32, generator=g), rotary=(cos, sin))


def tiny_scheduler() -> CogVideoXDDIMScheduler:
    """CogVideoX-2b's DDIM scheduler settings (v-prediction, zero terminal SNR)."""
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
        snr_shift_scale=3.0, timestep_spacing="trailing")


def tiny_generate(model: torch.nn.Module, inputs: TinyInputs, steps: int,
                  parallel: ParallelConfig, codec: str) -> common.TinyRun:
    """Denoise ``inputs.noise`` with DDIM steps, ``model`` split over the ranks as
    ``parallel`` says; compression and parallelism are removed afterwards."""
    scheduler = tiny_scheduler()

    def velocity(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(hidden_states=scheduler.scale_model_input(latents, t),
                     encoder_hidden_states=inputs.text, timestep=t.expand(1),
                     image_rotary_emb=inputs.rotary, return_dict=False)[0]

    return common.denoise(model, scheduler, inputs.noise * scheduler.init_noise_sigma, steps,
                          parallel, codec, velocity)


def run_tiny(args: argparse.Namespace) -> None:
    with common.gloo_job() as rank:
        model, inputs = tiny_cogvideox(seed=0), tiny_inputs(seed=0)
        result = common.compare_raw_compressed(args, partial(tiny_generate, model, inputs))
        if rank == 0:
            frames, _, height, width = inputs.noise.shape[1:]
            common.print_summary(f"tiny CogVideoX (random weights, {frames} latent frames x "
                                 f"{height // 2}x{width // 2} tokens)", args, result)
            for i in range(frames):
                common.save_side_by_side([result.raw.latents[0, i],
                                          result.compressed.latents[0, i]],
                                         args.out / f"cogvideox_tiny_frame{i}.png")
            print(f"wrote {frames} frames to {args.out}/cogvideox_tiny_frame*.png "
                  f"(raw | {result.method})")


if __name__ == "__main__":
    common.main("CogVideoX", run_tiny, run_xdit)
