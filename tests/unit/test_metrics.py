"""/metrics: the Prometheus text format, sources that fail, and the HTTP endpoint."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from edgefleet.cloud.metrics import (
    Family,
    MetricsRegistry,
    Sample,
    device_families,
    latency_families,
    render,
    serve_metrics,
)
from edgefleet.cloud.telemetry import Percentiles


@dataclass
class Dev:
    online: bool
    state: str
    active: dict[str, Any] = field(default_factory=dict)


def test_render_escapes_labels_and_formats_numbers() -> None:
    text = render(
        [
            Family(
                "x_total",
                "counter",
                "help text",
                [Sample("x_total", 3, (("k", 'a"b\\c\nd'),)), Sample("x_total", 0.25)],
            )
        ]
    )
    assert text.splitlines() == [
        "# HELP x_total help text",
        "# TYPE x_total counter",
        'x_total{k="a\\"b\\\\c\\nd"} 3',
        "x_total 0.25",
    ]


def test_device_and_latency_families() -> None:
    devs = [
        Dev(True, "active", {"model": "digits", "version": 2, "variant": "int8"}),
        Dev(True, "active", {"model": "digits", "version": 2, "variant": "int8"}),
        Dev(False, "failed", {"model": "digits", "version": 1, "variant": "fp16"}),
        Dev(False, "enrolled"),
    ]
    text = render(
        device_families(devs) + latency_families([Percentiles("digits", 2, 10, 100.0, 250.0, None)])
    )
    assert 'edgefleet_devices{status="online"} 2' in text
    assert 'edgefleet_devices{status="offline"} 2' in text
    assert 'edgefleet_devices_by_state{state="failed"} 1' in text
    assert 'edgefleet_devices_by_version{model="digits",version="2",variant="int8"} 2' in text
    assert 'edgefleet_inference_latency_us{model="digits",version="2",quantile="0.9"} 250' in text
    assert 'quantile="0.99"' not in text  # no value, no line


def test_a_failing_source_costs_only_its_own_lines_and_the_endpoint_serves() -> None:
    reg = MetricsRegistry()
    reg.add("good", lambda: [Family("up", "gauge", "up", [Sample("up", 1)])])

    def broken() -> list[Family]:
        raise RuntimeError("database away")

    reg.add("broken", broken)

    async def main() -> tuple[str, str, str]:
        server, port = await serve_metrics(reg, "127.0.0.1", 0)
        async with server:

            async def get(path: str, method: str = "GET") -> str:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                await w.drain()
                data = await r.read()
                w.close()
                return data.decode()

            return await get("/metrics"), await get("/nope"), await get("/metrics", "POST")

    ok, missing, post = asyncio.run(main())
    assert ok.startswith("HTTP/1.1 200 OK") and "text/plain; version=0.0.4" in ok
    assert "\nup 1\n" in ok and "edgefleet_scrape_errors_total 1" in ok
    assert missing.startswith("HTTP/1.1 404") and post.startswith("HTTP/1.1 405")
