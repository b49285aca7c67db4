"""Worker processes for tests/test_diffusers_tp.py: diffusers' own tensor parallelism
(``enable_parallelism(TensorParallelConfig(tp_degree=N))``) over gloo, with and without
DTensor's reductions compressed by ``adapters.xdit.enable_compression(...,
CompressionConfig(codec=...), reduce=True)`` (the ``dtensor_reduce`` hook point).

Two workarounds a CPU test needs (diffusers 0.42.1), both only around ``enable_parallelism``:
``torch.accelerator.device_count`` is patched to 1 (``_resolve_parallel_config`` computes
``rank % device_count()``, 0 on a CPU-only machine), and ``"cpu"`` is added to
``diffusers.hooks.tensor_parallel._SUPPORTED_TP_DEVICES``, the device gate of
``apply_tensor_parallel`` (``("cuda", "neuron", "tpu", "xpu")``: "Tensor parallelism is not
supported on device type 'cpu'"). Nothing else is patched: the mesh diffusers builds is a
gloo "cpu" mesh and torch's ``parallelize_module`` runs on it as it is.
Every model runs in float32 with diffusers' native attention backend.
"""

import contextlib
import os
from unittest import mock

import torch
from cc_diffusers_cp_workers import STEPS, _init, flux, run_compressed, seeded
from cc_gloo_workers import exit_after_teardown

CODECS = ("identity", "int8", "binary")


def _ids(side, axes):
    """Image position ids ``(side * side, axes)``: row and column in the last two axes."""
    ids = torch.zeros(side * side, axes)
    ids[:, -2] = torch.arange(side * side) // side
    ids[:, -1] = torch.arange(side * side) % side
    return ids


def flux2():
    from diffusers import Flux2Transformer2DModel
    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=32, timestep_guidance_channels=32,
        mlp_ratio=3.0, axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False)
    g = torch.Generator().manual_seed(1)
    side = 16
    fixed = {"encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
             "img_ids": _ids(side, 4), "txt_ids": torch.zeros(8, 4),
             "timestep": torch.tensor([0.5])}
    return model, (1, side * side, 16), lambda m, x: m(hidden_states=x, **fixed,
                                                         return_dict=False)[0]


MODELS = {"flux": flux, "flux2": flux2}


def tp_on_cpu():
    """The context in which diffusers 0.42.1's ``enable_parallelism`` accepts a CPU (gloo)
    tensor-parallel mesh: the two patches of this module's docstring."""
    from diffusers.hooks import tensor_parallel

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(torch.accelerator, "device_count", return_value=1))
    stack.enter_context(mock.patch.object(
        tensor_parallel, "_SUPPORTED_TP_DEVICES",
        tuple(tensor_parallel._SUPPORTED_TP_DEVICES) + ("cpu",)))
    return stack


class _CountingFuncol:
    """``placement_types.funcol`` that records the bytes of every all-reduce /
    reduce-scatter DTensor issues (what an uncompressed reduction moves per rank)."""

    def __init__(self, real, sizes):
        self._real, self._sizes = real, sizes

    def __getattr__(self, name):
        return getattr(self._real, name)

    def all_reduce(self, tensor, *args, **kwargs):
        self._sizes.append(("all_reduce", tuple(tensor.shape),
                            tensor.numel() * tensor.element_size()))
        return self._real.all_reduce(tensor, *args, **kwargs)

    def reduce_scatter_single(self, tensor, *args, **kwargs):
        self._sizes.append(("reduce_scatter", tuple(tensor.shape),
                            tensor.numel() * tensor.element_size()))
        return self._real.reduce_scatter_single(tensor, *args, **kwargs)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def tp_worker(rank, world, init_file, out_dir, names, codecs=CODECS):
    """For each model: single-process outputs, diffusers' TP outputs (and the reductions it
    issues), then TP with each codec compressing DTensor's reductions (bytes per step,
    outputs, streams) and after each disable()."""
    from diffusers import TensorParallelConfig
    from torch.distributed.tensor import placement_types

    from adapters.xdit import enable_compression
    from compressed_comm import CompressionConfig

    _init(rank, world, init_file)
    out = {}
    original = placement_types.funcol
    try:
        for name in names:
            model, forward, xs = seeded(MODELS[name])
            res = {}
            with torch.no_grad():
                single = [forward(model, x) for x in xs]
                with tp_on_cpu():
                    model.enable_parallelism(config=TensorParallelConfig(tp_degree=world))
                res["sharded"] = sum(
                    type(p).__name__ == "DTensor" for p in model.parameters())
                reductions = []
                with mock.patch.object(placement_types, "funcol",
                                       _CountingFuncol(original, reductions)):
                    tp = [forward(model, x) for x in xs]
                res["tp_vs_single"] = max(_rel(a, b) for a, b in zip(tp, single))
                res["reductions"] = reductions[:len(reductions) // STEPS]  # one step's
                res["raw_bytes"] = sum(n for *_, n in res["reductions"])
                for codec in codecs:
                    handle = enable_compression(model, CompressionConfig(codec=codec),
                                                reduce=True, timeout=60)
                    got, sizes = run_compressed(handle, model, forward, xs)
                    res[codec] = {
                        "points": handle.points,
                        "exact": all(torch.equal(a, b) for a, b in zip(got, tp)),
                        "rel": [_rel(a, b) for a, b in zip(got, tp)],
                        "bytes": sizes,
                        "streams": sorted({str(s.key) for s in handle.stats().streams}),
                        "last": got[-1],  # replicated: the same bits on every rank
                    }
                    handle.disable()
                    res[codec]["restored"] = placement_types.funcol is original
                    res[codec]["after_disable_exact"] = all(
                        torch.equal(forward(model, x), t) for x, t in zip(xs, tp))
            out[name] = res
    finally:
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    exit_after_teardown()
