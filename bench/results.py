"""What ``bench/e2e.py`` measures and writes with ``--json``, and ``bench/sim_vs_e2e.py``
reads back."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["E2EStep", "E2ERow", "E2EResult"]


@dataclass(frozen=True)
class E2EStep:
    """One denoising step of a parallel run."""

    step: int                               # 0-based denoising step
    seconds: float                          # the slowest rank's seconds (the rate change and
                                            # the barrier before the step not included)
    bytes_sent: float                       # the most a rank sent in this step
    rate: str | None = None                 # the link rate in force (None: uncapped loopback)
    sent: dict[str, int] | None = None      # codec="auto": what rank 0's encoder streams sent,
                                            # streams per codec; None for other methods


@dataclass(frozen=True)
class E2ERow:
    """One run: a method (:mod:`simulator.methods`) on one parallelism, or ``single``."""

    parallelism: str                        # "-" for the single-process run
    method: str                             # "single", or a method's canonical name
    seconds: float                          # median s/step of the slowest rank after step 1
    speedup_vs_raw: float | None = None     # raw's seconds (same parallelism) / seconds
    speedup_vs_single: float | None = None  # one process's seconds / seconds
    bytes_per_step: float | None = None     # the most a rank sent per step after step 1;
                                            # None: not counted (diffusers' own raw CP)
    psnr_vs_raw: float | None = None        # final latents against raw's (inf: identical)
    per_step: tuple[E2EStep, ...] = ()      # every step of a parallel run (empty: single, or
                                            # a file written before steps were recorded)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> E2ERow:
        """The row :func:`dataclasses.asdict` gave (``per_step`` optional)."""
        steps = tuple(E2EStep(**s) for s in data.get("per_step", ()))
        return cls(**{**data, "per_step": steps})


@dataclass(frozen=True)
class E2EResult:
    """One ``bench/e2e.py`` run: its options, the link (measured latency, ``--rate`` and
    ``--rate-schedule``) and every row."""

    args: dict[str, Any]
    latency_s: float                        # seconds per hop (timed 4-byte all_gathers)
    rows: tuple[E2ERow, ...]
    rate: str | None = None                 # the tc rate of the shaped link (None: uncapped)
    rate_schedule: tuple[tuple[int, str], ...] = ()  # (step, rate): from that step of every
                                                     # parallel run on; back to rate at step 0

    def write(self, path: str | Path) -> None:
        """The result as JSON: ``{"args", "link": {"latency_s", "rate", "rate_schedule"},
        "rows": [...]}``."""
        link = {"latency_s": self.latency_s, "rate": self.rate,
                "rate_schedule": [list(e) for e in self.rate_schedule]}
        data = {"args": self.args, "link": link, "rows": [asdict(r) for r in self.rows]}
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def read(cls, path: str | Path) -> E2EResult:
        """The result :meth:`write` wrote to ``path``. A file from before the link's rate was
        recorded there gives the rate of its ``args`` (``--rate``), one from before the
        schedule and the per-step records an empty schedule and empty ``per_step``."""
        data = json.loads(Path(path).read_text())
        link = data["link"]
        schedule = tuple((int(s), str(r)) for s, r in link.get("rate_schedule", ()))
        return cls(data["args"], link["latency_s"],
                   tuple(E2ERow.from_dict(r) for r in data["rows"]),
                   rate=link.get("rate", data["args"].get("rate")), rate_schedule=schedule)
