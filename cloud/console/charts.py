"""Chart specs: what a page hands to static/console.js, which draws them with uPlot.

A spec is plain JSON embedded in the page (`<script type="application/json"
class="chart">`), so the static reports carry their data inline and the browser
tests read exactly what was drawn (`window.fleetCharts[id].spec`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

LINE, BAR, POINTS = "line", "bar", "points"


@dataclass(frozen=True)
class Series:
    label: str
    values: list[float | None]


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    kind: str  # line | bar | points
    x: list[float]
    series: list[Series]
    xlabels: list[str] = field(default_factory=list)  # categories: x is 0..n-1
    xtime: bool = False  # x is epoch seconds
    xlabel: str = ""
    ylabel: str = ""
    notes: list[str] = field(default_factory=list)  # one per x, shown in the legend

    def to_json(self) -> str:
        # "</" never ends the <script> element the spec is embedded in
        return json.dumps(asdict(self), separators=(",", ":")).replace("</", "<\\/")


def bars(
    chart_id: str,
    title: str,
    counts: Sequence[tuple[str, int]],
    *,
    label: str = "devices",
    xlabel: str = "",
) -> Chart:
    """One bar per category (devices by version, by state…)."""
    return grouped_bars(
        chart_id,
        title,
        [c for c, _ in counts],
        {label: [float(n) for _, n in counts]},
        xlabel=xlabel,
    )


def grouped_bars(
    chart_id: str,
    title: str,
    categories: Sequence[str],
    series: Mapping[str, list[float | None]],
    *,
    xlabel: str = "",
) -> Chart:
    """Several series side by side over the same categories (devices per state per stage)."""
    return Chart(
        id=chart_id,
        title=title,
        kind=BAR,
        x=[float(i) for i in range(len(categories))],
        xlabels=list(categories),
        series=[Series(k, list(v)) for k, v in series.items()],
        xlabel=xlabel,
    )


def over_time(
    chart_id: str,
    title: str,
    times: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    *,
    ylabel: str = "",
) -> Chart:
    return Chart(
        id=chart_id,
        title=title,
        kind=LINE,
        x=[float(t) for t in times],
        xtime=True,
        series=[Series(k, list(v)) for k, v in series.items()],
        ylabel=ylabel,
    )


def scatter(
    chart_id: str,
    title: str,
    points: Sequence[tuple[float, float | None, str]],
    *,
    xlabel: str,
    ylabel: str,
    label: str,
) -> Chart:
    """Points (x, y, note) sorted by x, e.g. variants by size and accuracy."""
    ordered = sorted(points, key=lambda p: p[0])
    return Chart(
        id=chart_id,
        title=title,
        kind=POINTS,
        x=[p[0] for p in ordered],
        series=[Series(label, [p[1] for p in ordered])],
        xlabel=xlabel,
        ylabel=ylabel,
        notes=[p[2] for p in ordered],
    )


def histogram(
    chart_id: str, title: str, bounds_ms: Sequence[float], counts: dict[str, Sequence[int]]
) -> Chart:
    """Latency histograms sharing buckets: one series per variant."""
    labels = [f"≤{b:g}" for b in bounds_ms]
    width = max((len(c) for c in counts.values()), default=len(labels))
    labels += ["more"] * (width - len(labels))
    return Chart(
        id=chart_id,
        title=title,
        kind=BAR,
        x=[float(i) for i in range(width)],
        xlabels=labels[:width],
        series=[Series(k, [float(n) for n in v]) for k, v in counts.items()],
        xlabel="latency (ms)",
        ylabel="predictions",
    )


def spec_of(value: Any) -> dict[str, Any]:
    """The JSON form of a chart (for tests and reports)."""
    return asdict(value) if isinstance(value, Chart) else dict(value)
