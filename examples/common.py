"""What the FLUX and CogVideoX examples share: their options, xDiT's set-up and report in
GPU mode, and the raw-vs-compressed comparison of tiny mode.

The example scripts ``import common``: a script's own folder is the first entry of
``sys.path`` however and from wherever it is started (``python``, ``torchrun``).
The model-specific parts (the model, its inputs, xDiT's pipeline class, what is saved) stay
in the scripts.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from adapters.dit import PARALLELISMS, ParallelConfig
from adapters.xdit import XDiTCompression, enable_compression
from compressed_comm import CompressionConfig
from simulator.metrics import range_psnr

T = TypeVar("T")

# ---------------------------------------------------------------------- command line

def parse_args(model: str) -> tuple[argparse.Namespace, list[str]]:
    """The example's options for ``model`` (a name for the help text), and the rest
    (xDiT's options, GPU mode only)."""
    parser = argparse.ArgumentParser(
        description=f"{model} with compressed communication; options not listed here go to "
                    f"xDiT's xFuserArgs (GPU mode)", allow_abbrev=False)
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


def main(model: str, run_tiny: Callable[[argparse.Namespace], None],
         run_xdit: Callable[[argparse.Namespace, list[str]], None]) -> None:
    """Parse the options (``model`` names the model in the help) and run the example:
    ``run_tiny(args)`` with ``--tiny``, else ``run_xdit(args, xdit_argv)``."""
    args, xdit_argv = parse_args(model)
    if args.tiny:
        run_tiny(args)
    else:
        run_xdit(args, xdit_argv)


# ---------------------------------------------------------------------- GPU mode: xDiT

@dataclass(frozen=True)
class XDiTSetup:
    """xDiT's parsed options and configs, and the pipeline class the example loads."""

    pipeline_class: Any    # e.g. xfuser.xFuserFluxPipeline
    engine_args: Any       # xfuser.xFuserArgs
    engine_config: Any     # xfuser.config.EngineConfig
    input_config: Any      # xfuser.config.InputConfig
    local_rank: int


def start_xdit(pipeline: str, xdit_argv: list[str]) -> XDiTSetup:
    """Import xfuser and its ``pipeline`` class (on failure a ``SystemExit`` that points to
    ``--tiny``), parse ``xdit_argv`` with xDiT's own parser and initialise
    torch.distributed through ``create_config``, as xDiT's examples do."""
    try:
        import xfuser
        from xfuser import xFuserArgs
        from xfuser.config import FlexibleArgumentParser
        from xfuser.core.distributed import get_world_group

        pipeline_class = getattr(xfuser, pipeline)
    except Exception as e:  # not installed, or no GPU/triton (xfuser fails at import)
        raise SystemExit(f"the default mode runs xDiT on GPUs, but xfuser failed to import "
                         f"({type(e).__name__}: {e}); on a CPU, run with --tiny") from e

    parser = FlexibleArgumentParser(description="xFuser Arguments")
    engine_args = xFuserArgs.from_cli_args(xFuserArgs.add_cli_args(parser).parse_args(xdit_argv))
    engine_config, input_config = engine_args.create_config()  # initialises torch.distributed
    return XDiTSetup(pipeline_class, engine_args, engine_config, input_config,
                     get_world_group().local_rank)


def load_pipeline(xdit: XDiTSetup) -> Any:
    """The model named by xDiT's ``--model``, in bfloat16, still on the CPU."""
    return xdit.pipeline_class.from_pretrained(
        pretrained_model_name_or_path=xdit.engine_config.model_config.model,
        engine_config=xdit.engine_config,
        torch_dtype=torch.bfloat16,
    )


def generation_kwargs(input_config: Any) -> dict[str, Any]:
    """The pipeline arguments that xDiT's examples take alike from its input config: the
    size, prompt and step count, and a CUDA generator seeded with its seed."""
    return {
        "height": input_config.height,
        "width": input_config.width,
        "prompt": input_config.prompt,
        "num_inference_steps": input_config.num_inference_steps,
        "generator": torch.Generator(device="cuda").manual_seed(input_config.seed),
    }


def timed_on_gpu(generate: Callable[[], T]) -> tuple[T, float]:
    """``generate()`` and the seconds it took, the GPU synchronised before and after."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = generate()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


def report_xdit(handle: XDiTCompression | None, codec: str, elapsed: float, steps: int) -> int:
    """Print this rank's time and what it sent (``handle`` is None without compression);
    returns the rank."""
    from xfuser.core.distributed import get_world_group

    world = get_world_group()
    if handle is None:
        traffic = "compression off"
    else:
        sent = handle.stats().select("encoder")
        traffic = (f"codec {codec}: raw {sent.raw_bytes:,} B -> wire {sent.wire_bytes:,} B "
                   f"({sent.ratio:.1f}x), bytes sent {handle.bytes_sent:,}, "
                   f"hook points {', '.join(handle.points) or 'none'}")
    print(f"[rank {world.rank}/{world.world_size}] {elapsed:.2f} s for "
          f"{steps} steps; {traffic}", flush=True)
    return world.rank


def output_tag(handle: XDiTCompression | None, codec: str) -> str:
    """The name part of the saved outputs: ``raw`` without compression, else the codec."""
    return "raw" if handle is None else codec.replace(":", "-")


def finish_xdit(handle: XDiTCompression | None) -> None:
    """Remove the compression (if any) and tear down xDiT's distributed environment."""
    from xfuser.core.distributed import get_runtime_state

    if handle is not None:
        handle.disable()
    get_runtime_state().destroy_distributed_env()


# ---------------------------------------------------------------------- tiny mode: CPU

@dataclass(frozen=True)
class TinyRun:
    """One generation's final latents and this rank's traffic."""

    latents: torch.Tensor
    bytes_per_step: float
    stream_ratio: float


@dataclass(frozen=True)
class TinyComparison:
    """The raw and the compressed run of one tiny-mode job, and every rank's traffic."""

    raw: TinyRun
    compressed: TinyRun
    per_rank: tuple[tuple[float, float], ...]  # each rank's (raw, compressed) bytes per step
    elapsed: float                             # seconds for both runs on this rank
    method: str                                # the compressed run's name in the report


def denoise(model: torch.nn.Module, scheduler: Any, start: torch.Tensor, steps: int,
            parallel: ParallelConfig, codec: str,
            predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> TinyRun:
    """Run ``scheduler`` for ``steps`` steps from the latents ``start`` (left unchanged),
    ``predict(latents, t)`` giving the model's output, with ``model`` split over the ranks
    as ``parallel`` says; compression and parallelism are removed afterwards."""
    pipe = SimpleNamespace(transformer=model, scheduler=scheduler)
    handle = enable_compression(pipe, CompressionConfig(codec=codec), points=[], patch=parallel)
    try:
        scheduler.set_timesteps(steps)  # starts a new compression session
        latents = start.clone()
        with torch.no_grad():
            for t in scheduler.timesteps:
                latents = scheduler.step(predict(latents, t), t, latents, return_dict=False)[0]
        return TinyRun(latents, handle.bytes_sent / steps, handle.stats().select("encoder").ratio)
    finally:
        handle.disable()


@contextmanager
def gloo_job() -> Iterator[int]:
    """torch.distributed over gloo for the ranks ``torchrun`` started (at least two); yields
    this rank, meets at a barrier when the body succeeds, always tears the group down."""
    dist.init_process_group("gloo")
    try:
        if dist.get_world_size() < 2:
            raise SystemExit("nothing to send with one process: run it with "
                             "torchrun --nproc_per_node 2 (or more)")
        yield dist.get_rank()
        dist.barrier()
    finally:
        dist.destroy_process_group()
        gc.collect()  # free cycles while the interpreter is whole (pytorch#190489)


def compare_raw_compressed(
        args: argparse.Namespace,
        generate: Callable[[int, ParallelConfig, str], TinyRun]) -> TinyComparison:
    """``generate(steps, parallel, codec)`` once with an exact raw exchange and once
    compressed as ``args`` says, timed, and every rank's bytes per step gathered (a
    collective: call it on every rank)."""
    config = CompressionConfig(codec=args.codec)
    start = time.perf_counter()
    raw = generate(args.steps, ParallelConfig(args.parallelism, compression=None), args.codec)
    compressed = generate(args.steps,
                          ParallelConfig(args.parallelism, compression=config,
                                         asynchronous=args.distrifusion), args.codec)
    elapsed = time.perf_counter() - start
    per_rank: list[tuple[float, float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, (raw.bytes_per_step, compressed.bytes_per_step))
    method = args.codec + (" + DistriFusion" if args.distrifusion else "")
    return TinyComparison(raw, compressed, tuple(r for r in per_rank if r), elapsed, method)


def print_summary(title: str, args: argparse.Namespace, result: TinyComparison) -> None:
    """The tiny-mode report: ``title`` with the run's set-up and time, the traffic table,
    the byte ratio and the PSNR of the compressed final latents against the raw ones."""
    print(f"{title}: {len(result.per_rank)} ranks, {args.parallelism} parallelism, "
          f"{args.steps} steps, {result.elapsed:.1f} s")
    print_traffic([("raw", [r[0] for r in result.per_rank]),
                   (result.method, [r[1] for r in result.per_rank])])
    raw_total = sum(r[0] for r in result.per_rank)
    comp_total = sum(r[1] for r in result.per_rank)
    print(f"ratio {raw_total / comp_total:.2f}x  (raw / compressed K/V bytes per step, "
          f"warm-up step included; per-stream ratio {result.compressed.stream_ratio:.1f}x)")
    print(f"PSNR {range_psnr(result.compressed.latents, result.raw.latents):.1f} dB  "
          f"(compressed final latents vs raw)")


def print_traffic(rows: list[tuple[str, list[float]]]) -> None:
    """K/V wire bytes each rank sent per step, one row per run."""
    ranks = len(rows[0][1])
    print(f"{'run':<24}" + "".join(f"{f'rank {r} B/step':>16}" for r in range(ranks)))
    for name, values in rows:
        print(f"{name:<24}" + "".join(f"{v:>16,.0f}" for v in values))


def save_side_by_side(images: list[torch.Tensor], path: Path, scale: int = 8) -> None:
    """(H, W, 3) images in [0, 1] side by side, each pixel ``scale`` x ``scale``."""
    from PIL import Image

    pixels = (torch.cat(images, dim=1) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels, "RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST).save(path)
