"""Worker processes for tests/test_compile.py: diffusers' context parallelism with its blocks
compiled (``fullgraph=True``), with and without compression bound by
``adapters.xdit.enable_compression``, against the same runs eager."""

import os
import time
from unittest import mock

import torch
from cc_diffusers_cp_workers import MODELS, _init, run_compressed, seeded
from cc_gloo_workers import exit_after_teardown


def compile_blocks(model, how, backend):
    """Compile ``model``'s repeated blocks with ``fullgraph=True``: through diffusers'
    ``compile_repeated_blocks`` (``how="regional"``) or ``block.compile`` per block."""
    if how == "regional":
        model.compile_repeated_blocks(fullgraph=True, backend=backend)
        return
    for module in model.modules():
        if type(module).__name__ in model._repeated_blocks:
            module.compile(fullgraph=True, backend=backend)


def first_block_inputs(model, forward, x):
    """The arguments the first repeated block is called with in ``forward(model, x)``."""
    block = next(m for m in model.modules() if type(m).__name__ in model._repeated_blocks)
    seen = []
    hook = block.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)),
                                           with_kwargs=True)
    try:
        forward(model, x)
    finally:
        hook.remove()
    return block, seen[0]


def _rel(got, want):
    return max(float((a - b).norm() / b.norm()) for a, b in zip(got, want))


def _graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def compile_worker(rank, world, init_file, out_dir, cases, backend):
    """For each case ``(name, model, ulysses, ring, asynchronous, how)``: eager CP outputs raw
    and with identity and binary compression; then the blocks compiled (``how``), run raw, with identity
    and with binary compression (enabled after compiling), with a second session, the graph
    breaks ``torch._dynamo.explain`` finds in a block, and after ``disable()``."""
    from diffusers import ContextParallelConfig

    from adapters.hooks.diffusers_cp import lse_attention_on_cpu
    from adapters.xdit import enable_compression
    from compressed_comm import CompressionConfig

    _init(rank, world, init_file)
    out = {}
    try:
        for name, model_name, ulysses, ring, asynchronous, how in cases:
            torch._dynamo.reset()
            model, forward, xs = seeded(MODELS[model_name])
            res = out[name] = {}

            def compressed(codec, model=model, forward=forward, xs=xs,
                           asynchronous=asynchronous):
                handle = enable_compression(model, CompressionConfig(codec=codec),
                                            asynchronous=asynchronous, timeout=60)
                got, sizes = run_compressed(handle, model, forward, xs)
                return handle, got, sizes

            with torch.no_grad(), lse_attention_on_cpu():
                with mock.patch.object(torch.accelerator, "device_count", return_value=1):
                    model.enable_parallelism(config=ContextParallelConfig(
                        ulysses_degree=ulysses, ring_degree=ring))
                cp = [forward(model, x) for x in xs]
                handle, eager_identity, _ = compressed("identity")
                handle.disable()
                handle, eager_binary, eager_sizes = compressed("binary")
                handle.disable()
                clock = time.perf_counter()

                compile_blocks(model, how, backend)
                start = time.perf_counter()
                raw = [forward(model, x) for x in xs]
                res["compile_s"] = time.perf_counter() - start
                res["raw_vs_eager"] = _rel(raw, cp)

                handle, got, sizes = compressed("identity")
                res["identity_exact"] = all(torch.equal(a, b) for a, b in zip(got, raw))
                res["identity_as_eager"] = all(torch.equal(a, b)
                                               for a, b in zip(got, eager_identity))
                res["identity_bytes"] = sizes
                handle.disable()

                handle, got, sizes = compressed("binary")
                res["binary_vs_eager_binary"] = _rel(got, eager_binary)
                res["binary_sizes"], res["eager_binary_sizes"] = sizes, eager_sizes
                res["binary_vs_raw"] = _rel(got, raw)
                graphs = _graphs()
                again, _ = run_compressed(handle, model, forward, xs)
                res["second_session_compiles"] = _graphs() - graphs
                res["second_session_equal"] = all(torch.equal(a, b) for a, b in zip(again, got))
                res["streams"] = sorted({str(s.key) for s in handle.stats().streams})
                block, (args, kwargs) = first_block_inputs(model, forward, xs[0])
                explained = torch._dynamo.explain(block.forward)(*args, **kwargs)
                res["explain_breaks"] = explained.graph_break_count
                res["explain_ops"] = sorted({str(n.target) for g in explained.graphs
                                             for n in g.graph.nodes
                                             if "compressed_comm" in str(n.target)})
                handle.disable()
                res["after_disable_exact"] = all(
                    torch.equal(forward(model, x), r) for x, r in zip(xs, raw))
                res["compiled_phase_s"] = time.perf_counter() - clock
    finally:
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    exit_after_teardown()


