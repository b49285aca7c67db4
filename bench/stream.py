"""What a user's stream costs: Session encode and decode vs one ``copy_`` of the same tensor.

    python bench/stream.py [--shape 4096 3072] [--codecs binary,int2,int4,int8,lowrank:8]
                           [--dtypes float16,bfloat16,float32] [--threads 1,2] [--repeat 7]
                           [--device cpu|cuda] [--checksum]

For each codec, dtype and thread count it drives one closed-loop stream through the public
API with the default :class:`~compressed_comm.CompressionConfig` (residual order 1, NaN/Inf
check on): ``Session.encoder(...).encode(x)`` on the sender, ``Session.decoder(...).decode``
on the receiver, on an input that drifts a little every step. It prints the median
milliseconds of encode and decode (after the warmup keyframe and one more message), and
their sum as a multiple of ``dst.copy_(x)`` measured in the same run with the same threads
(on CUDA: a device-to-device copy; timings synchronise the device).
``--checksum`` adds a row per codec with ``CompressionConfig(checksum=True)`` (``+crc``):
the cost of the body CRC-32 on both sides.
The first run on a machine also compiles the numba kernels (``python -m compressed_comm
warmup`` does that ahead of time).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from compressed_comm import CompressionConfig, Session

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], object], repeat: int, device: torch.device) -> float:
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _drifting(shape: tuple[int, int], dtype: torch.dtype, steps: int,
              device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, generator=gen)
    return [(base + 0.02 * i * torch.randn(*shape, generator=gen)).to(device, dtype)
            for i in range(steps)]


def measure(codec: str, xs: list[torch.Tensor], repeat: int, checksum: bool = False
            ) -> tuple[float, float]:
    """Median encode and decode milliseconds of one stream over ``xs`` (past the keyframe)."""
    config = CompressionConfig(codec=codec, checksum=checksum)
    sender, receiver = Session(config, rank=0), Session(config, rank=1)
    enc = sender.encoder("kv", xs[0])
    dec = receiver.decoder("kv", 0, xs[0])
    for x in xs[:2]:  # the keyframe and one message compile and warm everything
        dec.decode(enc.encode(x))
    payloads: list[torch.Tensor] = []
    steps = iter(xs[2:])
    enc_ms = _median_ms(lambda: payloads.append(enc.encode(next(steps))), repeat, xs[0].device)
    received = iter(payloads)
    dec_ms = _median_ms(lambda: dec.decode(next(received)), repeat, xs[0].device)
    if not torch.equal(enc.reference, dec.reference):
        raise AssertionError(f"{codec}: sender and receiver references differ")
    return enc_ms, dec_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=2, default=(4096, 3072), metavar=("N", "C"),
                   help="the stream's tensor shape (default: 4096 3072)")
    p.add_argument("--codecs", default="binary,int2,int4,int8,lowrank:8",
                   help="codec specs, comma-separated (default: %(default)s)")
    p.add_argument("--dtypes", default="float16,bfloat16,float32",
                   help="tensor dtypes, comma-separated (default: %(default)s)")
    p.add_argument("--threads", default="1,2",
                   help="torch thread counts to measure with (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=7,
                   help="messages after the keyframe; the median is shown (default: 7)")
    p.add_argument("--device", default="cpu", help="torch device of the tensors")
    p.add_argument("--checksum", action="store_true", help="also measure with checksum=True")
    args = p.parse_args()
    shape = tuple(args.shape)
    device = torch.device(args.device)
    print(f"Session encode + decode of one ({shape[0]}, {shape[1]}) stream on {device}, default "
          f"config, median of {args.repeat}; x copy = (encode + decode) / copy_")
    head = (f"{'codec':<14} {'dtype':<9} {'thr':>3} {'encode ms':>10} {'decode ms':>10} "
            f"{'copy_ ms':>9} {'x copy':>7}")
    print(head)
    print("-" * len(head))
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for dname in args.dtypes.split(","):
            xs = _drifting(shape, _DTYPES[dname], args.repeat + 2, device)
            dst = torch.empty_like(xs[0])
            dst.copy_(xs[0])  # touch the pages once
            copy_ms = _median_ms(lambda: dst.copy_(xs[0]), 5 * args.repeat, device)
            for codec, crc in ((c, crc) for c in args.codecs.split(",")
                               for crc in ((False, True) if args.checksum else (False,))):
                enc_ms, dec_ms = measure(codec, xs, args.repeat, crc)
                label = codec + ("+crc" if crc else "")
                print(f"{label:<14} {dname:<9} {threads:>3} {enc_ms:>10.1f} {dec_ms:>10.1f} "
                      f"{copy_ms:>9.2f} {(enc_ms + dec_ms) / copy_ms:>6.1f}x", flush=True)


if __name__ == "__main__":
    main()
