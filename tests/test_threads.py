"""The caller's threads stay the caller's: no call of the library changes torch's thread
count or OpenMP's settings (nor the environment, atexit or signal handlers), and numba
kernels run on the threads the caller gave torch.

Each case runs in a fresh interpreter (numba's thread pool is launched once per process),
in the environment torchrun gives (``OMP_NUM_THREADS=1``): one process calling every codec,
streams, ``enable_compression`` and ``disable``; four virtual ranks as threads (the
simulator); four gloo processes through the drop-in group.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = """
import ctypes, json, sys
import numba
import torch
CALLER = int(sys.argv[1])
if CALLER:
    torch.set_num_threads(CALLER)
omp = ctypes.CDLL(None)  # the OpenMP runtime torch (and numba's layer) resolve to
def settings():
    return [torch.get_num_threads(), omp.omp_get_max_active_levels(), omp.omp_get_dynamic()]
BEFORE = settings()
"""

ONE_PROCESS = PRELUDE + """
import atexit, os, signal
handlers = atexit._ncallbacks()
environment = dict(os.environ)
signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)}
from compressed_comm import CompressionConfig, Session, available_codecs, get_codec
from compressed_comm.kernels import numba_cpu
globals_kept = atexit._ncallbacks() == handlers

seen = []  # numba's thread count inside a kernel
original = numba_cpu._binary_rows
def spy(*args):
    seen.append(numba.get_num_threads())
    return original(*args)
numba_cpu._binary_rows = spy

changed = []
specs = [s.replace(":R", ":4").replace(":F", ":0.1") for s in available_codecs()]
for spec in specs:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        codec = get_codec(spec)
        x = torch.randn(32, 24).to(dtype)
        codec.decode(codec.encode(x))
        sender, receiver = Session(CompressionConfig(codec=spec), rank=0), Session(
            CompressionConfig(codec=spec), rank=1)
        for step in range(3):
            receiver.decoder("s", 0, x).decode(sender.encoder("s", x).encode(x * (1 + step)))
        if settings() != BEFORE:
            changed.append((spec, str(dtype), settings()))

from adapters.xdit import enable_compression
handle = enable_compression(torch.nn.Linear(4, 4), CompressionConfig(codec="binary"),
                            points=["torch_ring"])
handle.disable()
# torch's own import of torch._dynamo (torch.compiler.disable, the hook points' guard) sets
# TORCHINDUCTOR_CACHE_DIR: torch's side effect, in every process that compiles anyway
os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None) if "TORCHINDUCTOR_CACHE_DIR" not in environment else None
globals_kept &= dict(os.environ) == environment and signals == {
    s: signal.getsignal(s) for s in signals}
print(json.dumps({"before": BEFORE, "after": settings(), "changed": changed,
                  "globals_kept": globals_kept,
                  "kernel_threads": sorted(set(seen)), "pool": numba.config.NUMBA_NUM_THREADS,
                  "layer": numba.threading_layer()}))
"""

VIRTUAL_RANKS = PRELUDE + """
from compressed_comm import CompressedGroup, CompressionConfig
from compressed_comm.testing import run_ranks

def body(t):
    own = settings()
    g = CompressedGroup(t, CompressionConfig(codec="binary"), timeout=60.0)
    for step in range(4):
        g.all_gather(torch.randn(64, 48, dtype=torch.float16), stream="kv")
        g.all_to_all(torch.randn(64, 48, dtype=torch.bfloat16), stream="a2a")
        g.step()
    return own, settings()

per_rank = run_ranks(4, body)
print(json.dumps({"before": BEFORE, "after": settings(), "ranks": per_rank}))
"""

PROCESSES = PRELUDE + """
import os, tempfile
import torch.distributed as dist
import torch.multiprocessing as mp

def worker(rank, store, out):
    if CALLER:
        torch.set_num_threads(CALLER)
    before = settings()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=4)
    from compressed_comm import CompressionConfig, wrap_process_group
    pg = wrap_process_group(None, CompressionConfig(codec="binary"))
    outs = [torch.empty(64, 48, dtype=torch.float16) for _ in range(4)]
    for step in range(4):
        dist.all_gather(outs, torch.randn(64, 48, dtype=torch.float16), group=pg)
        pg.step()
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump([before, settings()], f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(os.path.join(d, "store"), d), nprocs=4)
        ranks = [json.load(open(os.path.join(d, f"{r}.json"))) for r in range(4)]
    print(json.dumps({"ranks": ranks}))
"""


def run(script: str, caller_threads: int, tmp_path) -> dict:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMP_", "NUMBA_", "MKL_", "COMPRESSED_COMM_"))}
    env |= {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "4", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, str(path), str(caller_threads)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# 0: the caller leaves torch as torchrun set it (OMP_NUM_THREADS=1); 3: it sets 3 threads
@pytest.mark.parametrize("caller", [0, 3])
def test_codecs_streams_and_enable_compression_keep_the_callers_threads(caller, tmp_path):
    out = run(ONE_PROCESS, caller, tmp_path)
    assert out["before"][0] == (caller or 1)
    assert out["changed"] == [] and out["after"] == out["before"], out
    assert out["globals_kept"]  # no atexit handler, environment variable or signal handler
    # numba's kernels ran on the threads the caller gave torch (its pool has 4)
    assert out["kernel_threads"] == [caller or 1], out


@pytest.mark.parametrize("caller", [0, 3])
def test_four_virtual_ranks_as_threads_keep_every_threads_settings(caller, tmp_path):
    out = run(VIRTUAL_RANKS, caller, tmp_path)
    assert out["after"] == out["before"], out
    for own, after in out["ranks"]:
        # a rank's thread count is its own; the OpenMP nesting level is process-wide, and a
        # rank that reads it while another launches numba's pool may see that launch's
        # momentary value (put back at once), so it is held to the process's before
        assert after[0] == own[0] and after == out["before"], out


def test_four_gloo_processes_keep_one_thread_each(tmp_path):
    out = run(PROCESSES, 0, tmp_path)
    for before, after in out["ranks"]:
        assert before[0] == 1 and after == before, out
