"""Worker processes for tests/test_diffusers_cp.py: diffusers' own context parallelism
(``enable_parallelism(ContextParallelConfig(ulysses_degree=N))``) over gloo, with and without
compression bound by ``adapters.xdit.enable_compression``.

Two workarounds a CPU test needs (diffusers 0.42.1): ``torch.accelerator.device_count`` is
patched to 1 around ``enable_parallelism`` (it divides the rank by it), and ring attention,
which needs the log-sum-exp that none of diffusers' CP backends returns on CPU, runs with
``adapters.hooks.diffusers_cp.lse_attention_on_cpu`` (a math op in place of the native one).
Every model runs in float32 with diffusers' native attention backend.
"""

import datetime
import os
from unittest import mock

import torch
import torch.distributed as dist
from cc_gloo_workers import exit_after_teardown

STEPS = 5


def _init(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))


def _inputs(gen, shape):
    return torch.randn(*shape, generator=gen)


def flux():
    from diffusers import FluxTransformer2DModel
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(8, 12, 12))
    g = torch.Generator().manual_seed(1)
    side = 16
    img_ids = torch.zeros(side * side, 3)
    img_ids[:, 1] = torch.arange(side * side) // side
    img_ids[:, 2] = torch.arange(side * side) % side
    fixed = dict(encoder_hidden_states=_inputs(g, (1, 8, 32)),
                 pooled_projections=_inputs(g, (1, 32)), img_ids=img_ids,
                 txt_ids=torch.zeros(8, 3), timestep=torch.tensor([0.5]))
    return model, (1, side * side, 16), lambda m, x: m(hidden_states=x, **fixed,
                                                         return_dict=False)[0]


def wan():
    from diffusers import WanTransformer3DModel
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
    g = torch.Generator().manual_seed(1)
    text = _inputs(g, (1, 6, 16))
    return model, (1, 4, 2, 16, 16), lambda m, x: m(
        hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=text,
        return_dict=False)[0]


def qwenimage():
    from diffusers import QwenImageTransformer2DModel
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=16, axes_dims_rope=(8, 12, 12))
    g = torch.Generator().manual_seed(1)
    text = _inputs(g, (1, 6, 16))
    mask = torch.ones(1, 6, dtype=torch.bool)
    return model, (1, 256, 16), lambda m, x: m(
        hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
        timestep=torch.tensor([0.5]), img_shapes=[(1, 16, 16)], return_dict=False)[0]


def ltxvideo():
    from diffusers import LTXVideoTransformer3DModel
    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=32,
        cross_attention_dim=128, num_layers=1, caption_channels=16)
    g = torch.Generator().manual_seed(1)
    text = _inputs(g, (1, 6, 16))
    # no text mask: diffusers 0.42.1's Ulysses cannot split one across heads
    return model, (1, 2 * 8 * 8, 8), lambda m, x: m(
        hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500]),
        encoder_attention_mask=None, num_frames=2, height=8, width=8, return_dict=False)[0]


MODELS = {"flux": flux, "wan": wan, "qwenimage": qwenimage, "ltxvideo": ltxvideo}


def _drifting(shape, steps):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(*shape, generator=g)
    return [base + 0.02 * t * torch.randn(*shape, generator=g) for t in range(steps)]


def seeded(build):
    """``build()``'s model (eval mode) and forward, with STEPS drifting inputs, seeded alike
    on every rank."""
    torch.manual_seed(0)
    model, shape, forward = build()
    return model.eval(), forward, _drifting(shape, STEPS)


def run_compressed(handle, model, forward, xs):
    """A new session, then ``forward(model, x)`` for each of ``xs``: the outputs and the bytes
    this rank sent through ``handle`` in each step."""
    handle.new_session()
    got, sizes = [], []
    for x in xs:
        before = handle.bytes_sent
        got.append(forward(model, x))
        sizes.append(handle.bytes_sent - before)
    return got, sizes


