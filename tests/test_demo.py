"""The codec demo (``python -m simulator.codec_demo``) and the ratios the project promises."""

import json
import subprocess
import sys

import pytest
import torch

from compressed_comm import CompressionConfig, get_codec
from compressed_comm.wire import pack_fingerprint
from simulator.codec_demo import DEFAULT_CODECS, DriftingActivation, main

#: the config fingerprint that ends a stream's first message
FIRST = pack_fingerprint(CompressionConfig().fingerprint()).numel()

RAW = 4096 * 3072 * 2  # (4096, 3072) float16


@pytest.mark.parametrize("spec, at_least", [("binary", 15.0), ("int2", 7.5), ("lowrank:8", 60.0)])
def test_promised_ratios_at_4096x3072_fp16_header_included(spec, at_least):
    assert RAW / get_codec(spec).payload_nbytes((4096, 3072), torch.float16) >= at_least


def test_drifting_activation_drifts_slowly():
    sig = DriftingActivation(256, 128, dtype=torch.float32, seed=1)
    xs = [next(sig) for _ in range(5)]
    for a, b in zip(xs, xs[1:]):
        cos = torch.nn.functional.cosine_similarity(a.view(-1), b.view(-1), dim=0)
        assert 0.9 < float(cos) < 0.99


def test_demo_json_reports_every_codec(capsys):
    steps, shape = 6, (64, 48)
    assert main(["--shape", *map(str, shape), "--steps", str(steps), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    raw = shape[0] * shape[1] * 2
    assert out["raw_bytes_per_step"] == raw
    rows = {r["codec"]: r for r in out["results"]}
    assert tuple(rows) == DEFAULT_CODECS
    for spec, r in rows.items():
        step = get_codec(spec).payload_nbytes(shape, torch.float16)
        # the first message also carries the config fingerprint
        keyframe = get_codec("identity").payload_nbytes(shape, torch.float16) + FIRST
        assert r["step_bytes"] == step
        assert r["step_ratio"] == pytest.approx(raw / step)
        # one warmup keyframe, then compressed steps
        assert r["run_ratio"] == pytest.approx(steps * raw / (keyframe + (steps - 1) * step))
    assert rows["identity"]["mean_rel_error"] == 0.0
    assert 0.0 < rows["int8"]["final_rel_error"] < rows["int4"]["final_rel_error"]
    assert rows["int4"]["final_rel_error"] < rows["int2"]["final_rel_error"] < 1.0


def test_cli_table_and_bad_codec():
    cmd = [sys.executable, "-m", "simulator.codec_demo", "--shape", "32", "24", "--steps", "3",
           "--codecs", "binary,int4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "binary" in done.stdout and "int4" in done.stdout and "ratio/step" in done.stdout
    bad = subprocess.run(cmd[:-1] + ["binary,int3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown codec 'int3'" in bad.stderr
