"""Run a benchmark's ranks behind a rate-limited link: a fresh network namespace whose
loopback is shaped by ``tc`` (a token bucket, and a netem delay where the kernel has it).

Used by ``bench/collectives.py`` and ``bench/e2e.py`` (also :func:`end_rank`). All ranks'
traffic shares the one bucket: it models one link of rate R for the whole group, not R per
rank. Needs root and iproute2 (``ip``, ``tc``); the namespace is deleted afterwards.

A link that changes mid-run: :func:`parse_rate_schedule` reads ``STEP:RATE[,STEP:RATE...]``
(``6:200mbit,12:1gbit``), :func:`rate_at` says which rate is in force at a step, and
:func:`change_rate`, run by a process inside the namespace (the ranks are: ``ip netns exec``),
sets the bucket's rate, keeping its burst and latency.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import NoReturn

TBF_HANDLE = "10:"  # the token bucket's handle, its burst and latency (kept by change_rate)
BURST, LATENCY = "256kb", "50ms"
SCHEDULE_FORM = "STEP:RATE[,STEP:RATE...] such as '6:200mbit,12:1gbit'"
_TC_RATE = re.compile(r"\d+(\.\d+)?([kmgt]i?)?(bit|bps)", re.IGNORECASE)


def fail(tool: str, why: str) -> NoReturn:
    """Say why the shaped link cannot be set up and exit with status 2."""
    print(f"{tool}: {why}", file=sys.stderr)
    sys.exit(2)


def _problem() -> str | None:
    if os.geteuid() != 0:
        return "not running as root"
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    return f"{' and '.join(missing)} not found on PATH" if missing else None


def _run(tool: str, *cmd: str, required: bool = True) -> bool:
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode and required:
        fail(tool, f"set-up failed: `{' '.join(cmd)}`: {done.stderr.strip() or done.returncode}")
    return done.returncode == 0


@contextlib.contextmanager
def shaped_netns(tool: str, rate: str, delay: str | None = None) -> Iterator[tuple[str, bool]]:
    """A fresh namespace whose loopback sends at most ``rate`` (a ``tc`` rate: ``1gbit``),
    with ``delay`` (``1ms``) added by netem when the kernel has it; yields the namespace's
    name and whether the delay is applied."""
    if problem := _problem():
        fail(tool, f"--rate needs root and iproute2 (ip, tc) for a shaped network namespace: "
                   f"{problem}")
    name = f"ccbench{os.getpid()}"
    _run(tool, "ip", "netns", "add", name)
    try:
        _run(tool, "ip", "-n", name, "link", "set", "lo", "up")
        tc = ["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo"]
        delayed = bool(delay) and _run(tool, *tc, "root", "handle", "1:", "netem", "delay",
                                       str(delay), required=False)
        _run(tool, *tc, *(("parent", "1:1") if delayed else ("root",)), "handle", TBF_HANDLE,
             "tbf", "rate", rate, "burst", BURST, "latency", LATENCY)
        yield name, delayed
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def parse_rate_schedule(text: str, steps: int | None = None) -> tuple[tuple[int, str], ...]:
    """``STEP:RATE[,STEP:RATE...]`` as ``((STEP, RATE), ...)``: from the start of step STEP
    (0-based, steps strictly increasing, below ``steps`` when given) the link sends at RATE,
    a tc rate (a number, an optional k/m/g/t prefix with optional i, then bit or bps:
    ``200mbit``, ``1gbit``, ``12.5mbps``). ``ValueError`` naming the bad token and the
    expected form otherwise."""
    out: list[tuple[int, str]] = []
    tokens = [t.strip() for t in text.split(",")]
    if not any(tokens):
        raise ValueError(f"rate schedule {text!r} is empty: expected {SCHEDULE_FORM}")
    for token in tokens:
        step, colon, rate = (part.strip() for part in token.partition(":"))
        if not colon or not step.isdigit() or not _TC_RATE.fullmatch(rate):
            what = ("a ':' between STEP and RATE" if not colon else
                    "a STEP (a 0-based step index) before ':'" if not step.isdigit() else
                    "a tc RATE (200mbit, 1gbit, 12.5mbps) after ':'")
            raise ValueError(f"rate schedule: bad token {token!r}: expected STEP:RATE with "
                             f"{what}; the whole schedule is {SCHEDULE_FORM}")
        if out and int(step) <= out[-1][0]:
            raise ValueError(f"rate schedule: bad token {token!r}: step {int(step)} does not "
                             f"come after step {out[-1][0]}; expected steps in increasing "
                             f"order, {SCHEDULE_FORM}")
        if steps is not None and int(step) >= steps:
            raise ValueError(f"rate schedule: bad token {token!r}: step {int(step)} is not "
                             f"run (steps 0 to {steps - 1}); expected {SCHEDULE_FORM}")
        out.append((int(step), rate))
    return tuple(out)


def rate_at(base: str | None, schedule: tuple[tuple[int, str], ...], step: int) -> str | None:
    """The rate in force at ``step``: the last schedule entry at or before it, else ``base``."""
    return next((rate for at, rate in reversed(schedule) if at <= step), base)


def change_rate(rate: str) -> None:
    """Set the token bucket of this process's namespace's loopback (one :func:`shaped_netns`
    made, run inside it as the ranks are) to ``rate``, with the set-up's burst and latency;
    queued packets are kept. ``RuntimeError`` with tc's message if tc refuses."""
    cmd = ["tc", "qdisc", "change", "dev", "lo", "handle", TBF_HANDLE, "tbf", "rate", rate,
           "burst", BURST, "latency", LATENCY]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.returncode}")


def end_rank() -> NoReturn:
    """End a rank's process once its process group is destroyed, skipping interpreter
    finalisation: a gloo thread that drops the last reference to a tensor during
    finalisation aborts the process ("terminate called without an active exception",
    pytorch/pytorch#190489), after the results are written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(tool: str, cmd: list[str], timeout: float) -> int:
    """Run ``cmd`` (which spawns the ranks) in its own process group, killed after
    ``timeout``, with one OpenMP and numba thread per rank and gloo on ``lo``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{tool}: timed out after {timeout:.0f} s (--timeout); killed the ranks",
              file=sys.stderr)
        return 124
    finally:
        if proc.returncode is None:  # timed out or interrupted: end the ranks' process group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_behind(tool: str, argv: list[str], script: str, rate: str | None, delay: str | None,
               timeout: float) -> NoReturn:
    """Re-run ``script`` with ``argv + ["--inner"]`` (the ranks), behind a link of ``rate``
    when given; exits with the ranks' status."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still kill ranks, delete netns
    inner = [sys.executable, os.path.abspath(script), *argv, "--inner"]
    with contextlib.ExitStack() as stack:
        if rate:
            name, delayed = stack.enter_context(shaped_netns(tool, rate, delay))
            if delay and not delayed:
                print(f"{tool}: netem is not available in this kernel: --delay {delay} is not "
                      "applied", file=sys.stderr)
            inner = ["ip", "netns", "exec", name, *inner]
        sys.exit(run_ranks(tool, inner, timeout))
