"""``python -m compressed_comm warmup``: compile the kernels a deployment uses, ahead of time."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .warmup import DEFAULT_WARMUP_CODECS, warmup

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compressed_comm",
                                description="compressed_comm utilities")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("warmup", help="compile every kernel the given codecs and dtypes use "
                       "(numba on-disk cache, CUDA modules), so the first request pays nothing")
    w.add_argument("--codecs", default=",".join(DEFAULT_WARMUP_CODECS),
                   help="comma-separated codec specs (default: %(default)s)")
    w.add_argument("--dtypes", default="float16,bfloat16,float32",
                   help="comma-separated dtypes (default: %(default)s)")
    w.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    w.add_argument("--kernels", default=None, help="pin an implementation (torch, numba, cupy)")
    args = p.parse_args(argv)
    try:
        dtypes = [_DTYPES[d.strip()] for d in args.dtypes.split(",")]
    except KeyError as e:
        p.error(f"unknown dtype {e.args[0]!r}; expected some of {', '.join(_DTYPES)}")
    t0 = time.perf_counter()
    try:
        results = warmup(dtypes, [c.strip() for c in args.codecs.split(",")], args.device,
                         kernels=args.kernels)
    except ValueError as e:
        p.error(str(e))
    for r in results:
        print(f"{r.codec:<12} {str(r.dtype).removeprefix('torch.'):<9} {r.kernels:<6} "
              f"{r.seconds:6.2f} s")
    print(f"warm in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
