"""Worker processes for the xDiT adapter tests over gloo (spawned by test_xdit.py).

Every check runs a real xDiT/yunchang/torch code path for a few steps of drifting
activations twice -- unpatched, then with ``enable_compression`` -- and records the
largest relative error against the unpatched result and the bytes per step of both.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist

from cc_gloo_workers import exit_after_teardown
from compressed_comm import CompressionConfig

STEPS = 5
CODECS = ("identity", "binary")


def _init(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def drifting(shape: tuple[int, ...], seed: int, steps: int = STEPS) -> list[torch.Tensor]:
    """A slowly changing activation: a base plus a small per-step drift."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base + 0.05 * t * torch.randn(shape, generator=g) for t in range(steps)]


def stepwise(step):
    """A run over STEPS steps of ``step(t)``: ``run(handle or None) -> (outputs, bytes per
    step sent through the handle)``, marking each step on the handle."""
    def run(handle=None):
        got, sizes = [], []
        for t in range(STEPS):
            before = handle.bytes_sent if handle is not None else 0
            got.append(step(t))
            if handle is not None:
                sizes.append(handle.bytes_sent - before)
                handle.step()
        return got, sizes
    return run


def compare(name: str, run, out: dict) -> list:
    """Run unpatched, then compressed per codec; record the max relative error vs the
    unpatched outputs and the last step's bytes. Returns the unpatched outputs."""
    from adapters.xdit import enable_compression

    raw, _ = run(None)
    for codec in CODECS:
        holder = torch.nn.Linear(1, 1)  # stands in for the transformer
        handle = enable_compression(holder, CompressionConfig(codec=codec),
                                    points=[name.split(":")[0]], timeout=60)
        try:
            got, step_bytes = run(handle)
        finally:
            handle.disable()
        errs = [_rel(g, r) for g, r in zip(got, raw)]
        out[f"{name}:{codec}"] = {
            "exact": all(torch.equal(g, r) for g, r in zip(got, raw)),
            "max_rel": max(errs), "first_exact": torch.equal(got[0], raw[0]),
            "last_bytes": step_bytes[-1], "streams": len(handle.stats().streams)}
    return raw


def check_ulysses(usp, rank: int, world: int, out: dict) -> None:
    """xfuser's ``_ft_c_input_all_to_all`` / ``_ft_c_output_all_to_all`` (via
    ``_sdpa_all_to_all_single``) on the world group as the Ulysses group."""
    usp.PROCESS_GROUP = SimpleNamespace(ULYSSES_PG=dist.group.WORLD, RING_PG=dist.group.WORLD)
    usp.get_ulysses_parallel_world_size = lambda: world
    xs = drifting((1, 4, 32, 64), seed=10 + rank)  # (b, heads, local tokens, head dim)

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        heads = usp._ft_c_input_all_to_all(x)  # (b, heads/W, all tokens, d)
        return torch.cat([heads.flatten(), usp._ft_c_output_all_to_all(heads).flatten()])

    out["ulysses:raw_bytes"] = 2 * xs[0].numel() * 4 * (world - 1) // world
    compare("ulysses", stepwise(lambda t: roundtrip(xs[t])), out)

    from adapters.xdit import enable_compression
    packed = xs[0].reshape(world, -1)  # the GQA path's 2-D packing: sent as it is
    want = usp._sdpa_all_to_all_single(packed)
    handle = enable_compression(torch.nn.Linear(1, 1), points=["ulysses"])
    try:
        got = usp._sdpa_all_to_all_single(packed)
        out["ulysses:packed"] = {"exact": torch.equal(got, want), "bytes": handle.bytes_sent}
    finally:
        handle.disable()


def _math_op(q, k, v, is_causal=False, **kwargs):
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)


