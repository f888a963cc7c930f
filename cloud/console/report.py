"""Static reports: the console's rollout and model version pages as one HTML file.

Styles, uPlot and the chart data are inlined, so the file opens anywhere without a
server or a network (attach it to a ticket). `fleet report rollout ID --html FILE`
and `fleet models show REF --html FILE` write them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgefleet.cloud.console import pages
from edgefleet.cloud.console.app import templates
from edgefleet.cloud.registry import ModelVersion
from edgefleet.cloud.rollouts.model import Rollout, RolloutDevice
from edgefleet.protos.errors import Unavailable

#: the vendored uPlot (cloud/console/static/VENDORED.md)
UPLOT_VERSION = "1.6.32"


def _render(name: str, context: dict[str, Any]) -> str:
    return (
        templates()
        .get_template(name)
        .render(
            standalone=True,
            caller=None,
            can_operate=False,
            refresh_s=0,
            path="",
            live_url="",
            made_at=pages.when(time.time()) + " UTC",
            uplot_version=UPLOT_VERSION,
            **context,
        )
    )


def rollout_html(r: Rollout, devices: Sequence[RolloutDevice], *, now: float | None = None) -> str:
    counts = pages.rollout_counts(devices)
    return _render("rollout.html", pages.rollout_page(r, counts, devices=devices, now=now))


def version_html(mv: ModelVersion) -> str:
    return _render("version.html", pages.version_page(mv))


def write_html(path: Path, html: str) -> Path:
    """Write `html` to `path` ('-': stdout is the caller's business)."""
    try:
        path.write_text(html, encoding="utf-8")
    except OSError as e:
        raise Unavailable(f"cannot write the report to {path}: {e.strerror or e}") from e
    return path
