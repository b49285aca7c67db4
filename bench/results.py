"""What ``bench/e2e.py`` measures and writes with ``--json``, and ``bench/sim_vs_e2e.py``
reads back."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["E2ERow", "E2EResult"]


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


@dataclass(frozen=True)
class E2EResult:
    """One ``bench/e2e.py`` run: its options, the link's measured latency and every row."""

    args: dict[str, Any]
    latency_s: float                        # seconds per hop (timed 4-byte all_gathers)
    rows: tuple[E2ERow, ...]

    def write(self, path: str | Path) -> None:
        """The result as JSON: ``{"args", "link": {"latency_s"}, "rows": [...]}``."""
        data = {"args": self.args, "link": {"latency_s": self.latency_s},
                "rows": [asdict(r) for r in self.rows]}
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def read(cls, path: str | Path) -> E2EResult:
        """The result :meth:`write` wrote to ``path``."""
        data = json.loads(Path(path).read_text())
        return cls(data["args"], data["link"]["latency_s"],
                   tuple(E2ERow(**r) for r in data["rows"]))
