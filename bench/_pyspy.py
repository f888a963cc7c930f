"""Sampling profiles of running processes with py-spy (optional: skipped when not installed).

py-spy samples without touching the process (ptrace), so the figures are those of
the real code path. Idle threads are not sampled (py-spy's default), so a sample
is CPU time spent in that stack; `seconds = samples / rate`.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

RATE = 100  # samples per second


def available() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


@dataclass
class Recording:
    proc: subprocess.Popen[bytes]
    path: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def record(pid: int, path: Path, *, subprocesses: bool = False) -> Recording | None:
    exe = available()
    if exe is None:
        return None
    cmd = [exe, "record", "--pid", str(pid), "--rate", str(RATE), "--format", "raw"]
    cmd += ["--nonblocking", "-o", str(path)]
    if subprocesses:
        cmd.append("--subprocesses")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Recording(proc, path)


def stacks(paths: Sequence[Path]) -> collections.Counter[str]:
    """Collapsed stacks (`frame;frame;... count`) summed over the recordings."""
    out: collections.Counter[str] = collections.Counter()
    for p in paths:
        if not p.exists():
            continue
        for line in p.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                out[stack] += int(count)
    return out


def phases(
    samples: collections.Counter[str], rules: Sequence[tuple[str, Sequence[str]]]
) -> dict[str, int]:
    """Samples per phase: a stack goes to the first rule with a marker in any of its frames."""
    out: dict[str, int] = collections.defaultdict(int)
    for stack, n in samples.items():
        for name, markers in rules:
            if any(m in stack for m in markers):
                out[name] += n
                break
        else:
            out["other"] += n
    return dict(out)


def top_frames(samples: collections.Counter[str], k: int = 8) -> list[tuple[str, int]]:
    """Innermost frames by self samples (file:line dropped, so a function counts once)."""
    own: collections.Counter[str] = collections.Counter()
    for stack, n in samples.items():
        leaf = stack.rsplit(";", 1)[-1]
        own[leaf.split(" (")[0] + " (" + leaf.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]] += n
    return own.most_common(k)


def threads(samples: collections.Counter[str]) -> list[tuple[str, int]]:
    """Samples per thread, by the outermost Python function it runs (its target)."""
    out: collections.Counter[str] = collections.Counter()
    for stack, n in samples.items():
        frames = [f.split(" (")[0] for f in stack.split(";")]
        named = [
            f for f in frames if not f.startswith(("Thread.", "_bootstrap", "process ", "thread "))
        ]
        name = named[0] if named else frames[0]
        out["main thread" if name in ("_run_module_as_main", "<module>") else name] += n
    return out.most_common()
