"""bench/e2e.py, smoke-sized: 2 processes over plain loopback, every parallelism once."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_e2e_runs_every_parallelism_and_writes_json(tmp_path):
    out = tmp_path / "e2e.json"
    proc = subprocess.run(
        [sys.executable, "bench/e2e.py", "--world", "2", "--steps", "2", "--tokens", "16",
         "--heads", "2", "--head-dim", "16", "--codecs", "identity,binary+async",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    got = {(r["parallelism"], r["method"]) for r in rows}
    for p in ("patch", "ring", "ulysses", "cp-ulysses", "cp-ring"):
        assert {(p, "raw"), (p, "identity")} <= got
    assert ("patch", "distrifusion") in got and ("cp-ring", "binary+async") in got
    assert ("ring", "binary+async") not in got  # stale K/V: patch and cp-ring only
    for r in rows:
        if r["method"] == "identity":  # lossless: the raw result, bit for bit
            assert r["psnr_vs_raw"] == float("inf"), r
        if r["method"] != "single":
            assert r["seconds"] > 0 and r["speedup_vs_single"] > 0
    assert "patch" in proc.stdout and "bytes/step" in proc.stdout

