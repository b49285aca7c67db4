"""Fused kernels vs the torch reference vs a memory copy, measured side by side in one run.

    python bench/kernel_speed.py [--shape 4096 3072] [--dtypes float32,float16] [--impls torch,numba]

For each codec's kernels (binary, int2, int4, int8), called through the codec's
``encode_into``/``decode_into`` (no payload header, no stream: ``bench/stream.py`` measures
what users get), it times one closed-loop encode (residual against a prediction, scales,
quantise, pack, update the reference) and one decode (unpack, dequantise, add into the
reference) per implementation, and reports:

* ms per call and the speedup over the torch reference;
* achieved bandwidth: the bytes the operation must read and write (encode: x and the
  prediction in, payload and reference out; decode: payload and prediction in, reference
  out) divided by the time, and that as a fraction of ``copy_``'s bandwidth on the same
  machine (a copy of the tensor reads and writes 2x its size).

On a CUDA machine add ``--device cuda --impls torch,cupy``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from compressed_comm import get_codec
from compressed_comm.kernels import get_kernels

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CODECS = ("binary", "int2", "int4", "int8")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: torch.device, repeat: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def sections(codec: str, n: int, c: int, dtype: torch.dtype,
             device: torch.device) -> dict[str, torch.Tensor]:
    """The codec's body sections for an ``(n, c)`` tensor, as views into one buffer."""
    layout = get_codec(codec).layout(n, c, dtype)
    return layout.views(torch.zeros(layout.nbytes, dtype=torch.uint8, device=device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=2, default=(4096, 3072), metavar=("N", "C"),
                   help="tensor shape (default: 4096 3072)")
    p.add_argument("--dtypes", default="float32,float16",
                   help="tensor dtypes, comma-separated (default: %(default)s)")
    p.add_argument("--impls", default="torch,numba",
                   help="kernel implementations to time (torch, numba, cupy; default: %(default)s)")
    p.add_argument("--codecs", default=",".join(CODECS),
                   help="codec specs, comma-separated (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device of the tensors")
    p.add_argument("--repeat", type=int, default=5,
                   help="calls per kernel; the median is shown (default: 5)")
    args = p.parse_args()
    device = torch.device(args.device)
    n, c = args.shape
    impls = args.impls.split(",")
    print(f"shape ({n}, {c}) on {device}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeat}")
    head = (f"{'dtype':<9} {'codec':<7} {'op':<7} {'impl':<6} {'ms':>8} {'speedup':>8} "
            f"{'GB/s':>7} {'of copy':>8}")
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, c, generator=gen).to(dtype).to(device)
        pred = (x.float() + 0.1 * torch.randn(n, c, generator=gen).to(device)).to(dtype)
        dst = torch.empty_like(x)
        copy_ms = median_ms(lambda: dst.copy_(x), device, args.repeat)
        copy_bw = 2 * x.nbytes / copy_ms / 1e6
        print(f"\n{name}: copy_ of {x.nbytes:,} bytes {copy_ms:.2f} ms = {copy_bw:.1f} GB/s")
        print(head)
        print("-" * len(head))
        for codec in args.codecs.split(","):
            s = sections(codec, n, c, dtype, device)
            payload = sum(t.nbytes for t in s.values())
            moved = {"encode": 2 * x.nbytes + x.nbytes + payload,
                     "decode": payload + 2 * x.nbytes}
            base: dict[str, float] = {}
            for impl in impls:
                k = get_kernels(device, impl)
                if k.name != impl:
                    print(f"{name:<9} {codec:<7} {'-':<7} {impl:<6} not available here")
                    continue
                ref, out = pred.clone(), torch.empty_like(x)
                kernels = get_codec(codec, kernels=impl)
                ms = {"encode": median_ms(lambda: kernels.encode_into(x, pred, ref, s, None),
                                          device, args.repeat),
                      "decode": median_ms(lambda: kernels.decode_into(s, pred, out), device,
                                          args.repeat)}
                ms["enc+dec"] = ms["encode"] + ms["decode"]
                moved["enc+dec"] = moved["encode"] + moved["decode"]
                for op, t in ms.items():
                    base.setdefault(op, t)
                    bw = moved[op] / t / 1e6
                    print(f"{name:<9} {codec:<7} {op:<7} {impl:<6} {t:>8.2f} {base[op] / t:>7.1f}x "
                          f"{bw:>7.1f} {bw / copy_bw:>7.0%}")


if __name__ == "__main__":
    main()
