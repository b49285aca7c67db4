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
from dataclasses import dataclass
from functools import partial

import common  # examples/common.py: this script's folder is on sys.path
import torch

from adapters.dit import ParallelConfig
from adapters.xdit import enable_compression
from compressed_comm import CompressionConfig

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

@dataclass(frozen=True)
class TinyInputs:
    """Conditioning and starting noise of the tiny model (the same on every rank)."""

    noise: torch.Tensor       # (B, tokens, 16): a 4x32x32 latent packed 2x2
    text: torch.Tensor        # (B, text tokens, joint_attention_dim)
    pooled: torch.Tensor      # (B, pooled_projection_dim)
    img_ids: torch.Tensor     # (tokens, 3)
    txt_ids: torch.Tensor     # (text tokens, 3)
    side: int                 # tokens per image side


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
                  parallel: ParallelConfig, codec: str) -> common.TinyRun:
    """Denoise ``inputs.noise`` with rectified-flow Euler steps, ``model`` split over the
    ranks as ``parallel`` says; compression and parallelism are removed afterwards."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    def velocity(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(hidden_states=latents, timestep=(t / 1000).expand(1),
                     encoder_hidden_states=inputs.text, pooled_projections=inputs.pooled,
                     img_ids=inputs.img_ids, txt_ids=inputs.txt_ids, return_dict=False)[0]

    return common.denoise(model, FlowMatchEulerDiscreteScheduler(shift=3.0), inputs.noise,
                          steps, parallel, codec, velocity)


def unpack(latents: torch.Tensor, side: int) -> torch.Tensor:
    """(1, side*side, 16) packed tokens -> (4, 2*side, 2*side) latent image."""
    x = latents[0].view(side, side, 4, 2, 2).permute(2, 0, 3, 1, 4)
    return x.reshape(4, 2 * side, 2 * side)


def run_tiny(args: argparse.Namespace) -> None:
    with common.gloo_job() as rank:
        model, inputs = tiny_flux(seed=0), tiny_inputs(seed=0)
        result = common.compare_raw_compressed(args, partial(tiny_generate, model, inputs))
        if rank == 0:
            common.print_summary(f"tiny FLUX (random weights, {inputs.side}x{inputs.side} "
                                 f"image tokens)", args, result)
            path = args.out / "flux_tiny.png"
            common.save_side_by_side([unpack(result.raw.latents, inputs.side),
                                      unpack(result.compressed.latents, inputs.side)], path)
            print(f"wrote {path} (raw | {result.method})")


if __name__ == "__main__":
    common.main("FLUX", run_tiny, run_xdit)