def check_torch_ring(rank: int, world: int, out: dict) -> None:
    """torch's ``_templated_ring_attention`` with both rotate methods."""
    from torch.distributed.tensor.experimental import _attention as cp

    cp._cp_options.enable_load_balance = False  # as xDiT sets it
    qs = drifting((1, 2, 32, 64), seed=20 + rank)
    ks = drifting((1, 2, 32, 64), seed=30 + rank)
    vs = drifting((1, 2, 32, 64), seed=40 + rank)
    out["torch_ring:raw_bytes"] = 2 * ks[0].numel() * 4 * (world - 1)
    for method in ("allgather", "alltoall"):
        cp.set_rotate_method(method)

        def attend(t: int) -> torch.Tensor:
            with torch.no_grad():
                return cp._templated_ring_attention(dist.group.WORLD, 2, _math_op,
                                                    qs[t], ks[t], vs[t])[0]
        raw = compare(f"torch_ring:{method}", stepwise(attend), out)
        # the unpatched ring equals attention over all ranks' K/V
        k_all, v_all = torch.cat(_gather(ks[-1]), dim=2), torch.cat(_gather(vs[-1]), dim=2)
        out[f"torch_ring:{method}:vs_full"] = _rel(raw[-1], _math_op(qs[-1], k_all, v_all)[0])
    cp.set_rotate_method("allgather")


def _gather(x: torch.Tensor) -> list[torch.Tensor]:
    outs = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(outs, x)
    return outs


def _math_forward(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    """yunchang's ``pytorch_attn_forward`` contract ((b, s, h, d) in, lse (b, h, s)) in
    plain math: its flash op does not exist on CPU."""
    o, lse = _math_op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2), lse


def check_yunchang(rank: int, world: int, out: dict) -> None:
    """yunchang's ``LongContextAttention`` with its pytorch ring (RingComm hops)."""
    import yunchang.ring.ring_pytorch_attn as ring_pytorch
    from yunchang import LongContextAttention, set_seq_parallel_pg

    ring_pytorch.pytorch_attn_forward = _math_forward

    set_seq_parallel_pg(1, world, rank, world)
    attn = LongContextAttention(ring_impl_type="basic_pytorch")
    qs = drifting((1, 32, 2, 64), seed=50 + rank)  # (b, local tokens, heads, d)
    ks = drifting((1, 32, 2, 64), seed=60 + rank)
    vs = drifting((1, 32, 2, 64), seed=70 + rank)
    out["yunchang_ring:raw_bytes"] = 2 * ks[0].numel() * 4 * (world - 1)

    def attend(t: int) -> torch.Tensor:
        with torch.no_grad():
            return attn(qs[t], ks[t], vs[t])
    raw = compare("yunchang_ring", stepwise(attend), out)
    # the unpatched ring equals attention over all ranks' K/V
    k_all, v_all = torch.cat(_gather(ks[-1]), dim=1), torch.cat(_gather(vs[-1]), dim=1)
    out["yunchang_ring:vs_full"] = _rel(raw[-1], _math_forward(qs[-1], k_all, v_all)[0])


def check_yunchang_ulysses(rank: int, world: int, out: dict) -> None:
    """yunchang's ``LongContextAttention`` as pure Ulysses (SeqAllToAll4D)."""
    from yunchang import LongContextAttention, set_seq_parallel_pg

    set_seq_parallel_pg(world, 1, rank, world)
    attn = LongContextAttention(ring_impl_type="basic_pytorch")
    qs, ks, vs = (drifting((1, 32, 4, 64), seed=s + rank) for s in (110, 120, 130))
    out["yunchang_ulysses:raw_bytes"] = 4 * qs[0].numel() * 4 * (world - 1) // world

    def attend(t: int) -> torch.Tensor:
        with torch.no_grad():
            return attn(qs[t], ks[t], vs[t])
    raw = compare("yunchang_ulysses", stepwise(attend), out)
    # the unpatched Ulysses attention equals attention over all ranks' tokens
    q_all, k_all, v_all = (torch.cat(_gather(x[-1]), dim=1) for x in (qs, ks, vs))
    full = _math_forward(q_all, k_all, v_all)[0]
    out["yunchang_ulysses:vs_full"] = _rel(raw[-1], full.chunk(world, dim=1)[rank])


