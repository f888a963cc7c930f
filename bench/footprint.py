"""Agent footprint (issue 16): the real `fleet-agent run` process, and a fresh ONNX-only install.

1. RSS of a real `fleet-agent run` process (plain MQTT to a local broker, gRPC
   InferenceService on, telemetry every hour) connected and idle, before and after
   the coordinator deployed a ~1 MB model to it (downloaded, verified, self-tested,
   active). Target: ≤ 64 MB with the model. The process is started through a tiny
   wrapper that only adds a thread that dumps `sys.modules` when asked (after the RSS is read), so the figure is
   the real command's, and the modules it holds are listed. Then the same with no
   `listen` address (no local server: grpc is never imported).
2. Where that RSS goes: a fresh interpreter imports the third-party packages the
   real process holds, one after another in a fixed order, then the agent's own
   modules, then opens an ONNX Runtime session on the same model; the RSS growth of
   each step (cumulative order: shared dependencies count where first imported).
3. Installed size of `pip install packaging/agent` (no extras: ONNX only, no gRPC) into a
   fresh venv, with the biggest distributions. Target: ≤ 150 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._table import Table

RSS_TARGET_MB = 64.0
INSTALL_TARGET_MB = 150.0

#: `python -c MODULES_WRAPPER OUT fleet-agent-args…`: the real agent CLI, which writes its
#: sys.modules to OUT once OUT.req exists (tests/e2e/test_agent_footprint.py uses it too)
MODULES_WRAPPER = r"""
import os, sys, threading, time
out = sys.argv.pop(1)
def _dump():
    while not os.path.exists(out + ".req"):
        time.sleep(0.2)
    with open(out + ".tmp", "w") as f:
        f.write("\n".join(sorted(sys.modules)))
    os.replace(out + ".tmp", out)
threading.Thread(target=_dump, daemon=True).start()
sys.argv[0] = "fleet-agent"
from edgefleet.agent.cli import main
main()
"""

# packages the agent may hold, in the order the breakdown imports them
_ORDER = (
    "google.protobuf",
    "pydantic",
    "pydantic_settings",
    "typer",
    "rich",
    "paho",
    "cryptography",
    "numpy",
    "psutil",
    "grpc",
    "onnxruntime",
    "ai_edge_litert",
    "yaml",
    "sqlalchemy",
    "torch",
)

_BREAKDOWN = r"""
import importlib, json, sys, gc
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
steps = [("python + stdlib the agent uses", rss())]
for name in ("asyncio", "json", "logging", "ssl", "hashlib", "sqlite3", "concurrent.futures"):
    importlib.import_module(name)
steps.append(("stdlib (asyncio, ssl, logging, ...)", rss()))
for group, names in json.loads(sys.argv[1]):
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            pass
    gc.collect()
    steps.append((group, rss()))
import edgefleet.agent.agent, edgefleet.agent.cli
for name in json.loads(sys.argv[3]):
    try:
        importlib.import_module(name)
    except Exception:
        pass
gc.collect()
steps.append(("edgefleet.agent (own modules)", rss()))
import onnxruntime as ort
data = open(sys.argv[2], "rb").read()
s = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
del data
gc.collect()
steps.append(("ONNX Runtime session on the 1 MB model", rss()))
print(json.dumps(steps))
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("footprint")
    g.add_argument(
        "--footprint-install",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure a fresh venv install of packaging/agent (default on)",
    )


def _rss_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(line.split()[1])
    return out


