"""What the agent process uses of the machine (Linux /proc; 0 where unavailable)."""

from __future__ import annotations

import os

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident memory of this process, in bytes.

    From /proc/self/statm (one line of counters), not /proc/self/status: the same
    resident figure at half the cost, and `inference.load` reads it twice per model
    load (bench/fanout.py's profile showed the status read at ~3% of a device's update).
    """
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0
