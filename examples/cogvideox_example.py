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
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from adapters.dit import PARALLELISMS, ParallelConfig
from adapters.xdit import enable_compression
from compressed_comm import CompressionConfig

if TYPE_CHECKING:
    from diffusers import CogVideoXDDIMScheduler

# ---------------------------------------------------------------------- command line

def parse_args() -> tuple[argparse.Namespace, list[str]]:
    """This example's options, and the rest (xDiT's options, GPU mode only)."""
    parser = argparse.ArgumentParser(
        description="CogVideoX with compressed communication; options not listed here go "
                    "to xDiT's xFuserArgs (GPU mode)", allow_abbrev=False)
    parser.add_argument("--codec", default="binary",
                        help="compressed_comm codec spec (default binary)")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="output folder (default results)")
    parser.add_argument("--no-compression", action="store_true",
                        help="GPU mode: run xDiT unmodified (the baseline)")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU mode: tiny random-weight model, raw vs compressed")
    parser.add_argument("--parallelism", choices=PARALLELISMS, default="patch",
                        help="tiny mode: how the transformer is split (default patch)")
    parser.add_argument("--distrifusion", action="store_true",
                        help="tiny mode: DistriFusion-style one-step-stale K/V (patch only)")
    parser.add_argument("--steps", type=int, default=8,
                        help="tiny mode: denoising steps (default 8)")
    args, rest = parser.parse_known_args()
    CompressionConfig(codec=args.codec)  # fail early on a bad codec spec
    if args.tiny:
        if rest:
            parser.error(f"unrecognized arguments in --tiny mode: {' '.join(rest)}")
        if args.distrifusion and args.parallelism != "patch":
            parser.error("--distrifusion needs --parallelism patch")
        if args.steps < 2:
            parser.error("--steps must be at least 2")
    return args, rest


# ---------------------------------------------------------------------- GPU mode: xDiT

def run_xdit(args: argparse.Namespace, xdit_argv: list[str]) -> None:
    """xDiT's CogVideoX example with ``enable_compression`` added."""
    try:
        from xfuser import xFuserArgs, xFuserCogVideoXPipeline
        from xfuser.config import FlexibleArgumentParser
        from xfuser.core.distributed import get_runtime_state, get_world_group
    except Exception as e:  # not installed, or no GPU/triton (xfuser fails at import)
        raise SystemExit(f"the default mode runs xDiT on GPUs, but xfuser failed to import "
                         f"({type(e).__name__}: {e}); on a CPU, run with --tiny") from e

    parser = FlexibleArgumentParser(description="xFuser Arguments")
    engine_args = xFuserArgs.from_cli_args(xFuserArgs.add_cli_args(parser).parse_args(xdit_argv))
    engine_config, input_config = engine_args.create_config()  # initialises torch.distributed
    local_rank = get_world_group().local_rank

    pipe = xFuserCogVideoXPipeline.from_pretrained(
        pretrained_model_name_or_path=engine_config.model_config.model,
        engine_config=engine_config,
        torch_dtype=torch.bfloat16,
    )
    heads = pipe.transformer.config.num_attention_heads
    if heads % engine_args.ulysses_degree:
        raise ValueError(f"--ulysses_degree {engine_args.ulysses_degree} must divide the "
                         f"model's {heads} attention heads")
    if engine_args.enable_sequential_cpu_offload:
        pipe.enable_sequential_cpu_offload(gpu_id=local_rank)
    elif engine_args.enable_model_cpu_offload:
        pipe.enable_model_cpu_offload(gpu_id=local_rank)
    else:
        pipe = pipe.to(f"cuda:{local_rank}")
    if engine_args.enable_tiling:
        pipe.vae.enable_tiling()
    if engine_args.enable_slicing:
        pipe.vae.enable_slicing()

    # xDiT's CogVideoX example has no prepare_run warm-up: generation starts right away
    handle = (None if args.no_compression else
              enable_compression(pipe, CompressionConfig(codec=args.codec)))

    torch.cuda.synchronize()
    start = time.perf_counter()
    frames = pipe(
        height=input_config.height,
        width=input_config.width,
        num_frames=input_config.num_frames,
        prompt=input_config.prompt,
        num_inference_steps=input_config.num_inference_steps,
        generator=torch.Generator(device="cuda").manual_seed(input_config.seed),
        guidance_scale=6,
    ).frames[0]
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    world = get_world_group()
    if handle is None:
        traffic = "compression off"
    else:
        sent = handle.stats().select("encoder")
        traffic = (f"codec {args.codec}: raw {sent.raw_bytes:,} B -> wire {sent.wire_bytes:,} B "
                   f"({sent.ratio:.1f}x), bytes sent {handle.bytes_sent:,}, "
                   f"hook points {', '.join(handle.points) or 'none'}")
    print(f"[rank {world.rank}/{world.world_size}] {elapsed:.2f} s for "
          f"{input_config.num_inference_steps} steps; {traffic}", flush=True)

    if pipe.is_dp_last_group():
        tag = "raw" if handle is None else args.codec.replace(":", "-")
        folder = args.out / f"cogvideox_{tag}_rank{world.rank}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames):  # PIL images (output_type "pil")
            frame.save(folder / f"frame{i:03d}.png")
        print(f"[rank {world.rank}] saved {len(frames)} frames to {folder}", flush=True)

    if handle is not None:
        handle.disable()
    get_runtime_state().destroy_distributed_env()