def cp_worker(rank, world, init_file, out_dir, names, degrees, asynchronous=False):
    """For each model: single-process outputs, diffusers' CP outputs (``degrees``: the
    ulysses and ring degrees), then CP with identity and binary compression (bytes per
    step, outputs) and after disable()."""
    from diffusers import ContextParallelConfig
    from diffusers.models import attention_dispatch

    from adapters.xdit import enable_compression
    from adapters.hooks.diffusers_cp import lse_attention_on_cpu
    from compressed_comm import CompressionConfig

    _init(rank, world, init_file)
    out = {}
    originals = (attention_dispatch._all_to_all_single, attention_dispatch.funcol)
    ulysses, ring = degrees
    lse_backend = lse_attention_on_cpu()
    try:
        for name in names:
            model, forward, xs = seeded(MODELS[name])
            with torch.no_grad(), lse_backend:
                single = [forward(model, x) for x in xs]
                with mock.patch.object(torch.accelerator, "device_count", return_value=1):
                    model.enable_parallelism(config=ContextParallelConfig(
                        ulysses_degree=ulysses, ring_degree=ring))
                cp = [forward(model, x) for x in xs]
                res = {"cp_vs_single": max(float((a - b).abs().max())
                                           for a, b in zip(cp, single))}
                for codec in ("identity", "binary"):
                    handle = enable_compression(model, CompressionConfig(codec=codec),
                                                asynchronous=asynchronous, timeout=60)
                    got, sizes = run_compressed(handle, model, forward, xs)
                    res[codec] = {
                        "points": handle.points,
                        "exact": all(torch.equal(a, b) for a, b in zip(got, cp)),
                        "first_exact": torch.equal(got[0], cp[0]),
                        "max_rel": max(float((a - b).norm() / b.norm()) for a, b in zip(got, cp)),
                        "bytes": sizes,
                        "streams": sorted({str(s.key) for s in handle.stats().streams}),
                    }
                    handle.disable()
                res["restored"] = (attention_dispatch._all_to_all_single,
                                   attention_dispatch.funcol) == originals
                res["after_disable_exact"] = all(
                    torch.equal(forward(model, x), c) for x, c in zip(xs, cp))
            out[name] = res
    finally:
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    exit_after_teardown()


class GuidedPipeline:
    """What a diffusers pipeline without batched guidance does: per step, the transformer on
    the conditional and on the unconditional text (two calls; a third, skip-layer-style call
    at the steps in ``extra``, none after ``stop`` steps), then one ``scheduler.step``."""

    def __init__(self, transformer, forward):
        from diffusers import FlowMatchEulerDiscreteScheduler
        self.transformer = transformer
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        self.forward = forward

    def __call__(self, latents, cond, uncond, steps, batched=False, guidance=5.0,
                 stop=None, extra=()):
        self.scheduler.set_timesteps(steps)
        for i, t in enumerate(self.scheduler.timesteps):
            ts = (t / 1000).reshape(1)
            if batched:
                c, u = self.forward(self.transformer, torch.cat([latents, latents]), ts,
                                    torch.cat([cond, uncond])).chunk(2)
            else:
                c = self.forward(self.transformer, latents, ts, cond)
                u = c if stop is not None and i >= stop else self.forward(
                    self.transformer, latents, ts, uncond)
                if i in extra:
                    c = 0.5 * (c + self.forward(self.transformer, latents, ts, 0.5 * cond))
            latents = self.scheduler.step(u + guidance * (c - u), t, latents,
                                          return_dict=False)[0]
        return latents


def cfg_worker(rank, world, init_file, out_dir):
    """Guidance as two transformer calls per step against batched guidance, through a
    pipeline's scheduler, under diffusers' Ulysses with binary compression; then steps whose
    number of calls varies."""
    from diffusers import ContextParallelConfig, FluxTransformer2DModel

    from adapters.xdit import enable_compression
    from compressed_comm import CompressionConfig

    _init(rank, world, init_file)
    out = {}
    try:
        torch.manual_seed(0)
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=32, num_attention_heads=4, joint_attention_dim=32,
            pooled_projection_dim=32, axes_dims_rope=(8, 12, 12)).eval()
        g = torch.Generator().manual_seed(1)
        side = 16
        img_ids = torch.zeros(side * side, 3)
        img_ids[:, 1] = torch.arange(side * side) // side
        img_ids[:, 2] = torch.arange(side * side) % side
        pooled = torch.randn(1, 32, generator=g)
        cond, uncond = torch.randn(1, 8, 32, generator=g), torch.zeros(1, 8, 32)
        noise = torch.randn(1, side * side, 16, generator=g)

        def forward(m, x, t, text):
            b = x.shape[0]
            return m(hidden_states=x, encoder_hidden_states=text,
                     pooled_projections=pooled.expand(b, -1), img_ids=img_ids,
                     txt_ids=torch.zeros(8, 3), timestep=t.expand(b), return_dict=False)[0]

        with mock.patch.object(torch.accelerator, "device_count", return_value=1):
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        pipe = GuidedPipeline(model, forward)
        steps = 6
        with torch.no_grad():
            exact = pipe(noise, cond, uncond, steps, batched=True)
            handle = enable_compression(pipe, CompressionConfig(codec="binary"), timeout=60)
            for batched in (True, False):
                got = pipe(noise, cond, uncond, steps, batched=batched)
                out["batched" if batched else "two calls"] = dict(
                    error=float((got - exact).norm() / exact.norm()),
                    streams=sorted({str(s.key) for s in handle.stats().streams}),
                    steps=handle.steps)
            got = pipe(noise, cond, uncond, steps, stop=3, extra=(1, 2))
            out["varying"] = dict(finite=bool(torch.isfinite(got).all()), steps=handle.steps,
                                  streams=sorted({str(s.key) for s in handle.stats().streams}))
            handle.disable()
    finally:
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    exit_after_teardown()
