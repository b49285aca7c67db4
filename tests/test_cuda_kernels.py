"""The CUDA kernels: compile without a GPU (nvcc), fall back cleanly, report compile errors."""

import shutil
import subprocess
import sys
import types

import pytest
import torch

from compressed_comm.kernels import cupy_gpu, get_kernels

KERNELS = [f"{name}_{s}" for s in ("f32", "f16", "bf16") for name in (
    "abs_sums", "col_min_max", "col_abs_max", "binary_pack", "binary_apply", "int2_levels",
    "int2_pack", "int2_apply", "minmax_pack",
    "minmax_apply", "absmax_pack", "absmax_apply")] + [
    "binary_scales_finish", "min_max_finish", "abs_max_finish"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_source_compiles_for_hopper(tmp_path):
    src = tmp_path / "residual_codecs.cu"
    src.write_text(cupy_gpu.source())
    cubin = tmp_path / "residual_codecs.cubin"
    done = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", *cupy_gpu.OPTIONS, "-o", str(cubin),
                           str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    blob = cubin.read_bytes()
    for name in KERNELS:  # every entry point the launcher calls exists, unmangled
        assert name.encode() in blob, name


def test_without_cupy_cuda_tensors_use_the_reference():
    if cupy_gpu.probe() is None:
        pytest.skip("CuPy and a GPU are present: the fallback does not apply")
    assert "CuPy" in cupy_gpu.probe() or "CUDA" in cupy_gpu.probe()
    assert get_kernels("cuda").name == "torch"


def test_compile_failure_names_the_source_and_quotes_the_compiler(monkeypatch):
    class CompileException(Exception):
        pass

    class RawModule:
        def __init__(self, code, options):
            self.code = code

        def compile(self):
            raise CompileException("residual_codecs.cu(12): error: identifier \"oops\" is undefined")

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(RawModule=RawModule))
    cupy_gpu._module.cache_clear()
    try:
        with pytest.raises(cupy_gpu.KernelCompileError,
                           match=r"residual_codecs.cu failed:\n.*\"oops\" is undefined"):
            cupy_gpu._kernel("binary_pack", torch.float32)
    finally:
        cupy_gpu._module.cache_clear()


def test_cupy_without_a_driver_is_reported(monkeypatch):
    class CUDARuntimeError(Exception):
        pass

    def no_driver():
        raise CUDARuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=no_driver)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reason = cupy_gpu.probe()
    assert reason.startswith("CuPy cannot reach the CUDA driver (CUDARuntimeError")


def test_a_pinned_implementation_that_cannot_run_logs_once(caplog):
    from compressed_comm import kernels
    kernels._fallback.cache_clear()
    with caplog.at_level("WARNING", logger="compressed_comm.kernels"):
        for _ in range(3):
            assert get_kernels("cpu", "cupy").name == "torch"
    lines = [r for r in caplog.records if "cupy kernels cannot run on cpu" in r.getMessage()]
    assert len(lines) == 1
