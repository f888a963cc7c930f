"""The ServerApp's report to the coordinator: JSON lines appended to events.jsonl.

Events: ``{"event": "participants", ...}``, one ``{"event": "round", ...}`` per
round, then ``{"event": "done", ...}`` or ``{"event": "failed", "reason": ...}``.
numpy/json only, so the coordinator reads it without Flower.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FINAL_EVENTS = ("done", "failed")


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> None:
        """Append one event, stamped with wall-clock time `t` (seconds since the epoch)."""
        record = {"event": event, "t": round(time.time(), 3), **fields}
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def failures_recorded(journal: Journal) -> Iterator[None]:
    """End a ServerApp's work with a ``failed`` event instead of an exception: ours
    (FleetError), Flower's strategies and DP wrappers rejecting settings (ValueError),
    files (OSError)."""
    from edgefleet.protos.errors import FleetError

    try:
        yield
    except (FleetError, ValueError, OSError) as e:
        journal.write("failed", reason=f"{type(e).__name__}: {e}", kind=type(e).__name__)
        logger.error("federated run failed: %s", e)


def read_events(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete lines after byte `offset`, and the offset after the last one."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    events = []
    for raw in data[: end + 1].splitlines():
        if raw.strip():
            try:
                events.append(json.loads(raw))
            except ValueError:
                events.append({"event": "garbled", "line": raw[:200].decode(errors="replace")})
    return events, offset + end + 1