# ---------------------------------------------------------------------- tiny mode: CPU

@dataclass(frozen=True)
class TinyInputs:
    """Conditioning, rotary table and starting noise of the tiny model (same on every rank)."""

    noise: torch.Tensor                          # (B, frames, 4, 32, 32) latents
    text: torch.Tensor                           # (B, text tokens, text_embed_dim)
    rotary: tuple[torch.Tensor, torch.Tensor]    # cos, sin over all video tokens


@dataclass(frozen=True)
class TinyRun:
    """One generation's final latents and this rank's traffic."""

    latents: torch.Tensor
    bytes_per_step: float
    stream_ratio: float


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
                  parallel: ParallelConfig, codec: str) -> TinyRun:
    """Denoise ``inputs.noise`` with DDIM steps, ``model`` split over the ranks as
    ``parallel`` says; compression and parallelism are removed afterwards."""
    scheduler = tiny_scheduler()
    pipe = SimpleNamespace(transformer=model, scheduler=scheduler)
    handle = enable_compression(pipe, CompressionConfig(codec=codec), points=[], patch=parallel)
    try:
        scheduler.set_timesteps(steps)  # starts a new compression session
        latents = inputs.noise * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                v = model(hidden_states=scheduler.scale_model_input(latents, t),
                          encoder_hidden_states=inputs.text, timestep=t.expand(1),
                          image_rotary_emb=inputs.rotary, return_dict=False)[0]
                latents = scheduler.step(v, t, latents, return_dict=False)[0]
        return TinyRun(latents, handle.bytes_sent / steps, handle.stats().select("encoder").ratio)
    finally:
        handle.disable()


def psnr(got: torch.Tensor, want: torch.Tensor) -> float:
    """PSNR (dB) of ``got`` against ``want``, peak = the range of ``want``."""
    mse = float((got.double() - want.double()).pow(2).mean())
    peak = float(want.max() - want.min())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def save_side_by_side(images: list[torch.Tensor], path: Path, scale: int = 8) -> None:
    """First three channels of each (C, H, W) image as RGB, scaled with the range of the
    first one, side by side, each pixel ``scale`` x ``scale``."""
    from PIL import Image

    lo, hi = images[0][:3].min(), images[0][:3].max()
    row = torch.cat([((x[:3] - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
                     for x in images], dim=2)
    pixels = (row.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels, "RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST).save(path)



def run_tiny(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if world < 2:
            raise SystemExit("nothing to send with one process: run it with "
                             "torchrun --nproc_per_node 2 (or more)")
        model, inputs = tiny_cogvideox(seed=0), tiny_inputs(seed=0)
        config = CompressionConfig(codec=args.codec)
        start = time.perf_counter()
        raw = tiny_generate(model, inputs, args.steps,
                            ParallelConfig(args.parallelism, compression=None), args.codec)
        compressed = tiny_generate(model, inputs, args.steps,
                                   ParallelConfig(args.parallelism, compression=config,
                                                  asynchronous=args.distrifusion), args.codec)
        elapsed = time.perf_counter() - start
        per_rank: list[tuple[float, float] | None] = [None] * world
        dist.all_gather_object(per_rank, (raw.bytes_per_step, compressed.bytes_per_step))
        if rank == 0:
            frames, _, height, width = inputs.noise.shape[1:]
            method = args.codec + (" + DistriFusion" if args.distrifusion else "")
            print(f"tiny CogVideoX (random weights, {frames} latent frames x "
                  f"{height // 2}x{width // 2} tokens): {world} ranks, {args.parallelism} "
                  f"parallelism, {args.steps} steps, {elapsed:.1f} s")
            print_traffic([("raw", [r[0] for r in per_rank if r]),
                           (method, [r[1] for r in per_rank if r])])
            raw_total = sum(r[0] for r in per_rank if r)
            comp_total = sum(r[1] for r in per_rank if r)
            print(f"ratio {raw_total / comp_total:.2f}x  (raw / compressed K/V bytes per step, "
                  f"warm-up step included; per-stream ratio {compressed.stream_ratio:.1f}x)")
            print(f"PSNR {psnr(compressed.latents, raw.latents):.1f} dB  "
                  f"(compressed final latents vs raw)")
            for i in range(frames):
                save_side_by_side([raw.latents[0, i], compressed.latents[0, i]],
                                  args.out / f"cogvideox_tiny_frame{i}.png")
            print(f"wrote {frames} frames to {args.out}/cogvideox_tiny_frame*.png "
                  f"(raw | {method})")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def print_traffic(rows: list[tuple[str, list[float]]]) -> None:
    """K/V wire bytes each rank sent per step, one row per run."""
    ranks = len(rows[0][1])
    print(f"{'run':<24}" + "".join(f"{f'rank {r} B/step':>16}" for r in range(ranks)))
    for name, values in rows:
        print(f"{name:<24}" + "".join(f"{v:>16,.0f}" for v in values))


def main() -> None:
    args, xdit_argv = parse_args()
    if args.tiny:
        run_tiny(args)
    else:
        run_xdit(args, xdit_argv)


if __name__ == "__main__":
    main()
