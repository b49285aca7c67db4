"""The README's pictures: bench/plot_e2e.py (speedup against link rate) and the simulator's
quality plot (PSNR against bytes and against estimated step time)."""

import dataclasses
import math
import sys
from itertools import combinations
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from simulator.metrics import Quality  # noqa: E402
from simulator.report import Row, SimulationReport  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # as the bench scripts find their neighbours
import plot_e2e  # noqa: E402
from results import E2EResult, E2ERow  # noqa: E402

#: speedup against raw per (rate, parallelism, method); None: e2e's uncapped run
SPEEDUPS = {
    "200mbit": {("patch", "binary"): 5.62, ("patch", "int2"): 4.1234,
                ("cp-ring", "binary"): 4.70, ("cp-ring", "lowrank:8"): 3.3},
    "1gbit": {("patch", "binary"): 1.86, ("patch", "int2"): 1.5,
              ("cp-ring", "binary"): 1.72, ("cp-ring", "lowrank:8"): 1.2},
    "10gbit": {("patch", "binary"): 1.30, ("patch", "int2"): 1.1,
               ("cp-ring", "binary"): 1.08},  # lowrank:8 not measured at this rate
    None: {("patch", "binary"): 0.91, ("patch", "int2"): 0.8,
           ("cp-ring", "binary"): 0.74, ("cp-ring", "lowrank:8"): 0.6},
}
BITS = {"200mbit": 2e8, "1gbit": 1e9, "10gbit": 1e10, None: math.inf}


def _e2e_files(tmp_path):
    """One e2e JSON per rate, written and read back the way bench/e2e.py writes them."""
    paths = []
    for rate, speedups in SPEEDUPS.items():
        rows = [E2ERow("-", "single", 0.3)]
        for parallelism in ("patch", "cp-ring"):
            rows.append(E2ERow(parallelism, "raw", 1.0, speedup_vs_raw=1.0,
                               speedup_vs_single=0.3, bytes_per_step=9e6, psnr_vs_raw=math.inf))
        rows += [E2ERow(p, m, 1.0 / s, speedup_vs_raw=s, speedup_vs_single=0.3 * s,
                        bytes_per_step=3e5, psnr_vs_raw=80.0)
                 for (p, m), s in speedups.items()]
        path = tmp_path / f"e2e_{rate or 'uncapped'}.json"
        args = {"world": 4, "model": "flux", "steps": 6, "rate": rate, "codecs": ["binary"]}
        E2EResult(args, 1e-4, tuple(rows)).write(path)
        paths.append(path)
    return paths


