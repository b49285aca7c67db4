"""Speedup over raw against link rate, per parallelism and method, from ``bench/e2e.py --json``.

    python bench/plot_e2e.py e2e_uncapped.json e2e_10gbit.json e2e_1gbit.json \\
        e2e_200mbit.json --out docs/speedup_vs_link.png [--title "4 gloo ranks, 2 CPU cores"]

Each file is one ``bench/e2e.py --json`` run (``bench/results.py``'s ``E2EResult``); its
link is the ``--rate`` that run was given, which the JSON keeps in ``args["rate"]`` (no
rate: ``uncapped``, plain loopback). Rates are read as tc reads them (``200mbit``,
``1gbit``; ``bps`` is bytes per second). Several files at one rate are repeats: each
method's speedup there is the median of theirs (each run's speedup is against the raw run
of that same invocation, measured side by side).

One panel per parallelism (in the order the first file lists them), the speedup against
raw of the same parallelism and link on a log y axis (the dashed line at 1 is raw), the
link rate on a log x axis (``uncapped`` one decade right of the fastest capped rate), one
line per method (``raw`` and ``single`` are not lines; a method a run did not measure is
left out at that rate). The same numbers are printed as a markdown table, so a README
table and the picture come from one source.
"""

from __future__ import annotations

import argparse
import collections
import math
import re
import statistics
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also when imported
from results import E2EResult  # noqa: E402

__all__ = ["rate_bits", "rate_label", "speedups", "repeats", "markdown_table", "plot_speedups",
           "main"]

UNCAPPED = "uncapped"
#: methods that are not a line: the reference (1.0 by definition) and the one-process run
NOT_LINES = ("raw", "single")
_TC_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(bit|bps)\s*$", re.IGNORECASE)
_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_MARKERS = "osD^v<>phX*"


def rate_bits(rate: str | None) -> float:
    """Bits per second of a tc rate (``200mbit``, ``1gbit``; ``bps``: bytes per second);
    ``inf`` for ``None`` (uncapped). ``ValueError`` naming the expected form otherwise."""
    if rate is None:
        return math.inf
    m = _TC_RATE.match(rate)
    if m is None:
        raise ValueError(f"rate {rate!r}: expected a tc rate such as 200mbit or 1gbit")
    value = float(m.group(1)) * _PREFIX[m.group(2).lower()]
    return value if m.group(3).lower() == "bit" else 8 * value


def rate_label(bits: float) -> str:
    """``200 Mbit/s``, ``1 Gbit/s``, ``10 Gbit/s``; ``uncapped`` for ``inf``."""
    if math.isinf(bits):
        return UNCAPPED
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g} {unit}"
    return f"{bits:g} bit/s"


def _rate_of(result: E2EResult) -> float:
    return rate_bits(result.args.get("rate"))


def speedups(results: Sequence[E2EResult]
             ) -> tuple[list[float], dict[str, dict[str, dict[float, float]]]]:
    """The link rates (bits/s, slowest first, ``inf`` last) and, per parallelism and method
    (in the order the runs list them), the speedup against raw at each rate it was
    measured: the median over the runs at that rate that measured it."""
    measured: dict[str, dict[str, dict[float, list[float]]]] = {}
    for result in results:
        bits = _rate_of(result)
        for row in result.rows:
            if row.method in NOT_LINES or row.speedup_vs_raw is None:
                continue
            measured.setdefault(row.parallelism, {}).setdefault(row.method, {}).setdefault(
                bits, []).append(row.speedup_vs_raw)
    table = {p: {m: {b: statistics.median(v) for b, v in by_rate.items()}
                 for m, by_rate in by_method.items()} for p, by_method in measured.items()}
    return sorted({_rate_of(r) for r in results}), table


def repeats(results: Sequence[E2EResult]) -> dict[float, int]:
    """How many runs were made at each rate (bits/s)."""
    return dict(collections.Counter(_rate_of(r) for r in results))