async def _real_agent(
    client: Any, home: Path, root: Path, model: Any, *, listen: bool = True
) -> dict[str, Any]:
    from bench.fanout import coordinator
    from edgefleet.agent.config import AgentSettings, write_config
    from edgefleet.cloud.broker import ManagedBroker
    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.devices import DeviceStore, Selector
    from edgefleet.protos.flower import free_port

    settings = load_settings(home=home)
    bdir = root / "broker"
    bdir.mkdir(parents=True)
    os.chmod(bdir, 0o777)
    devices = DeviceStore(f"sqlite:///{root / 'devices.db'}")
    dev = "rss-0"
    devices.enroll(dev)
    result: dict[str, Any] = {}
    with ManagedBroker(bdir, persistence=False) as broker:
        config = root / "agent.json"
        write_config(
            config,
            AgentSettings(
                device_id=dev,
                state_dir=root / dev,
                broker_url=broker.url,
                public_key_pem=settings.public_key_path.read_text(),
                listen=f"127.0.0.1:{free_port()}" if listen else "",
                telemetry_interval=3600,
            ),
            force=True,
        )
        mods = root / "modules.txt"
        log = open(root / "agent.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [sys.executable, "-c", MODULES_WRAPPER, str(mods), "run", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        try:
            async with coordinator(client, settings, broker.url, devices) as coord:
                deadline = time.monotonic() + 120
                while not (await asyncio.to_thread(devices.get, dev)).online:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"agent never came online: {root / 'agent.log'}")
                    await asyncio.sleep(0.2)
                await asyncio.sleep(3)
                result["no_model"] = _rss_kb(proc.pid)
                outcome = await coord.deploy(model, Selector.parse(f"device={dev}"))
                settled = await coord.wait_settled(outcome, timeout=120)
                if settled[dev].state != "active":
                    raise RuntimeError(f"deploy ended {settled[dev].state}: {root / 'agent.log'}")
                await asyncio.sleep(5)
                result["model"] = _rss_kb(proc.pid)
                (root / "modules.txt.req").touch()
                while not mods.exists():
                    await asyncio.sleep(0.2)
                result["modules"] = mods.read_text().split()
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    devices.close()
    return result


