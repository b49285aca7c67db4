"""Is a model a testbed for K/V compression? Two ablations against the exact parallel run.

A model on which compression is judged must need the other ranks' K/V. Two checks, both with
patch parallelism on ``world`` virtual ranks (:func:`~simulator.run.run_method`):

* **own patch only** -- every rank attends to its own image tokens (and the text tokens)
  and to nothing else: no exchange at all;
* **stale K/V** -- the other ranks' K/V are ``stale`` steps old (this rank's own are fresh;
  in the first ``stale`` steps they are those of the first step).

Each is compared with the exact parallel run (PSNR of the images). The exact run against
itself is bit-identical (infinite PSNR), so "loses 10 dB" needs a reference level: we take
:data:`VISIBLE_DB` = 40 dB, about where a difference stops being visible, and a testbed's
ablations must reach at most ``VISIBLE_DB - THRESHOLD_DB`` = 30 dB.
``python -m simulator.testbed --model photos`` prints them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from compressed_comm import Collectives

from .metrics import quality
from .run import add_run_arguments, make_methods, run_method
from .workloads import Workload, make_workload

__all__ = ["THRESHOLD_DB", "VISIBLE_DB", "TestbedCheck", "OwnPatchOnly", "StaleBy",
           "check_testbed", "main"]

#: the least loss (dB of PSNR against the exact parallel run) each ablation must cause
THRESHOLD_DB = 10.0
#: the PSNR (dB) from which that loss is counted: about where differences stop being visible
VISIBLE_DB = 40.0
_CEILING_DB = VISIBLE_DB - THRESHOLD_DB


class OwnPatchOnly:
    """A K/V exchange that exchanges nothing: an all-gather returns this rank's tensor alone,
    so patch attention sees only its own patch."""

    def __init__(self, inner: Collectives) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def all_gather(self, x: torch.Tensor, *, stream: str,
                   shapes: Sequence[Sequence[int]] | None = None) -> list[torch.Tensor]:
        return [x]


class StaleBy:
    """A K/V exchange whose all-gather returns this rank's fresh tensor and the others' of
    ``steps`` calls earlier on the same stream (of the first call, until there are that
    many); it still gathers exactly every call."""

    def __init__(self, inner: Collectives, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        self._inner = inner
        self._steps = steps
        self._history: dict[str, list[list[torch.Tensor]]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def all_gather(self, x: torch.Tensor, *, stream: str,
                   shapes: Sequence[Sequence[int]] | None = None) -> list[torch.Tensor]:
        history = self._history.setdefault(stream, [])
        history.append(self._inner.all_gather(x, stream=stream, shapes=shapes))
        if len(history) > self._steps + 1:
            history.pop(0)
        old = history[0]
        return [x if o == self._inner.rank else t for o, t in enumerate(old)]


@dataclass(frozen=True)
class TestbedCheck:
    """PSNR (dB) of each ablation against the exact parallel run."""

    own_patch_db: float
    stale_db: float
    stale_steps: int
    world: int
    steps: int

    @property
    def passed(self) -> bool:
        """Both ablations are at most ``VISIBLE_DB - THRESHOLD_DB`` dB (30) from exact."""
        return max(self.own_patch_db, self.stale_db) <= _CEILING_DB

    def lines(self) -> list[str]:
        """The two checks, one line each, as the CLI prints them."""
        ok = {True: "ok", False: "FAILS"}
        return [
            f"own patch only (no exchange), {self.world} ranks, {self.steps} steps: "
            f"PSNR {self.own_patch_db:.1f} dB vs exact parallel "
            f"[{ok[self.own_patch_db <= _CEILING_DB]}: needs <= {_CEILING_DB:.0f} dB]",
            f"K/V {self.stale_steps} steps stale: PSNR {self.stale_db:.1f} dB vs exact parallel "
            f"[{ok[self.stale_db <= _CEILING_DB]}: needs <= {_CEILING_DB:.0f} dB]",
        ]


def check_testbed(workload: Workload, world: int = 4, steps: int = 20,
                  stale: int = 5) -> TestbedCheck:
    """Run the exact parallel run and both ablations of ``workload`` (patch parallelism)."""
    (raw,) = make_methods("patch", [], distrifusion=False)
    exact = run_method(workload, raw, world, steps)
    runs = {"own": run_method(workload, raw, world, steps, wrap_exchange=OwnPatchOnly),
            "stale": run_method(workload, raw, world, steps,
                                wrap_exchange=lambda inner: StaleBy(inner, stale))}
    psnr = {k: quality(r.images, exact.images, r.latents, exact.latents).psnr_db
            for k, r in runs.items()}
    return TestbedCheck(psnr["own"], psnr["stale"], stale, world, steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulator.testbed",
                                     description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--stale", type=int, default=5, help="staleness in steps (5)")
    args = parser.parse_args(argv)
    check = check_testbed(make_workload(args.model, args.batch, args.seed), args.ranks,
                          args.steps, args.stale)
    print("\n".join(check.lines()))
    return 0 if check.passed else 1


if __name__ == "__main__":
    sys.exit(main())
