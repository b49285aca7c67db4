"""bench/e2e.py's --rate-schedule: the grammar (bench/shaped_link.py), the JSON round trip of
the link's rate, its schedule and the per-step rows (bench/results.py), and older files."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench(name):
    """A bench/ script's module (bench/ is no package: its scripts import each other by name)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


shaped_link = _bench("shaped_link")
results = _bench("results")


def test_schedule_parses_steps_and_tc_rates():
    parse = shaped_link.parse_rate_schedule
    assert parse("6:200mbit,12:1gbit") == ((6, "200mbit"), (12, "1gbit"))
    assert parse(" 0:1gbit , 3:12.5mbps, 4:2Gibit ", steps=5) == (
        (0, "1gbit"), (3, "12.5mbps"), (4, "2Gibit"))


@pytest.mark.parametrize("text, bad, why", [
    ("6", "'6'", "a ':' between STEP and RATE"),
    ("6:200mbit,x:1gbit", "'x:1gbit'", "a STEP (a 0-based step index)"),
    ("-1:1gbit", "'-1:1gbit'", "a STEP (a 0-based step index)"),
    ("6:fast", "'6:fast'", "a tc RATE"),
    ("6:200", "'6:200'", "a tc RATE"),
    ("6:200mbit,,8:1gbit", "''", "a ':' between STEP and RATE"),
    ("6:200mbit,6:1gbit", "'6:1gbit'", "does not come after step 6"),
    ("6:200mbit,3:1gbit", "'3:1gbit'", "does not come after step 6"),
    ("6:200mbit,12:1gbit", "'12:1gbit'", "step 12 is not run (steps 0 to 11)"),
])
def test_schedule_errors_name_the_token_and_the_form(text, bad, why):
    with pytest.raises(ValueError) as e:
        shaped_link.parse_rate_schedule(text, steps=12)
    message = str(e.value)
    assert f"bad token {bad}" in message and why in message, message
    assert "STEP:RATE[,STEP:RATE...]" in message, message


def test_empty_schedule_is_refused():
    with pytest.raises(ValueError, match="empty: expected STEP:RATE"):
        shaped_link.parse_rate_schedule(" , ")


def test_rate_in_force_at_each_step():
    schedule = ((4, "50mbit"), (8, "1gbit"))
    got = [shaped_link.rate_at("1gbit", schedule, i) for i in range(10)]
    assert got == ["1gbit"] * 4 + ["50mbit"] * 4 + ["1gbit"] * 2
    assert shaped_link.rate_at(None, (), 3) is None


def test_result_round_trips_rate_schedule_and_steps(tmp_path):
    steps = (results.E2EStep(0, 0.5, 1000.0, rate="1gbit", sent={"identity": 8}),
             results.E2EStep(1, 0.25, 200.0, rate="50mbit", sent={"binary": 6, "int8": 2}),
             results.E2EStep(2, 0.125, 300.0, rate="50mbit"))
    rows = (results.E2ERow("-", "single", 1.0),
            results.E2ERow("patch", "auto", 0.25, 2.0, 4.0, 250.0, math.inf, per_step=steps))
    written = results.E2EResult({"rate": "1gbit"}, 1e-4, rows, rate="1gbit",
                                rate_schedule=((1, "50mbit"), (3, "1gbit")))
    path = tmp_path / "e2e.json"
    written.write(path)
    assert results.E2EResult.read(path) == written
    link = json.loads(path.read_text())["link"]
    assert link == {"latency_s": 1e-4, "rate": "1gbit", "rate_schedule": [[1, "50mbit"],
                                                                             [3, "1gbit"]]}


def test_older_files_read_with_defaults(tmp_path):
    """A file from before the rate, schedule and steps were recorded: the rate from its
    --rate option, no schedule, no steps."""
    path = tmp_path / "old.json"
    path.write_text(json.dumps({
        "args": {"world": 2, "rate": "200mbit"}, "link": {"latency_s": 2e-4},
        "rows": [{"parallelism": "-", "method": "single", "seconds": 1.0,
                  "speedup_vs_raw": None, "speedup_vs_single": None, "bytes_per_step": None,
                  "psnr_vs_raw": None}]}))
    old = results.E2EResult.read(path)
    assert old.rate == "200mbit" and old.rate_schedule == ()
    assert old.rows == (results.E2ERow("-", "single", 1.0),) and old.rows[0].per_step == ()


@pytest.mark.parametrize("argv, message", [
    (["--rate-schedule", "2:50mbit"], "needs --rate"),
    (["--rate", "1gbit", "--rate-schedule", "2:50mbit,2:1gbit"], "bad token '2:1gbit'"),
    (["--rate", "1gbit", "--rate-schedule", "6:50mbit"], "step 6 is not run"),
])
def test_e2e_refuses_a_bad_schedule_before_any_run(argv, message):
    done = subprocess.run([sys.executable, "bench/e2e.py", "--steps", "4", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


@pytest.mark.skipif(shaped_link._problem() is not None, reason="needs root, ip and tc")
def test_change_rate_inside_the_namespace_keeps_burst_and_latency():
    """What rank 0 runs between steps: from inside the namespace (as the ranks are), the
    bucket's rate changes and its burst and latency stay those of the set-up."""
    code = ("import sys; sys.path.insert(0, 'bench'); from shaped_link import change_rate; "
            "change_rate('50mbit')")
    with shaped_link.shaped_netns("test", "1gbit") as (name, _):
        inside = ["ip", "netns", "exec", name]
        subprocess.run([*inside, sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
        shown = subprocess.run([*inside, "tc", "qdisc", "show", "dev", "lo"], check=True,
                               capture_output=True, text=True).stdout
        bad = subprocess.run([*inside, sys.executable, "-c", code.replace("50mbit", "fast")],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "tbf 10:" in shown and "rate 50Mbit" in shown and "burst 256Kb" in shown, shown
    assert "lat 50ms" in shown, shown
    assert bad.returncode != 0 and "tc qdisc change" in bad.stderr, bad.stderr[-2000:]