def check_pipefusion(gc, rank: int, world: int, out: dict) -> None:
    """``PipelineGroupCoordinator``: queued patch receives (isend / recv_next /
    get_pipeline_recv_data) forward, blocking send/recv back."""
    patches = [drifting((1, 64, 64), seed=80 + i) for i in range(2)]  # (b, tokens, c)
    back = drifting((1, 16, 64), seed=90)
    out["pipefusion:raw_bytes"] = sum(p[0].numel() * 4 for p in patches)

    def exchange(handle=None):
        coord = gc.PipelineGroupCoordinator([list(range(world))], rank, "gloo")
        coord.set_config(torch.float32)

        def step(t: int) -> torch.Tensor:
            if rank == 0:
                for i, p in enumerate(patches):
                    coord.pipeline_isend(p[t], segment_idx=i)
                return coord.pipeline_recv(0, name="back").clone()
            for i in range(len(patches)):
                coord.add_pipeline_recv_task(i)
                coord.recv_next()
            got = torch.cat([coord.get_pipeline_recv_data(i).clone()
                             for i in range(len(patches))], dim=1)
            coord.pipeline_send(back[t], name="back", segment_idx=0)
            return got
        return stepwise(step)(handle)  # a new coordinator per run: xDiT caches shapes

    raw = compare("pipefusion", exchange, out)
    expected = (back if rank == 0 else
                [torch.cat([p[t] for p in patches], dim=1) for t in range(STEPS)])
    out["pipefusion:raw_exact"] = all(torch.equal(a, b) for a, b in zip(raw, expected))


def check_model_hooks(usp, rank: int, world: int, out: dict) -> None:
    """Layer names from attention modules, steps from the scheduler's step(), sessions from
    ``scheduler.set_timesteps``, CFG rank in names, and torch.compile after enabling."""
    import xfuser.core.distributed as xdist
    from diffusers import FlowMatchEulerDiscreteScheduler

    from adapters.xdit import enable_compression

    class UlyssesAttention(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return usp._ft_c_output_all_to_all(usp._ft_c_input_all_to_all(x)) * 0.5 + x

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([UlyssesAttention(), UlyssesAttention()])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return x

    xs = drifting((1, 4, 16, 32), seed=100 + rank, steps=4)
    model = Model()
    raw = [model(x) for x in xs]
    cfg_size, cfg_rank = (xdist.get_classifier_free_guidance_world_size,
                          xdist.get_classifier_free_guidance_rank)
    xdist.get_classifier_free_guidance_world_size = lambda: 2
    xdist.get_classifier_free_guidance_rank = lambda: 1
    try:
        pipe = SimpleNamespace(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler())
        handle = enable_compression(pipe, CompressionConfig(codec="identity"), points=["ulysses"])
    finally:
        xdist.get_classifier_free_guidance_world_size = cfg_size
        xdist.get_classifier_free_guidance_rank = cfg_rank
    try:
        def denoise(model):  # as a pipeline does: the transformer, then the scheduler's step
            pipe.scheduler.set_timesteps(len(xs))
            got = []
            for x, t in zip(xs, pipe.scheduler.timesteps):
                got.append(model(x))
                pipe.scheduler.step(got[-1], t, x)
            return got

        for generation in range(2):
            got = denoise(model)
            stats = handle.stats()
            out[f"hooks:gen{generation}"] = {
                "exact": all(torch.equal(a, b) for a, b in zip(got, raw)),
                "names": sorted({s.name for s in stats.streams}),
                "steps": sorted({s.steps for s in stats.streams}),
                "handle_steps": handle.steps}
        compiled = torch.compile(model, backend="eager")
        got = denoise(compiled)
        out["hooks:compiled"] = {
            "exact": all(torch.equal(a, b) for a, b in zip(got, raw)),
            "streams": len(handle.stats().streams),
            "steps": sorted({s.steps for s in handle.stats().streams})}
    finally:
        handle.disable()


def xdit_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import xfuser_cpu

    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(int(os.environ.get("CC_HANG_S", "300")), exit=True)  # a hang fails the test, loudly
    _init(rank, world, init_file)
    usp = xfuser_cpu.import_xfuser()
    import xfuser.core.distributed.group_coordinator as gc

    out: dict = {}
    check_ulysses(usp, rank, world, out)
    check_torch_ring(rank, world, out)
    check_yunchang(rank, world, out)
    check_yunchang_ulysses(rank, world, out)
    check_pipefusion(gc, rank, world, out)
    check_model_hooks(usp, rank, world, out)
    with open(os.path.join(out_dir, f"xdit_{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    exit_after_teardown()
