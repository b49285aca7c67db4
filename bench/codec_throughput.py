"""Encode/decode cost of each codec in a residual stream, side by side with a memory copy.

    python bench/codec_throughput.py [--shape 4096 3072] [--dtype float16] [--repeat 5]

For each codec: wire bytes per step, compression ratio, median encode and decode time of a
non-keyframe step (order-1 residual, closed loop), and those times relative to a plain
``copy_`` of the tensor (same run, same machine). The kernels in use are printed; pin them
with ``COMPRESSED_COMM_KERNELS``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from compressed_comm import CompressionConfig, StreamDecoder, StreamEncoder, get_codec
from compressed_comm.kernels import get_kernels

CODECS = ("identity", "fp8", "int8", "int4", "int2", "binary", "lowrank:8", "lowrankq:32",
          "topk:0.01")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def median_ms(fn, repeat: int) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def median_step_ms(setup, step, repeat: int) -> float:
    """Median wall time of ``step(state)`` where ``state = setup()`` is untimed."""
    times = []
    for _ in range(repeat + 1):
        state = setup()
        t0 = time.perf_counter()
        step(state)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=2, default=(4096, 3072))
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--codecs", default=",".join(CODECS))
    args = p.parse_args()
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(*args.shape, generator=gen).to(dtype)
    x1 = (x0.float() + 0.1 * torch.randn(*args.shape, generator=gen)).to(dtype)
    dst = torch.empty_like(x0)
    copy_ms = median_ms(lambda: dst.copy_(x0), args.repeat)
    print(f"shape {tuple(args.shape)} {args.dtype}, kernels={get_kernels(x0.device).name}, "
          f"torch threads={torch.get_num_threads()}")
    print(f"copy_ of {x0.nbytes:,} bytes: {copy_ms:.2f} ms")
    head = (f"{'codec':<12} {'wire bytes':>11} {'ratio':>7} {'encode ms':>10} {'x copy':>7} "
            f"{'decode ms':>10} {'x copy':>7}")
    print(head)
    print("-" * len(head))
    for spec in (c.strip() for c in args.codecs.split(",")):
        cfg = CompressionConfig(codec=spec, warmup_steps=1, track_error=False,
                                check_finite=False)
        sender = StreamEncoder("b", x0, cfg)
        keyframe, payload = sender.encode(x0), sender.encode(x1)

        def fresh_encoder() -> StreamEncoder:
            enc = StreamEncoder("b", x0, cfg)
            enc.encode(x0)  # warmup keyframe
            return enc

        def fresh_decoder() -> StreamDecoder:
            dec = StreamDecoder("b", x0, cfg)
            dec.decode(keyframe)
            return dec

        e_ms = median_step_ms(fresh_encoder, lambda enc: enc.encode(x1), args.repeat)
        d_ms = median_step_ms(fresh_decoder, lambda dec: dec.decode(payload), args.repeat)
        wire = get_codec(spec).payload_nbytes(x0.shape, dtype)
        print(f"{spec:<12} {wire:>11,} {x0.nbytes / wire:>6.1f}x {e_ms:>10.1f} "
              f"{e_ms / copy_ms:>6.1f}x {d_ms:>10.1f} {d_ms / copy_ms:>6.1f}x")


if __name__ == "__main__":
    main()
