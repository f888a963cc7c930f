"""The coordinator's `flower-superlink`, and the `flwr` CLI calls that drive it.

`SuperLink.start()` runs Flower's SuperLink (one HTTPS port on 1.41: Fleet API
for SuperNodes, Control API for `flwr`, runtime API for the ServerApp) with TLS
from `cloud.fl.tls`, SuperNode authentication, its own state database,
runtime dependency installation off and telemetry off, and waits for /health.
A private FLWR_HOME holds the one connection `flwr` uses to reach it.
`simulation=True` starts a simulation-runtime SuperLink instead (loopback,
no TLS: the simulator's and benchmarks' own, never the devices').
"""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.cloud.fl.tls import TlsFiles
from edgefleet.protos.errors import FleetError, InvalidArgument, NotFound, Unavailable
from edgefleet.protos.flower import FlowerProcess, find_flower, flower_env, free_port

logger = logging.getLogger(__name__)

CONNECTION = "fleet"
CLI_TIMEOUT = 60.0


@dataclass(frozen=True)
class SuperLinkOptions:
    state_dir: Path  # database, log, FLWR_HOME
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free one
    tls: TlsFiles | None = None  # None only with simulation
    simulation: bool = False
    num_supernodes: int = 0  # simulation
    client_cpus: int = 1  # simulation: CPUs Ray gives each simulated client


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))