def _breakdown(modules: list[str], model_path: Path) -> list[tuple[str, float]]:
    """Import, group by group, exactly the modules the real process held."""
    groups = []
    for top in _ORDER:
        names = [m for m in modules if m == top or m.startswith(top + ".")]
        if names:
            groups.append((top, names))
    own = [m for m in modules if m.startswith("edgefleet")]
    out = subprocess.run(
        [sys.executable, "-c", _BREAKDOWN, json.dumps(groups), str(model_path), json.dumps(own)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    steps = json.loads(out.stdout.strip().splitlines()[-1])
    return [(str(name), float(mb)) for name, mb in steps]


_SIZES = r"""
import json, os
from importlib.metadata import distributions
sizes = {}
for d in distributions():
    n = 0
    for f in d.files or []:
        try:
            n += f.locate().stat().st_size
        except OSError:
            pass
    sizes[d.metadata["Name"]] = n
print(json.dumps(sizes))
"""


def _du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                total += os.stat(p).st_size
    return total


def _fresh_install(root: Path) -> dict[str, Any]:
    """`pip install packaging/agent` into a new venv; its size and its biggest distributions."""
    repo = Path(__file__).resolve().parents[1]
    venv = root / "venv"
    base = Path(sys.base_prefix) / "bin" / "python3"
    subprocess.run([str(base), "-m", "venv", str(venv)], check=True, timeout=300)
    empty = _du(venv)
    cmd = [str(venv / "bin" / "pip"), "install", "-q", str(repo / "packaging" / "agent")]
    constraints = repo / "constraints.txt"
    if constraints.exists():
        cmd[3:3] = ["-c", str(constraints)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=900, capture_output=True)
    seconds = time.perf_counter() - t0
    total = _du(venv)
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", _SIZES],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    sizes: dict[str, int] = json.loads(out.stdout)
    return {"total": total, "empty": empty, "sizes": sizes, "seconds": seconds}


def run(args: argparse.Namespace) -> list[Table]:
    from bench.fanout import _version
    from edgefleet.cloud.registry import ModelRef

    home = Path(tempfile.mkdtemp(prefix="bench-footprint-"))
    client, mv = _version(home)
    variant = mv.variant("fp32")
    model_path = home / "model.onnx"
    model_path.write_bytes(client.pipeline.store.get(variant.sha256))
    real = asyncio.run(_real_agent(client, home, home / "real", ModelRef("big", 1)))
    quiet = asyncio.run(
        _real_agent(client, home, home / "no-listen", ModelRef("big", 1), listen=False)
    )
    client.close()

    rss_mb = real["model"]["VmRSS"] / 1024
    t = Table(
        f"agent footprint: a real `fleet-agent run` process, {variant.size / 1e6:.2f} MB model",
        ["what", "measured", "target", "result"],
    )
    t.add(
        "idle RSS, connected, no model",
        f"{real['no_model']['VmRSS'] / 1024:.1f} MB",
        "-",
        "",
    )
    ok = rss_mb <= RSS_TARGET_MB
    t.add(
        "idle RSS, model active, gRPC server on",
        f"{rss_mb:.1f} MB",
        f"<= {RSS_TARGET_MB:.0f} MB",
        "PASS" if ok else "MISS",
    )
    t.misses += int(not ok)
    quiet_mb = quiet["model"]["VmRSS"] / 1024
    ok = quiet_mb <= RSS_TARGET_MB
    t.add(
        "idle RSS, model active, no listen (gRPC server off)",
        f"{quiet_mb:.1f} MB",
        f"<= {RSS_TARGET_MB:.0f} MB",
        "PASS" if ok else "MISS",
    )
    t.misses += int(not ok)
    held = {n.split(".")[0] for n in quiet["modules"]}
    t.notes.append(
        f"  with no listen the process holds grpc: {'yes' if 'grpc' in held else 'no'}, "
        f"psutil: {'yes' if 'psutil' in held else 'no'}"
    )
    m = real["model"]
    t.notes.append(
        f"  of which anonymous {m.get('RssAnon', 0) / 1024:.1f} MB, file-backed (shared libraries) "
        f"{m.get('RssFile', 0) / 1024:.1f} MB"
    )
    top = {n.split(".")[0] for n in real["modules"]}
    third = sorted(
        top & {o.split(".")[0] for o in _ORDER} | ({"google"} & top),
    )
    t.notes.append(f"  third-party packages held by the idle process: {', '.join(third)}")

    steps = _breakdown(real["modules"], model_path)
    b = Table(
        "agent RSS by import (fresh interpreter, cumulative, the packages the real process holds)",
        ["step", "RSS after MB", "added MB"],
    )
    prev = 0.0
    for name, mb in steps:
        b.add(name, f"{mb:.1f}", f"{mb - prev:+.1f}" if prev else "")
        prev = mb
    b.notes.append(
        "  each step imports the modules of that package the real idle process held; its figure "
        "includes what it pulls in that no earlier step loaded (numpy before onnxruntime)"
    )
    tables = [t, b]

    if args.footprint_install:
        inst = _fresh_install(home / "install")
        total_mb = inst["total"] / 1e6
        s = Table(
            "agent install: `pip install packaging/agent` (ONNX only, no extras) into a fresh venv",
            ["what", "MB", "target", "result"],
        )
        ok = total_mb <= INSTALL_TARGET_MB
        s.add(
            "whole venv", f"{total_mb:.0f}", f"<= {INSTALL_TARGET_MB:.0f}", "PASS" if ok else "MISS"
        )
        s.misses += int(not ok)
        pip = inst["sizes"].get("pip", 0)
        s.add("  of which pip (agent updates install with it)", f"{pip / 1e6:.0f}", "", "")
        tooling = sum(inst["sizes"].get(n, 0) for n in ("setuptools", "wheel"))
        s.add("  of which setuptools (not used by the agent)", f"{tooling / 1e6:.0f}", "", "")
        s.add(
            "  empty venv (python links, activate scripts, pip)",
            f"{inst['empty'] / 1e6:.0f}",
            "",
            "",
        )
        for name, size in sorted(inst["sizes"].items(), key=lambda kv: -kv[1])[:10]:
            s.add(f"  {name}", f"{size / 1e6:.1f}", "", "")
        s.notes.append(f"  pip install took {inst['seconds']:.0f} s (local wheel mirror)")
        tables.append(s)
    return tables