def markdown_table(results: Sequence[E2EResult]) -> str:
    """The plotted speedups as a markdown table: a row per parallelism and method, a
    column per rate (``5.62x``; ``-`` where that run did not measure the method)."""
    rates, table = speedups(results)
    lines = ["| parallelism | method | " + " | ".join(rate_label(b) for b in rates) + " |",
             "|---|---|" + "---:|" * len(rates)]
    for parallelism, methods in table.items():
        for method, by_rate in methods.items():
            cells = [f"{by_rate[b]:.2f}x" if b in by_rate else "-" for b in rates]
            lines.append(f"| {parallelism} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _x_positions(rates: Sequence[float]) -> dict[float, float]:
    """Where each rate sits on the log x axis: itself; ``inf`` a decade right of the
    fastest capped rate (10 Gbit/s when every run was uncapped)."""
    capped = [b for b in rates if not math.isinf(b)]
    return {b: (10 * max(capped, default=1e9) if math.isinf(b) else b) for b in rates}


def plot_speedups(results: Sequence[E2EResult], title: str | None = None) -> Any:
    """The figure: a panel per parallelism, speedup over raw against link rate, a line
    per method (the same colour and marker in every panel), one legend below the panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    rates, table = speedups(results)
    if not table:
        raise ValueError("no rows with a speedup against raw in these results")
    xs = _x_positions(rates)
    methods = list(dict.fromkeys(m for by_method in table.values() for m in by_method))
    colours = plt.get_cmap("tab10")
    style = {m: (colours(i % 10), _MARKERS[i % len(_MARKERS)]) for i, m in enumerate(methods)}
    values = [s for by_method in table.values() for by_rate in by_method.values()
              for s in by_rate.values()] + [1.0]
    low, high = min(values) / 1.3, max(values) * 1.3

    columns = min(3, len(table))
    rows = math.ceil(len(table) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns + 0.6, 3.4 * rows + 0.9),
                             sharey=True, squeeze=False, layout="constrained")
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(table):]:
        ax.set_visible(False)
    for i, (ax, (parallelism, by_method)) in enumerate(zip(flat, table.items())):
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        for method, by_rate in by_method.items():
            points = sorted((xs[b], s) for b, s in by_rate.items())
            colour, marker = style[method]
            ax.plot([p[0] for p in points], [p[1] for p in points], color=colour,
                    marker=marker, label=method, linewidth=1.5, markersize=5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([xs[b] for b in rates], [rate_label(b) for b in rates], fontsize=8)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(min(xs.values()) / 2, max(xs.values()) * 2)
        ax.set_ylim(low, high)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(parallelism, fontsize=10)
        ax.set_xlabel("link rate, shared by all ranks", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        if i % columns == 0:
            ax.set_ylabel("speedup over raw")
    handles = [plt.Line2D([], [], color=style[m][0], marker=style[m][1], label=m)
               for m in methods]
    handles.append(plt.Line2D([], [], color="grey", linestyle="--", label="raw (1x)"))
    fig.legend(handles=handles, loc="outside lower center",
               ncol=min(len(handles), 6), fontsize=8, frameon=False)
    if title:
        fig.suptitle(textwrap.fill(title, 40 * columns + 5), fontsize=10)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+",
                   help="bench/e2e.py --json files, one or more per link rate (repeats: "
                        "the median is drawn)")
    p.add_argument("--out", default="speedup_vs_link.png",
                   help="the PNG to write (default: %(default)s)")
    p.add_argument("--title", default=None,
                   help="figure title: the machine the runs measured, e.g. '4 gloo ranks on "
                        "2 CPU cores' (default: ranks, model and steps of the first file)")
    args = p.parse_args(argv)
    results = [E2EResult.read(path) for path in args.results]
    title = args.title
    if title is None:
        a = results[0].args
        title = (f"bench/e2e.py: {a.get('world', '?')} ranks, model {a.get('model', '?')}, "
                 f"{a.get('steps', '?')} steps")
    low, high = min(repeats(results).values()), max(repeats(results).values())
    if high > 1:
        title += f"; median of {low if low == high else f'{low}-{high}'} runs per rate"
    try:
        table = markdown_table(results)
        fig = plot_speedups(results, title)
    except ValueError as e:
        p.error(f"{e} ({', '.join(args.results)})")
    fig.savefig(args.out, dpi=120)
    print(table)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
