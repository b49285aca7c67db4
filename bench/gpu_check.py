"""One-shot GPU check for a machine with a CUDA GPU, CuPy and nvcc: tests, then timings.

    python bench/gpu_check.py [--out DIR]

1. runs the kernel tests with the CuPy implementation enabled (tests/test_kernel_impls.py
   holds every available implementation to the torch reference; tests/test_cuda_kernels.py
   compiles the CUDA source with nvcc);
2. times each fused kernel against the torch reference on the same GPU and reports the
   achieved GB/s against a device-to-device copy of the same bytes (bench/kernel_speed.py);
3. runs short closed-loop streams on the GPU and checks that sender and receiver references
   stay bit-identical;
4. reports whether encode and decode synchronise with the host (``torch.cuda.
   set_sync_debug_mode("error")``, ``check_finite=False``; the NaN/Inf check and the header
   read on CUDA synchronise today, as documented);
5. prints the stream table of what users get (bench/stream.py on the GPU).
Everything printed is also written to DIR/gpu_check.txt (default: the current folder).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".", help="folder for the report files (default: .)")
    args = p.parse_args()
    steps = [
        [sys.executable, "-m", "pytest", "-q", "tests/test_kernel_impls.py",
         "tests/test_cuda_kernels.py", "-k", "cupy or cuda"],
        [sys.executable, "bench/kernel_speed.py", "--device", "cuda", "--impls", "torch,cupy",
         "--dtypes", "float16,bfloat16,float32", "--repeat", "20"],
        [sys.executable, "-c", STREAM_CHECK],
        [sys.executable, "-c", SYNC_CHECK],
        [sys.executable, "bench/stream.py", "--device", "cuda", "--threads", "1",
         "--repeat", "20"],
    ]
    log = []
    status = 0
    for cmd in steps:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        text = f"$ {' '.join(cmd[:4])} ...\n{done.stdout}{done.stderr}\n(exit {done.returncode})\n"
        print(text, flush=True)
        log.append(text)
        status = status or done.returncode
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.txt").write_text("\n".join(log))
    return status


STREAM_CHECK = """
import torch
from compressed_comm import CompressionConfig, StreamDecoder, StreamEncoder
from compressed_comm.kernels import get_kernels
print('kernels on cuda:', get_kernels('cuda').name)
for codec in ('binary', 'int2', 'int4', 'int8'):
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(4096, 3072, device='cuda').to(dtype)
        cfg = CompressionConfig(codec=codec, check_finite=False, track_error=False)
        enc, dec = StreamEncoder('kv', x, cfg), StreamDecoder('kv', x, cfg)
        for step in range(10):
            x = (x.float() + 0.05 * torch.randn_like(x.float())).to(dtype)
            dec.decode(enc.encode(x))
            assert torch.equal(enc.reference, dec.reference), (codec, dtype, step)
        err = float((enc.reference.float() - x.float()).norm() / x.float().norm())
        print(f'{codec:<7} {str(dtype):<15} 10 steps bit-identical, rel. error {err:.3e}')
"""
SYNC_CHECK = """
import torch
from compressed_comm import CompressionConfig, Session
for codec in ('binary', 'int2', 'int4', 'int8', 'lowrank:8'):
    x = torch.randn(4096, 3072, device='cuda').half()
    cfg = CompressionConfig(codec=codec, check_finite=False)
    enc = Session(cfg, rank=0).encoder('kv', x)
    dec = Session(cfg, rank=1).decoder('kv', 0, x)
    dec.decode(enc.encode(x))  # the keyframe
    payload = enc.encode(x)
    torch.cuda.synchronize()
    found = {}
    for what, call in (('decode', lambda: dec.decode(payload)), ('encode', lambda: enc.encode(x))):
        torch.cuda.set_sync_debug_mode('error')
        try:
            call()
            found[what] = 'no host sync'
        except RuntimeError as e:
            found[what] = 'host sync: ' + str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    print(f'{codec:<10} encode: {found["encode"]}; decode: {found["decode"]}')
"""

if __name__ == "__main__":
    raise SystemExit(main())
