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
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from adapters.dit import PARALLELISMS, ParallelConfig
from adapters.xdit import enable_compression
from compressed_comm import CompressionConfig

# ---------------------------------------------------------------------- command line

def parse_args() -> tuple[argparse.Namespace, list[str]]:
    """This example's options, and the rest (xDiT's options, GPU mode only)."""
    parser = argparse.ArgumentParser(
        description="FLUX with compressed communication; options not listed here go to "
                    "xDiT's xFuserArgs (GPU mode)", allow_abbrev=False)
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
    """xDiT's FLUX example with ``enable_compression`` added."""
    try:
        from xfuser import xFuserArgs, xFuserFluxPipeline
        from xfuser.config import FlexibleArgumentParser
        from xfuser.core.distributed import get_runtime_state, get_world_group
    except Exception as e:  # not installed, or no GPU/triton (xfuser fails at import)
        raise SystemExit(f"the default mode runs xDiT on GPUs, but xfuser failed to import "
                         f"({type(e).__name__}: {e}); on a CPU, run with --tiny") from e

    parser = FlexibleArgumentParser(description="xFuser Arguments")
    engine_args = xFuserArgs.from_cli_args(xFuserArgs.add_cli_args(parser).parse_args(xdit_argv))
    engine_config, input_config = engine_args.create_config()  # initialises torch.distributed
    engine_config.runtime_config.dtype = torch.bfloat16
    local_rank = get_world_group().local_rank

    pipe = xFuserFluxPipeline.from_pretrained(
        pretrained_model_name_or_path=engine_config.model_config.model,
        engine_config=engine_config,
        torch_dtype=torch.bfloat16,
    )
    if engine_args.enable_sequential_cpu_offload:
        pipe.enable_sequential_cpu_offload(gpu_id=local_rank)
    else:
        pipe = pipe.to(f"cuda:{local_rank}")

    handle = (None if args.no_compression else
              enable_compression(pipe, CompressionConfig(codec=args.codec)))

    pipe.prepare_run(input_config, steps=1)  # warm-up generation (its own session)

    torch.cuda.synchronize()
    start = time.perf_counter()
    output = pipe(
        height=input_config.height,
        width=input_config.width,
        prompt=input_config.prompt,
        num_inference_steps=input_config.num_inference_steps,
        output_type=input_config.output_type,
        max_sequence_length=input_config.max_sequence_length,
        guidance_scale=input_config.guidance_scale,
        generator=torch.Generator(device="cuda").manual_seed(input_config.seed),
    )
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

    if input_config.output_type == "pil" and pipe.is_dp_last_group():
        args.out.mkdir(parents=True, exist_ok=True)
        tag = "raw" if handle is None else args.codec.replace(":", "-")
        for i, image in enumerate(output.images):
            path = args.out / f"flux_{tag}_rank{world.rank}_{i}.png"
            image.save(path)
            print(f"[rank {world.rank}] saved {path}", flush=True)

    if handle is not None:
        handle.disable()
    get_runtime_state().destroy_distributed_env()


# ---------------------------------------------------------------------- tiny mode: CPU

@dataclass(frozen=True)
class TinyInputs:
    """Conditioning and starting noise of the tiny model (the same on every rank)."""

    noise: torch.Tensor       # (B, tokens, 16): a 4x32x32 latent packed 2x2
    text: torch.Tensor        # (B, text tokens, joint_attention_dim)
    pooled: torch.Tensor      # (B, pooled_projection_dim)
    img_ids: torch.Tensor     # (tokens, 3)
    txt_ids: torch.Tensor     # (text tokens, 3)
    side: int                 # tokens per image side


@dataclass(frozen=True)
class TinyRun:
    """One generation's final latents and this rank's traffic."""

    latents: torch.Tensor
    bytes_per_step: float
    stream_ratio: float


def tiny_flux(seed: int) -> torch.nn.Module:
    """A random-weight FluxTransformer2DModel (2 double + 2 single blocks, 4 heads of 16).

    diffusers zero-initialises output projections and adaLN modulations, which makes a
    random model output zeros; PyTorch's default init on every linear layer avoids that.
    """
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6))
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    return model.eval()


def tiny_inputs(seed: int, side: int = 16, text_tokens: int = 8) -> TinyInputs:
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(side * side, 3)
    img_ids[:, 1] = torch.arange(side * side) // side
    img_ids[:, 2] = torch.arange(side * side) % side
    return TinyInputs(noise=torch.randn(1, side * side, 16, generator=g),
                      text=torch.randn(1, text_tokens, 32, generator=g),
                      pooled=torch.randn(1, 32, generator=g),
                      img_ids=img_ids, txt_ids=torch.zeros(text_tokens, 3), side=side)


def tiny_generate(model: torch.nn.Module, inputs: TinyInputs, steps: int,
                  parallel: ParallelConfig, codec: str) -> TinyRun:
    """Denoise ``inputs.noise`` with rectified-flow Euler steps, ``model`` split over the
    ranks as ``parallel`` says; compression and parallelism are removed afterwards."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = SimpleNamespace(transformer=model, scheduler=scheduler)
    handle = enable_compression(pipe, CompressionConfig(codec=codec), points=[], patch=parallel)
    try:
        scheduler.set_timesteps(steps)  # starts a new compression session
        latents = inputs.noise.clone()
        with torch.no_grad():
            for t in scheduler.timesteps:
                velocity = model(hidden_states=latents, timestep=(t / 1000).expand(1),
                                 encoder_hidden_states=inputs.text,
                                 pooled_projections=inputs.pooled, img_ids=inputs.img_ids,
                                 txt_ids=inputs.txt_ids, return_dict=False)[0]
                latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        return TinyRun(latents, handle.bytes_sent / steps, handle.stats().select("encoder").ratio)
    finally:
        handle.disable()


def psnr(got: torch.Tensor, want: torch.Tensor) -> float:
    """PSNR (dB) of ``got`` against ``want``, peak = the range of ``want``."""
    mse = float((got.double() - want.double()).pow(2).mean())
    peak = float(want.max() - want.min())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def unpack(latents: torch.Tensor, side: int) -> torch.Tensor:
    """(1, side*side, 16) packed tokens -> (4, 2*side, 2*side) latent image."""
    x = latents[0].view(side, side, 4, 2, 2).permute(2, 0, 3, 1, 4)
    return x.reshape(4, 2 * side, 2 * side)


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
        model, inputs = tiny_flux(seed=0), tiny_inputs(seed=0)
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
            method = args.codec + (" + DistriFusion" if args.distrifusion else "")
            print(f"tiny FLUX (random weights, {inputs.side}x{inputs.side} image tokens): "
                  f"{world} ranks, {args.parallelism} parallelism, {args.steps} steps, "
                  f"{elapsed:.1f} s")
            print_traffic([("raw", [r[0] for r in per_rank if r]),
                           (method, [r[1] for r in per_rank if r])])
            raw_total = sum(r[0] for r in per_rank if r)
            comp_total = sum(r[1] for r in per_rank if r)
            print(f"ratio {raw_total / comp_total:.2f}x  (raw / compressed K/V bytes per step, "
                  f"warm-up step included; per-stream ratio {compressed.stream_ratio:.1f}x)")
            print(f"PSNR {psnr(compressed.latents, raw.latents):.1f} dB  "
                  f"(compressed final latents vs raw)")
            path = args.out / "flux_tiny.png"
            save_side_by_side([unpack(raw.latents, inputs.side),
                               unpack(compressed.latents, inputs.side)], path)
            print(f"wrote {path} (raw | {method})")
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
