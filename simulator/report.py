"""Results of a simulation: one row per method, as a table, a dict (JSON) and two PNGs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .metrics import Quality

__all__ = ["Row", "SimulationReport"]


@dataclass(frozen=True)
class Row:
    """One method's numbers."""

    method: str
    bytes_per_step: float          # all ranks, mean over steps
    ratio: float                   # raw bytes / this method's bytes
    quality: Quality               # against the exact parallel (raw) run
    step_ms: dict[str, float]      # estimated mean step time per link preset
    comm_ms: dict[str, float]      # of which communication not hidden behind compute
    wall_s: float                  # this simulation's wall time for the method
    #: bytes rank 0's compressed streams hold (references, codec state); None for raw
    reference_bytes: int | None = None
    #: codec kernel time per step on rank 0, measured on this machine (in step_ms)
    codec_ms: float = 0.0

    def to_dict(self) -> dict:
        return {"method": self.method, "bytes_per_step": self.bytes_per_step,
                "ratio": self.ratio, **self.quality.to_dict(),
                "step_ms": dict(self.step_ms), "exposed_comm_ms": dict(self.comm_ms),
                "wall_s": self.wall_s, "reference_bytes_rank0": self.reference_bytes,
                "codec_ms": self.codec_ms}


@dataclass
class SimulationReport:
    """Everything ``python -m simulator`` prints and writes."""

    setup: dict
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"setup": self.setup, "results": [r.to_dict() for r in self.rows],
                "notes": list(self.notes)}

    def table(self) -> str:
        links = list(self.rows[0].step_ms) if self.rows else []
        head = (f"{'method':<14} {'wire MB/step':>12} {'ratio':>7} {'PSNR dB':>8} {'SSIM':>7} "
                f"{'rel.L2':>8} {'codec ms':>8}"
                + "".join(f" {'step ms ' + k + ' (comm)':>24}" for k in links))
        lines = [head, "-" * len(head)]
        for r in self.rows:
            psnr = "inf" if math.isinf(r.quality.psnr_db) else f"{r.quality.psnr_db:.1f}"
            lines.append(f"{r.method:<14} {r.bytes_per_step / 1e6:>12.3f} {r.ratio:>6.1f}x "
                         f"{psnr:>8} {r.quality.ssim:>7.4f} {r.quality.rel_l2:>8.1e} "
                         f"{r.codec_ms:>8.2f}"
                         + "".join(f" {r.step_ms[k]:>14.2f} ({r.comm_ms[k]:>7.2f})"
                                   for k in links))
        return "\n".join(lines)

    def write_images(self, out: Path, reference: torch.Tensor, exact: torch.Tensor,
                     images: dict[str, torch.Tensor], max_rows: int = 8) -> Path:
        """A grid: rows are samples; columns single device, exact parallel, each method."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        columns = {"single device": reference, "raw (exact parallel)": exact, **images}
        rows = min(max_rows, reference.shape[0])
        fig, axes = plt.subplots(rows, len(columns), squeeze=False,
                                 figsize=(1.3 * len(columns), 1.3 * rows + 0.4))
        for c, (name, imgs) in enumerate(columns.items()):
            for r in range(rows):
                ax = axes[r][c]
                img = imgs[r].clamp(0, 1).numpy()
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img,
                          cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[0][c].set_title(name, fontsize=7)
        fig.tight_layout()
        path = out / "images.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def plot_link(self) -> str | None:
        """The link the time panel of :meth:`quality_figure` uses by default: the slowest
        (lowest bandwidth) of the setup's links, where the choice of method matters most;
        the first of the rows' links if the setup does not describe them."""
        names = list(self.rows[0].step_ms) if self.rows else []
        links = self.setup.get("links") or {}
        described = [n for n in names if n in links]
        if described:
            return min(described, key=lambda n: links[n]["bandwidth_GBps"])
        return names[0] if names else None

    def quality_figure(self, link: str | None = None):
        """Quality (PSNR vs the exact parallel run) against wire bytes per step (left) and
        against the estimated step time on ``link`` (right; default :meth:`plot_link`).
        Each method has its own colour and marker in both panels and one entry in the
        legend right of the panels (no text at the points, so no labels overlap); raw, whose
        PSNR is infinite, is the dashed line. Returns the matplotlib figure."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter

        link = link if link is not None else self.plot_link()
        finite = [r for r in self.rows if not math.isinf(r.quality.psnr_db)]
        raw = next((r for r in self.rows if r.method == "raw"), None)
        panels = 2 if link is not None else 1
        fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels + 1.8, 4.0), sharey=True,
                                 squeeze=False, layout="constrained")
        bytes_ax = axes[0][0]
        time_ax = axes[0][1] if link is not None else None
        colours = plt.get_cmap("tab10")
        markers = "osD^v<>phX*"
        for i, r in enumerate(finite):
            style = dict(color=colours(i % 10), marker=markers[i % len(markers)], s=40,
                         edgecolors="black", linewidths=0.5, zorder=3)
            bytes_ax.scatter(r.bytes_per_step / 1e6, r.quality.psnr_db, label=r.method,
                             **style)
            if time_ax is not None:
                time_ax.scatter(r.step_ms[link], r.quality.psnr_db, **style)
        if raw is not None:
            bytes_ax.axvline(raw.bytes_per_step / 1e6, color="grey", linestyle="--", linewidth=1,
                             label="raw (exact: PSNR infinite)")
            if time_ax is not None:
                time_ax.axvline(raw.step_ms[link], color="grey", linestyle="--", linewidth=1)
        bytes_ax.set_xscale("log")
        # plain numbers at 1, 2 and 5 of every decade: few enough not to collide
        bytes_ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        bytes_ax.xaxis.set_minor_formatter(FuncFormatter(
            lambda x, _: f"{x:g}" if f"{x:.0e}"[0] in "25" else ""))
        bytes_ax.set_xlabel("wire MB per denoising step (all ranks, log scale)")
        bytes_ax.set_ylabel("PSNR vs exact parallel output (dB)")
        if time_ax is not None:
            described = (self.setup.get("links") or {}).get(link)
            rate = ("" if described is None else
                    f" ({8 * described['bandwidth_GBps']:.3g} Gbit/s, "
                    f"{described['latency_us']:.3g} us)")
            compute = self.setup.get("compute_ms_per_step")
            time_ax.set_xlabel(f"estimated ms per step on {link}{rate}" + (
                "" if compute is None else
                f"\n= compute ({compute:.0f} ms per rank) + codec + exposed communication"),
                fontsize=9)
        for ax in axes[0]:
            ax.grid(True, which="both", alpha=0.3)
        fig.legend(loc="outside right upper", fontsize=8, title="method", title_fontsize=8)
        fig.suptitle(f"{self.setup.get('model')}: {self.setup.get('ranks')} ranks, "
                     f"{self.setup.get('parallelism')}", fontsize=9)
        return fig

    def write_plot(self, out: Path, path: Path | None = None, link: str | None = None
                   ) -> Path:
        """:meth:`quality_figure` as ``out / "quality_vs_bytes.png"`` (or ``path``)."""
        import matplotlib.pyplot as plt

        fig = self.quality_figure(link)
        path = Path(path) if path is not None else out / "quality_vs_bytes.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