def _math_op(q, k, v, is_causal=False, **kwargs):
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)


def _ring_attention(x):
    """torch's context-parallel ring attention of ``x`` ``(1, heads, tokens, head dim)``."""
    import torch.distributed as dist
    from torch.distributed.tensor.experimental import _attention as cp

    return cp._templated_ring_attention(dist.group.WORLD, 2, _math_op, x, x * 0.5, x + 1)[0]


def _op_calls(key, x):
    """Every ``compressed_comm::`` op, yunchang's Ulysses all-to-all and torch's ring
    attention (their hook points bound to ``key``'s handle) on ``x``
    ``(1, tokens, heads, head dim)``, flat."""
    import yunchang.comm.all_to_all as ya

    from compressed_comm import ops

    y = (x * 2 + 1).flatten(0, 1)
    parts = (ops.all_to_all(y, key, "", "a2a"), ops.all_gather(y, key, "", "kv"),
             ops.all_gather(y, key, "", "kv", True), ops.ring_pass(y, key, "", "ring"),
             ya.all_to_all_4D(x, 2, 1, None), _ring_attention(x))
    return [p.flatten() for p in parts]


def ops_worker(rank, world, init_file, out_dir, backend):
    """:func:`_op_calls` eager and compiled (``fullgraph=True``, ``backend``), with the
    ``identity`` and ``binary`` codecs over drifting inputs (a step each), for both of
    torch's ring rotate methods, against the same collectives uncompressed (torch's ring:
    compiled); and the graph breaks ``torch._dynamo.explain`` finds."""
    import functools

    import torch.distributed as dist
    from torch.distributed.tensor.experimental import _attention as cp

    from adapters.xdit import enable_compression
    from compressed_comm import CompressionConfig

    _init(rank, world, init_file)
    cp._cp_options.enable_load_balance = False
    g = torch.Generator().manual_seed(7 + rank)
    base, drift = torch.randn(1, 16, 4, 32, generator=g), torch.randn(1, 16, 4, 32, generator=g)
    xs = [base + 0.02 * i * drift for i in range(4)]
    out = {}
    try:
        raw = []
        for x in xs:
            y = (x * 2 + 1).flatten(0, 1)
            a2a, gathered = torch.empty_like(y), [torch.empty_like(y) for _ in range(world)]
            dist.all_to_all_single(a2a, y)
            dist.all_gather(gathered, y)
            raw.append([a2a.flatten(), torch.cat(gathered).flatten()])
        out["raw"] = raw
        for method in ("allgather", "alltoall"):
            cp.set_rotate_method(method)
            torch._dynamo.reset()
            ring = torch.compile(_ring_attention, fullgraph=True, backend=backend)
            with torch.no_grad():
                out[f"{method}:raw"] = [ring(x).flatten() for x in xs]
            for codec in ("identity", "binary"):
                for how in ("eager", "compiled"):
                    torch._dynamo.reset()
                    handle = enable_compression(torch.nn.Linear(1, 1),
                                                CompressionConfig(codec=codec),
                                                points=["yunchang_ulysses", "torch_ring"],
                                                timeout=60)
                    fn = functools.partial(_op_calls, handle.key)
                    if how == "compiled":
                        fn = torch.compile(fn, fullgraph=True, backend=backend)
                    got, sizes = [], []
                    with torch.no_grad():
                        for x in xs:
                            before = handle.bytes_sent
                            got.append(fn(x))
                            sizes.append(handle.bytes_sent - before)
                            handle.step()
                        if how == "compiled":
                            explained = torch._dynamo.explain(
                                functools.partial(_op_calls, handle.key))(xs[0])
                            out[f"{method}:{codec}:breaks"] = explained.graph_break_count
                            out[f"{method}:{codec}:ops"] = sorted(
                                {str(n.target) for gm in explained.graphs
                                 for n in gm.graph.nodes if "compressed_comm" in str(n.target)})
                    out[f"{method}:{codec}:{how}"] = got
                    out[f"{method}:{codec}:{how}:bytes"] = sizes
                    handle.disable()
    finally:
        torch.save(out, os.path.join(out_dir, f"ops{rank}.pt"))
    exit_after_teardown()
