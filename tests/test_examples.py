"""The example scripts, run as users run them: ``torchrun --nproc_per_node 2`` on CPU (gloo).

Each test starts one 2-process job (a few seconds of work plus imports); the FLUX and
CogVideoX examples run their ``--tiny`` mode, which needs no download and no GPU.
"""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds per job


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: str, *args: str) -> str:
    """Run ``examples/<script>`` on 2 processes; its stdout (the job must succeed)."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                        os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           f"examples/{script}", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, (f"{' '.join(cmd)} exited with {proc.returncode}\n"
                                  f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}")
    return proc.stdout


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no match for {pattern!r} in:\n{text}"
    return float(match.group(1))


def _check_tiny_summary(out: str) -> None:
    assert _number(r"^ratio ([0-9.]+)x", out) > 1
    psnr = _number(r"^PSNR ([0-9.]+|inf) dB", out)
    assert math.isfinite(psnr) and psnr > 30, out  # lossy, yet close to the exact run


def test_wrap_any_group() -> None:
    out = _torchrun("wrap_any_group.py", "--steps", "6", "--size", "256x64")
    assert _number(r"^ratio ([0-9.]+)x", out) > 1
    assert _number(r"^max relative error vs raw: ([0-9.e+-]+)", out) < 0.5
    assert len(re.findall(r"^\s+[01]\s+[0-9,]+\s+[0-9,]+\s", out, re.MULTILINE)) == 2, out


def test_flux_example_tiny(tmp_path: Path) -> None:
    out = _torchrun("flux_example.py", "--tiny", "--out", str(tmp_path))
    _check_tiny_summary(out)
    assert (tmp_path / "flux_tiny.png").stat().st_size > 0


def test_cogvideox_example_tiny(tmp_path: Path) -> None:
    out = _torchrun("cogvideox_example.py", "--tiny", "--out", str(tmp_path))
    _check_tiny_summary(out)
    frames = sorted(tmp_path.glob("cogvideox_tiny_frame*.png"))
    assert len(frames) == 3 and all(f.stat().st_size > 0 for f in frames)


def test_diffusers_cp_example_tiny() -> None:
    out = _torchrun("diffusers_cp_example.py", "--tiny", "--mode", "ring", "--asynchronous",
                    "--steps", "4")
    assert "diffusers CP (ring, 2 ranks), 4 steps" in out
    _check_tiny_summary(out)
    assert len(re.findall(r"^\s+[01]\s+[0-9,]+\s+[0-9,]+$", out, re.MULTILINE)) == 2, out