class SuperLink:
    def __init__(self, options: SuperLinkOptions) -> None:
        if options.tls is None and not options.simulation:
            raise InvalidArgument("a deployment SuperLink needs TLS files (ensure_tls)")
        self.options = options
        self.port = options.port or free_port(options.host)
        self.flwr_home = options.state_dir / "flwr-home"
        self._proc: FlowerProcess | None = None

    @property
    def address(self) -> str:
        return f"{self.options.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    @property
    def log_path(self) -> Path:
        return self.options.state_dir / "superlink.log"

    def _write_connection(self) -> None:
        o = self.options
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
        lines.append(f'address = "{self.address}"')
        if o.tls is not None:
            lines.append(f"root-certificates = {json.dumps(str(o.tls.ca_cert))}")
        else:
            lines.append("insecure = true")
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def start(self, *, timeout: float = 60.0) -> None:
        if self.running:
            return
        o = self.options
        self._write_connection()
        argv = [
            find_flower("flower-superlink"),
            "--host",
            o.host,
            "--port",
            str(self.port),
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
        ]
        # a state file either way: 1.41's in-memory database fails concurrent requests
        # now and then ("cannot commit transaction - SQL statements in progress")
        argv += ["--database", str(o.state_dir / "superlink.db")]
        if o.simulation:
            argv += ["--simulation", "--insecure"]
        else:
            assert o.tls is not None
            argv += [
                "--ssl-ca-certfile",
                str(o.tls.ca_cert),
                "--ssl-certfile",
                str(o.tls.server_cert),
                "--ssl-keyfile",
                str(o.tls.server_key),
                "--enable-supernode-auth",
            ]
        self._proc = FlowerProcess(argv, env=flower_env(self.flwr_home), log_path=self.log_path)
        self._proc.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._proc.running:
                tail = self._proc.log_tail()
                self._proc = None
                raise Unavailable(f"flower-superlink on {self.address} exited: {tail}")
            if self.healthy():
                logger.info("SuperLink ready on %s (pid %s)", self.address, self.pid)
                return
            time.sleep(0.2)
        self.stop()
        raise Unavailable(f"flower-superlink on {self.address} not healthy within {timeout:g}s")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def healthy(self) -> bool:
        scheme = "https" if self.options.tls else "http"
        ctx = None
        if self.options.tls is not None:
            ctx = ssl.create_default_context(cafile=str(self.options.tls.ca_cert))
        try:
            with urllib.request.urlopen(
                f"{scheme}://{self.address}/health", timeout=1.0, context=ctx
            ) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None

    # -- flwr CLI ---------------------------------------------------------------------

    def flwr(self, *args: str, timeout: float = CLI_TIMEOUT) -> dict[str, Any]:
        """`flwr ARGS… --format json` against this SuperLink; its JSON answer."""
        argv = [find_flower("flwr"), *args, "--format", "json"]
        try:
            p = subprocess.run(
                argv,
                env=flower_env(self.flwr_home),
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise Unavailable(f"flwr {args[0]} did not answer within {timeout:g}s") from None
        out = _json_tail(p.stdout)
        if p.returncode != 0 or not out.get("success", False):
            detail = out.get("error-message") or (p.stderr or p.stdout).strip()[-400:]
            raise Unavailable(f"flwr {' '.join(args[:2])} failed (exit {p.returncode}): {detail}")
        return out

    def submit(self, app_dir: Path, run_config: dict[str, Any]) -> int:
        """Start a run of the Flower App in `app_dir`; Flower's run id."""
        overrides = self.options.state_dir / "runs" / f"run-config-{time.time_ns()}.toml"
        overrides.parent.mkdir(parents=True, exist_ok=True)
        overrides.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))
        args = ["run", str(app_dir), CONNECTION, "--run-config", str(overrides)]
        if self.options.simulation:
            o = self.options
            args += [
                "--federation-config",
                f"num-supernodes={o.num_supernodes} client-resources-num-cpus={o.client_cpus}",
            ]
        try:
            out = self.flwr(*args)
        finally:
            overrides.unlink(missing_ok=True)
        return int(out["run-id"])

    def run_status(self, run_id: int) -> str:
        """Flower's status of a run, e.g. 'running', 'finished:completed', 'finished:failed';
        'unknown' when the SuperLink could not say this time (it answers 500 now and then)."""
        try:
            out = self.flwr("ls", CONNECTION, "--run-id", str(run_id))
        except Unavailable as e:
            logger.info("status of Flower run %d unavailable: %s", run_id, e)
            return "unknown"
        runs = out.get("runs") or []
        if not runs:
            raise NotFound(f"Flower run {run_id} not found on the SuperLink")
        return str(runs[0].get("status", ""))

    def run_log(self, run_id: int, lines: int = 15) -> str:
        """The last `lines` of a run's ServerApp log (`flwr log --show`), for error messages."""
        try:
            p = subprocess.run(
                [find_flower("flwr"), "log", str(run_id), CONNECTION, "--show"],
                env=flower_env(self.flwr_home),
                capture_output=True,
                text=True,
                timeout=CLI_TIMEOUT,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except (subprocess.TimeoutExpired, OSError) as e:
            return f"(no log: {e})"
        kept = [ln for ln in p.stdout.splitlines() if ln.strip()]
        return "\n".join(kept[-lines:])

    def stop_run(self, run_id: int) -> None:
        try:
            self.flwr("stop", str(run_id), CONNECTION)
        except FleetError as e:
            logger.info("stopping Flower run %d: %s", run_id, e)

    def register_node(self, public_key: str, name: str) -> int:
        """Register a SuperNode's public key (OpenSSH); the node id Flower gives it."""
        path = self.options.state_dir / "keys" / f"{name}.pub"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(public_key.strip() + "\n")
        out = self.flwr("supernode", "register", str(path), CONNECTION, "--name", name)
        return int(out["node-id"])

    def nodes(self) -> list[dict[str, Any]]:
        out = self.flwr("supernode", "ls", CONNECTION)
        return list(out.get("nodes") or [])


def _json_tail(text: str) -> dict[str, Any]:
    """The JSON object `flwr --format json` prints (it may follow other lines)."""
    start = text.find("{")
    while start >= 0:
        try:
            value = json.loads(text[start:])
            return value if isinstance(value, dict) else {}
        except ValueError:
            start = text.find("{", start + 1)
    return {}
