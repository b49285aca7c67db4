"""Compression inside torch.compile graphs: graph breaks, compile time and step time.

    PYTHONPATH=. python bench/compile.py [--world 2] [--steps 6] [--tokens 1024] [--heads 4]
        [--head-dim 64] [--backend inductor] [--codec binary] [--rate 1gbit] [--timeout 900]

Each of ``--world`` gloo processes holds the same random-weight diffusers Flux
(``simulator.workloads.flux_workload``: 2 double and 2 single blocks) under diffusers'
Ulysses context parallelism, and runs ``--steps`` forwards (drifting inputs) of each of:

* ``eager raw`` and ``eager <codec>`` (:func:`adapters.xdit.enable_compression`);
* ``compiled raw`` and ``compiled <codec>``: the repeated blocks compiled with
  ``compile_repeated_blocks(fullgraph=<breaks are 0>, backend=--backend)``.

It prints the graph breaks ``torch._dynamo.explain`` finds in one forward raw and with
compression (of the transformer as a whole, and summed over its blocks), the compile time
(the first compiled step less an eager one; cold, with a fresh inductor cache per run) and
the median seconds per step after the first of the slowest rank. With ``--rate`` the ranks
share one link of that rate (``bench/shaped_link.py``: a network namespace whose loopback is
shaped by tc; needs root). Run it against another checkout (``PYTHONPATH=<checkout>``) to
compare with its hook points: where they break graphs, the blocks are compiled without
``fullgraph``. """

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from shaped_link import end_rank, run_behind  # bench/ is this script's folder

TOOL = "compile.py"


def _steps(model: Any, forward: Any, xs: list[torch.Tensor], handle: Any = None
           ) -> list[float]:
    if handle is not None:
        handle.new_session()
    secs = []
    for i, x in enumerate(xs):
        dist.barrier()
        start = time.perf_counter()
        forward(model, x, torch.tensor([1.0 - i / len(xs)]))
        secs.append(time.perf_counter() - start)
    slowest: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(slowest, secs)
    return [max(s[i] for s in slowest) for i in range(len(xs))]


def _explain(fn: Any, *args: Any, **kwargs: Any) -> tuple[int, list[str]]:
    """Graph breaks ``torch._dynamo.explain`` finds in ``fn(*args, **kwargs)``, and where."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    torch._dynamo.reset()
    where = [f"{b.reason.splitlines()[0][:100]} ({b.user_stack[-1] if b.user_stack else ''})"
             for b in explained.break_reasons]
    return explained.graph_break_count, where


def _breaks(model: Any, forward: Any, x: torch.Tensor) -> tuple[int, int]:
    """Graph breaks in one forward: of the transformer as a whole, and summed over its
    repeated blocks (what ``compile_repeated_blocks`` compiles)."""
    t = torch.tensor([1.0])
    whole, reasons = _explain(lambda: forward(model, x, t))
    calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []
    blocks = [m for m in model.modules() if type(m).__name__ in model._repeated_blocks]
    hooks = [b.register_forward_pre_hook(lambda m, a, k: calls.append((m, a, k)),
                                         with_kwargs=True) for b in blocks]
    try:
        forward(model, x, t)
    finally:
        for h in hooks:
            h.remove()
    in_blocks = 0
    for block, args, kwargs in calls:
        n, why = _explain(block.forward, *args, **kwargs)
        in_blocks, reasons = in_blocks + n, reasons + why
    if dist.get_rank() == 0:
        for r in dict.fromkeys(reasons):
            print("  break:", r)
    return whole, in_blocks


def _worker(rank: int, args: argparse.Namespace, init: str) -> None:
    from diffusers import ContextParallelConfig

    from adapters.xdit import enable_compression
    from compressed_comm import CompressionConfig
    from simulator.workloads import flux_workload

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank,
                            world_size=args.world, timeout=datetime.timedelta(seconds=900))
    torch.set_num_threads(1)
    w = flux_workload(1, 0, tokens=args.tokens, heads=args.heads, head_dim=args.head_dim)
    model, forward = w.model.eval(), w.forward
    g = torch.Generator().manual_seed(3)
    xs = [w.noise + 0.02 * i * torch.randn(w.noise.shape, generator=g)
          for i in range(args.steps)]
    config = CompressionConfig(codec=args.codec)
    rows: list[tuple[str, str]] = []
    with torch.no_grad():
        with mock.patch.object(torch.accelerator, "device_count", return_value=1):
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=args.world))
        raw_breaks = _breaks(model, forward, xs[0])
        handle = enable_compression(model, config, timeout=600)
        codec_breaks = _breaks(model, forward, xs[0])
        for name, (whole, in_blocks) in (("raw", raw_breaks), (args.codec, codec_breaks)):
            rows.append((f"graph breaks per forward, {name}",
                         f"{whole} whole model, {in_blocks} in the blocks"))
        eager_codec = _steps(model, forward, xs, handle)
        handle.disable()
        eager_raw = _steps(model, forward, xs)
        full = codec_breaks[1] == raw_breaks[1] == 0
        model.compile_repeated_blocks(fullgraph=full, backend=args.backend)
        compiled_raw = _steps(model, forward, xs)
        handle = enable_compression(model, config, timeout=600)
        compiled_codec = _steps(model, forward, xs, handle)
        handle.disable()
    for name, secs, eager in (("eager raw", eager_raw, None),
                              (f"eager {args.codec}", eager_codec, None),
                              ("compiled raw", compiled_raw, eager_raw),
                              (f"compiled {args.codec}", compiled_codec, eager_codec)):
        step = statistics.median(secs[1:])
        compile_s = f", compile {secs[0] - statistics.median(eager[1:]):.1f} s" if eager else ""
        rows.append((name, f"{step * 1e3:.1f} ms/step{compile_s}"))
    if rank == 0:
        print(f"world {args.world}, {args.tokens} tokens, width {args.heads * args.head_dim}, "
              f"link {args.rate or 'loopback (uncapped)'}, backend {args.backend}, "
              f"fullgraph {full}", flush=True)
        for name, value in rows:
            print(f"  {name:<34} {value}", flush=True)
    dist.destroy_process_group()
    end_rank()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2, help="gloo processes (default: %(default)s)")
    p.add_argument("--steps", type=int, default=6, help="denoising steps (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=1024, help="image tokens (a square number)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
    p.add_argument("--head-dim", type=int, default=64,
                   help="width of one attention head (default: %(default)s)")
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend (default: %(default)s)")
    p.add_argument("--codec", default="binary",
                   help="codec spec of the compressed runs (default: %(default)s)")
    p.add_argument("--rate", help="cap the ranks' shared link at this tc rate (1gbit, 200mbit)")
    p.add_argument("--timeout", type=float, default=900.0, help="kill the run after (s)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        with tempfile.TemporaryDirectory() as d:
            # compile times are cold: a fresh inductor cache for every run
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(d, "inductor")
            mp.spawn(_worker, args=(args, os.path.join(d, "store")), nprocs=args.world)
        return
    run_behind(TOOL, sys.argv[1:], __file__, args.rate, None, args.timeout)


if __name__ == "__main__":
    main()
