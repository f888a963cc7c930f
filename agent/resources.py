"""What the agent process uses of the machine (Linux /proc; 0 where unavailable)."""

from __future__ import annotations


def rss_bytes() -> int:
    """Resident memory of this process, in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