def test_e2e_plot_and_table_show_the_measured_speedups(tmp_path, capsys):
    paths = _e2e_files(tmp_path)
    results = [E2EResult.read(p) for p in paths]  # JSON round trip: inf, None and all
    fig = plot_e2e.plot_speedups(results, "4 gloo ranks on 2 CPU cores")
    try:
        panels = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title() for ax in panels] == ["patch", "cp-ring"]
        x_of = plot_e2e._x_positions(sorted(BITS.values()))
        for ax in panels:
            lines = {line.get_label(): line for line in ax.get_lines()
                     if not line.get_label().startswith("_")}
            expected = {m for rate in SPEEDUPS.values() for (p, m) in rate
                        if p == ax.get_title()}
            assert set(lines) == expected  # one line per method; raw is the dashed line
            for method, line in lines.items():
                want = sorted((x_of[BITS[rate]], s[(ax.get_title(), method)])
                              for rate, s in SPEEDUPS.items() if (ax.get_title(), method) in s)
                assert list(zip(line.get_xdata(), line.get_ydata(), strict=True)) == \
                    pytest.approx(want)
            assert [t.get_text() for t in ax.get_xticklabels()] == \
                ["200 Mbit/s", "1 Gbit/s", "10 Gbit/s", "uncapped"]
            assert any(list(line.get_ydata()) == [1.0, 1.0] for line in ax.get_lines())
    finally:
        plt.close(fig)

    out = tmp_path / "speedup.png"
    assert plot_e2e.main([str(p) for p in paths] + ["--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == "| parallelism | method | 200 Mbit/s | 1 Gbit/s | 10 Gbit/s | uncapped |"
    cells = {}
    for line in table[2:]:
        parallelism, method, *speedups = [c.strip() for c in line.strip("|").split("|")]
        cells[parallelism, method] = speedups
    assert set(cells) == {key for rate in SPEEDUPS.values() for key in rate}
    for i, rate in enumerate(SPEEDUPS.values()):  # files in rate order, slowest first
        for key, got in cells.items():
            if key in rate:
                assert got[i] == f"{rate[key]:.2f}x"
            else:
                assert got[i] == "-"


def test_repeats_at_one_rate_give_the_median(tmp_path):
    results = [E2EResult.read(p) for p in _e2e_files(tmp_path)]
    one_gbit = results[1]
    slower = E2EResult(one_gbit.args, one_gbit.latency_s, tuple(
        dataclasses.replace(r, speedup_vs_raw=r.speedup_vs_raw / 2)
        if r.speedup_vs_raw and r.method == "binary" else r for r in one_gbit.rows))
    faster = E2EResult(one_gbit.args, one_gbit.latency_s, tuple(
        dataclasses.replace(r, speedup_vs_raw=r.speedup_vs_raw * 3)
        if r.speedup_vs_raw and r.method == "binary" else r for r in one_gbit.rows))
    _, table = plot_e2e.speedups(results + [slower, faster])
    assert table["patch"]["binary"][1e9] == pytest.approx(1.86)   # median of 0.93, 1.86, 5.58
    assert table["patch"]["int2"][1e9] == pytest.approx(1.5)
    assert plot_e2e.repeats(results + [slower, faster])[1e9] == 3


@pytest.mark.parametrize("rate,bits", [("200mbit", 2e8), ("1gbit", 1e9), ("1.5Gbit", 1.5e9),
                                       ("100mbps", 8e8), (None, math.inf)])
def test_e2e_rates_are_read_as_tc_reads_them(rate, bits):
    assert plot_e2e.rate_bits(rate) == bits
    assert plot_e2e.rate_label(bits) == {2e8: "200 Mbit/s", 1e9: "1 Gbit/s",
                                         1.5e9: "1.5 Gbit/s", 8e8: "800 Mbit/s",
                                         math.inf: "uncapped"}[bits]


def _report(methods):
    """A simulator report with raw and ``methods``: (name, bytes, PSNR, ms on 1gbe)."""
    def row(name, nbytes, psnr, ms):
        return Row(name, nbytes, 4e6 / nbytes, Quality(psnr, 1.0, 0.0),
                   {"pcie4": ms / 10, "1gbe": ms}, {"pcie4": 0.0, "1gbe": ms / 2}, 1.0)
    setup = {"model": "digits", "ranks": 4, "parallelism": "patch",
             "links": {"pcie4": {"bandwidth_GBps": 22.0, "latency_us": 5.0},
                       "1gbe": {"bandwidth_GBps": 0.115, "latency_us": 50.0}}}
    return SimulationReport(setup, [row("raw", 4e6, math.inf, 300.0)]
                            + [row(*m) for m in methods])


#: several methods on top of each other: the points the old per-point labels wrote over
CROWDED = [("distrifusion", 4e6, 30.0, 250.0), ("binary", 1.3e5, 33.0, 120.0),
           ("binary+async", 1.3e5, 33.0, 110.0), ("int2", 2.6e5, 42.0, 125.0),
           ("int4", 5.1e5, 55.0, 130.0), ("lowrank:8", 1.4e5, 33.2, 121.0),
           ("lowrankq:32", 1.5e5, 33.1, 122.0), ("identity", 4e6, math.inf, 300.0)]


def _overlapping_texts(fig):
    """Pairs of visible, non-empty texts of ``fig`` whose drawn boxes overlap."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    undrawn = set()  # labels of ticks outside the view, which matplotlib keeps but skips
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not low <= tick.get_loc() <= high:
                    undrawn.update((id(tick.label1), id(tick.label2)))
    texts = [t for t in fig.findobj(Text)
             if t.get_visible() and t.get_text().strip() and id(t) not in undrawn]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    return [(a, b) for (a, box_a), (b, box_b) in combinations(boxes, 2) if box_a.overlaps(box_b)]


def test_quality_plot_labels_every_method_once_and_no_text_overlaps():
    report = _report(CROWDED)
    fig = report.quality_figure()
    try:
        bytes_ax, time_ax = fig.axes
        legend = fig.legends[0]
        labels = [t.get_text() for t in legend.get_texts()]
        finite = [m[0] for m in CROWDED if not math.isinf(m[2])]
        assert labels == finite + ["raw (exact: PSNR infinite)"]
        # each method told apart by its own colour and marker, the same in both panels
        styles = []
        for ax in (bytes_ax, time_ax):
            styles.append([(tuple(c.get_facecolor()[0]), c.get_paths()[0].vertices.tobytes())
                           for c in ax.collections])
        assert styles[0] == styles[1] and len(set(styles[0])) == len(finite)
        assert [c.get_offsets()[0][1] for c in time_ax.collections] == \
            pytest.approx([m[2] for m in CROWDED if not math.isinf(m[2])])
        # the time panel is the slowest link's, and says so
        assert [c.get_offsets()[0][0] for c in time_ax.collections] == \
            pytest.approx([m[3] for m in CROWDED if not math.isinf(m[2])])
        assert "1gbe" in time_ax.get_xlabel() and "0.92 Gbit/s" in time_ax.get_xlabel()
        # nothing written over anything else: no two texts overlap and the legend covers
        # neither panel's data
        assert _overlapping_texts(fig) == []
        renderer = fig.canvas.get_renderer()
        for ax in (bytes_ax, time_ax):
            assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    finally:
        plt.close(fig)


def test_the_overlap_check_finds_labels_written_at_the_points():
    """The check above can fail: labels at the points, as the plot had them, collide."""
    fig, ax = plt.subplots()
    try:
        for name, nbytes, psnr, _ in CROWDED[1:3]:  # binary and binary+async: same point
            ax.scatter(nbytes, psnr)
            ax.annotate(name, (nbytes, psnr), xytext=(4, 4), textcoords="offset points")
        assert ("binary", "binary+async") in _overlapping_texts(fig)
    finally:
        plt.close(fig)


def test_quality_plot_is_written_where_asked(tmp_path):
    path = _report(CROWDED[:3]).write_plot(tmp_path, tmp_path / "docs_quality.png", link="pcie4")
    assert path == tmp_path / "docs_quality.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "quality_vs_bytes.png").exists()
