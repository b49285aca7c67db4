"""The simulator CLI (``python -m simulator``): JSON fields, files, bad input, what-if."""

import json

import pytest

from simulator.cli import main
from simulator.network import Link
from simulator.run import RunResult, check_memory, make_methods, step_seconds


def run_json(capsys, *args):
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_output_of_a_short_run(capsys, tmp_path):
    out = run_json(capsys, "--model", "sd3", "--ranks", "2", "--steps", "3", "--codecs",
                   "binary,int4+async", "--links", "pcie4,10gbe,1gbe", "--out", str(tmp_path))
    setup = out["setup"]
    for key in ("model", "ranks", "parallelism", "steps", "batch", "compute_ms_per_step",
                "keyframe_codec",
                "exact_parallel_vs_single_device_max_abs", "links"):
        assert key in setup
    assert setup["exact_parallel_vs_single_device_max_abs"] < 1e-4
    rows = {r["method"]: r for r in out["results"]}
    assert list(rows) == ["raw", "distrifusion", "binary", "int4+async"]
    for r in rows.values():
        assert set(r) == {"method", "bytes_per_step", "ratio", "psnr_db", "ssim", "rel_l2",
                          "step_ms", "exposed_comm_ms", "wall_s", "reference_bytes_rank0",
                          "codec_ms"}
        assert set(r["step_ms"]) == set(r["exposed_comm_ms"]) == {"pcie4", "10gbe", "1gbe"}
    raw = rows["raw"]
    assert raw["ratio"] == 1.0 and raw["psnr_db"] is None and raw["rel_l2"] == 0.0
    assert raw["reference_bytes_rank0"] is None  # raw exchanges keep no references
    assert rows["binary"]["reference_bytes_rank0"] > 0
    # codec kernel time, measured on this machine, is part of the estimated step
    assert raw["codec_ms"] == 0 and rows["binary"]["codec_ms"] > 0
    assert rows["binary"]["ratio"] > 2 and 0 < rows["binary"]["rel_l2"] < 0.05
    # on the slowest link, compression cuts the communication the step waits for; the step
    # also pays the codec kernels (measured here, on one CPU thread) and, per compressed
    # all-gather, a size handshake's latency (on these tiny messages that is most of 10gbe's)
    binary = rows["binary"]
    assert binary["exposed_comm_ms"]["1gbe"] < 0.8 * raw["exposed_comm_ms"]["1gbe"]
    assert binary["step_ms"]["1gbe"] - binary["codec_ms"] < raw["step_ms"]["1gbe"]
    # DistriFusion moves as many bytes as raw but hides them behind compute
    assert rows["distrifusion"]["bytes_per_step"] == raw["bytes_per_step"]
    assert rows["distrifusion"]["step_ms"]["10gbe"] < raw["step_ms"]["10gbe"]
    for name in ("images.png", "quality_vs_bytes.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text()) == out


def test_ring_and_ulysses_runs(capsys, tmp_path):
    for parallelism in ("ring", "ulysses"):
        out = run_json(capsys, "--model", "pixart", "--ranks", "2", "--steps", "2",
                       "--parallelism", parallelism, "--codecs", "int2", "--out", str(tmp_path))
        assert [r["method"] for r in out["results"]] == ["raw", "int2"]


@pytest.mark.parametrize("args, message", [
    (["--model", "sdxl"], "unknown model 'sdxl'; expected one of digits, sd3, flux"),
    (["--codecs", "int3"], "unknown codec 'int3'"),
    (["--links", "5g"], "5g"),
    (["--parallelism", "tensor"], "unknown parallelism 'tensor'; expected one of patch, ring"),
    (["--model", "sd3", "--parallelism", "ulysses", "--ranks", "3"], "head count (4)"),
    (["--model", "sd3", "--parallelism", "ring", "--codecs", "binary+async"], "+async needs patch"),
    (["--what-if", "sora"], "sora"),
    (["--keyframe-spread", "3"], "Keyframes.spread=3 needs Keyframes.period >= 3"),
    (["--what-if", "flux.1-dev", "--keyframe-period", "2", "--keyframe-spread", "3"],
     "needs Keyframes.period >= 3"),
    (["--parallelism", "diffusers-ulysses"], "need real process groups; the simulator's ranks "
                                              "are threads"),
])
def test_bad_input_exits_with_the_valid_choices(args, message, tmp_path):
    with pytest.raises(SystemExit) as err:
        main([*args, "--steps", "1", "--out", str(tmp_path)])
    assert message in str(err.value)


def test_memory_check_refuses_a_run_that_would_not_fit():
    check_memory(10, available=20)
    with pytest.raises(MemoryError, match="needs about .* GiB but only .* GiB are available"):
        check_memory(30 * 2**30, available=2**30)


def test_what_if_mode(capsys):
    out = run_json(capsys, "--what-if", "flux.1-dev", "--gpu", "l20", "--links", "pcie-host",
                   "--codecs", "binary,lowrank:8")
    text = json.dumps(out)
    assert "distrifusion" in text and "lowrank:8" in text


def test_what_if_takes_a_link_as_the_user_describes_it(capsys):
    assert main(["--what-if", "flux.1-dev", "--gpu", "l20", "--ranks", "4",
                 "--link", "800mbit,50us", "--codecs", "binary"]) == 0
    out = capsys.readouterr().out
    assert "over 800mbit,50us (0.1 GB/s, 50 us per message)" in out


def test_step_seconds_price_each_step_from_the_busiest_rank():
    """Synchronous: compute + messages x latency + bytes / bandwidth of the busiest rank;
    asynchronous after the warmup: the overlapped part hidden, the handshakes' latency not;
    ``after`` leaves the first steps out."""
    raw, _, fast = make_methods("patch", ["binary+async"])
    link = Link("test", "test", bandwidth=1000.0, latency=0.01)

    def result(method):  # 2 ranks, 3 steps; rank 1 sends most
        return RunResult(method, None, None, bytes_per_step=[[100, 50, 50], [200, 100, 100]],
                         messages_per_step=[[2, 4, 4], [2, 4, 4]], wall_seconds=0.0,
                         handshakes_per_step=[[0, 2, 2], [0, 2, 2]])
    compute = 0.5
    step0, later = 0.5 + 2 * 0.01 + 0.2, 0.5 + 4 * 0.01 + 0.1
    assert step_seconds(result(raw), compute, link)[0] == pytest.approx((step0 + 2 * later) / 3)
    assert step_seconds(result(raw), compute, link, after=1)[0] == pytest.approx(later)
    hidden = 0.5 + 2 * 0.01  # compute covers the rest; the two handshake hops stay exposed
    got, exposed = step_seconds(result(fast), compute, link, after=1)
    assert got == pytest.approx(hidden) and exposed == pytest.approx(0.02)
    with pytest.raises(ValueError, match="after"):
        step_seconds(result(raw), compute, link, after=3)


def test_spread_keyframes_run_on_virtual_ranks(capsys, tmp_path):
    """Keyframes every 3 steps, spread over 3: the steps after the warmup carry a slice each,
    so they send more than plain residuals but far less than whole keyframes."""
    common = ["--model", "sd3", "--ranks", "2", "--steps", "6", "--codecs", "int2", "--out",
              str(tmp_path)]
    plain = run_json(capsys, *common)
    spread = run_json(capsys, *common, "--keyframe-period", "3", "--keyframe-spread", "3")
    assert spread["setup"]["keyframe_spread"] == 3 and spread["setup"]["keyframe_period"] == 3
    rows = {r["method"]: r for r in spread["results"]}
    base = {r["method"]: r for r in plain["results"]}
    assert rows["raw"]["bytes_per_step"] == base["raw"]["bytes_per_step"]
    assert base["int2"]["bytes_per_step"] < rows["int2"]["bytes_per_step"]
    assert rows["int2"]["bytes_per_step"] < rows["raw"]["bytes_per_step"]
    assert 0 < rows["int2"]["rel_l2"] < 0.05
