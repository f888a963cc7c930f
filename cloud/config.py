"""CloudSettings: the one place the coordinator reads its environment.

Precedence: CLI flag > environment (FLEET_*) > FLEET_HOME/config.toml > defaults.
Defaults need nothing installed: SQLite and a file:// store under FLEET_HOME.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from edgefleet.cloud.broker import DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_INFLIGHT_BYTES
from edgefleet.protos.errors import InvalidArgument

CONFIG_FILE = "config.toml"
SERVE_FILE = "serve.json"
DEFAULT_MQTT_PORT = 1883
DEFAULT_GRPC_LISTEN = "127.0.0.1:7443"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"
DEFAULT_FL_LISTEN = "127.0.0.1:9092"


class CloudSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore")

    home: Path = Field(default=Path("~/.edgefleet"), description="state folder (FLEET_HOME)")
    db_url: str = Field(default="", description="registry database URL (FLEET_DB_URL)")
    artifact_uri: str = Field(default="", description="artifact store URI (FLEET_ARTIFACT_URI)")
    s3_endpoint_url: str = Field(default="", description="S3 endpoint (FLEET_S3_ENDPOINT_URL)")
    # `fleet serve`
    broker: str = Field(default="", description="external MQTT broker URL (FLEET_BROKER)")
    advertise_broker: str = Field(
        default="", description="broker URL devices are told to use (FLEET_ADVERTISE_BROKER)"
    )
    mqtt_listen: str = Field(
        default="",
        description="TLS listeners of the managed broker, HOST:PORT[,HOST:PORT] (FLEET_MQTT_LISTEN)",
    )
    mqtt_port: int = Field(
        default=DEFAULT_MQTT_PORT, ge=0, le=65535, description="managed broker port (0: free)"
    )
    mqtt_max_inflight: int = Field(
        default=DEFAULT_MAX_INFLIGHT,
        ge=1,
        le=65535,
        description="managed broker: QoS 1 messages in flight per client "
        "(FLEET_MQTT_MAX_INFLIGHT); bounds its memory during a broadcast",
    )
    mqtt_max_inflight_kb: int = Field(
        default=DEFAULT_MAX_INFLIGHT_BYTES // 1024,
        ge=0,
        description="managed broker: KiB in flight per client, 0: no byte limit "
        "(FLEET_MQTT_MAX_INFLIGHT_KB)",
    )
    grpc_listen: str = Field(default=DEFAULT_GRPC_LISTEN, description="FleetService address")
    grpc_tls: bool | None = Field(
        default=None, description="serve TLS; default: on unless the listener is loopback"
    )
    grpc_tls_cert: str = Field(default="", description="FleetService certificate (PEM)")
    grpc_tls_key: str = Field(default="", description="FleetService private key (PEM)")
    metrics_listen: str = Field(
        default=DEFAULT_METRICS_LISTEN, description="Prometheus /metrics address; empty: off"
    )
    ingest_workers: int = Field(
        default=0,
        ge=0,
        le=16,
        description="telemetry ingest worker processes; 0: ingest in the coordinator "
        "process (FLEET_INGEST_WORKERS)",
    )
    # coordinator replicas (`fleet serve --replica`, cloud.replicas)
    replica: bool = Field(default=False, description="run as one of several replicas")
    replica_id: str = Field(default="", max_length=64, description="this replica's name")
    lease_s: float = Field(
        default=10.0, ge=0.5, le=3600, description="leader lease in seconds (FLEET_LEASE_S)"
    )
    ui_listen: str = Field(
        default="", description="browser console address (cloud.console); empty: off"
    )
    ui_tls: bool | None = Field(
        default=None, description="serve the console over HTTPS; default: on unless loopback"
    )
    ui_tls_cert: str = Field(
        default="", description="console certificate (PEM); default: FleetService's or made"
    )
    ui_tls_key: str = Field(default="", description="console private key (PEM)")
    # federated learning (`fleet serve --fl`): the SuperLink devices' SuperNodes dial
    fl: bool = Field(default=False, description="run a Flower SuperLink (FLEET_FL)")
    fl_listen: str = Field(
        default=DEFAULT_FL_LISTEN, description="SuperLink address; port 0 picks a free one"
    )
    fl_advertise: str = Field(
        default="", description="SuperLink HOST:PORT devices are told (FLEET_FL_ADVERTISE)"
    )
    drift_threshold: float = Field(
        default=0.2, gt=0, description="PSI above which a drift alert opens (FLEET_DRIFT_THRESHOLD)"
    )
    drift_window: float = Field(
        default=600.0, gt=0, description="seconds of telemetry drift is scored over"
    )
    drift_interval: float = Field(
        default=30.0, gt=0, description="seconds between drift evaluations in `fleet serve`"
    )
    # operator CLI talking to a running coordinator
    coordinator: str = Field(default="", description="HOST:PORT of `fleet serve`")
    token: str = Field(default="", description="API token (FLEET_TOKEN)")
    ca: str = Field(default="", description="CA certificate FleetService is verified with")
    signing_passphrase: SecretStr | None = Field(
        default=None, description="passphrase of the signing key (FLEET_SIGNING_PASSPHRASE)"
    )

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def registry_url(self) -> str:
        return self.db_url or f"sqlite:///{self.home_dir / 'registry.db'}"

    @property
    def artifacts(self) -> str:
        return self.artifact_uri or (self.home_dir / "artifacts").as_uri()

    @property
    def signing_key_path(self) -> Path:
        return self.home_dir / "keys" / "signing.key"

    @property
    def public_key_path(self) -> Path:
        return self.home_dir / "keys" / "signing.pub"

    @property
    def keys_dir(self) -> Path:
        """Root key, online key, key list (cloud.keys)."""
        return self.home_dir / "keys"

    @property
    def token_path(self) -> Path:
        return self.home_dir / "keys" / "token"

    @property
    def identity_dir(self) -> Path:
        """The fleet CA and the MQTT credentials (cloud.identity)."""
        return self.home_dir / "keys" / "mqtt"

    @property
    def mqtt_listeners(self) -> list[tuple[str, int]]:
        out = []
        for item in filter(None, (x.strip() for x in self.mqtt_listen.split(","))):
            host, sep, port = item.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
                raise InvalidArgument(
                    f"--mqtt-listen {item!r} is not HOST:PORT; e.g. 0.0.0.0:8883 or 10.0.0.5:8883"
                )
            out.append((host.strip("[]"), int(port)))
        return out

    @property
    def passphrase(self) -> bytes | None:
        p = self.signing_passphrase
        return p.get_secret_value().encode() if p is not None and p.get_secret_value() else None

    @property
    def grpc_tls_dir(self) -> Path:
        return self.home_dir / "tls"

    @property
    def serve_path(self) -> Path:
        return self.home_dir / SERVE_FILE

    @property
    def broker_dir(self) -> Path:
        return self.home_dir / "broker"

    @property
    def fl_dir(self) -> Path:
        return self.home_dir / "fl"


@dataclass(frozen=True)
class ServeInfo:
    """What a running `fleet serve` writes to FLEET_HOME/serve.json for local CLI calls."""

    grpc: str  # HOST:PORT of FleetService
    broker_url: str  # where the coordinator itself connects
    advertise_broker: str  # what enrolment bundles tell devices
    pid: int
    metrics: str = ""  # http://HOST:PORT/metrics, empty when off
    fl_superlink: str = ""  # HOST:PORT devices' SuperNodes dial; "" when FL is off
    grpc_tls: bool = False  # FleetService serves TLS
    grpc_ca: str = ""  # path of the CA that signed its certificate, when the coordinator made it
    ui: str = ""  # http(s)://HOST:PORT/ of the browser console, empty when off
    ui_ca: str = ""  # path of the CA that signed the console's certificate, when made here

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        write_private(tmp, json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> ServeInfo | None:
        """The file's content if it names a live coordinator (its pid runs and its gRPC
        port answers), else None."""
        info = cls.load(path)
        if info is None:
            return None
        try:
            os.kill(info.pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, another user's
        # a live pid may be another program's now: the coordinator must answer on gRPC
        return info if info.answers() else None

    @classmethod
    def load(cls, path: Path) -> ServeInfo | None:
        """The file's content, alive or not; None when missing or unreadable."""
        try:
            d = json.loads(path.read_text())
            info = cls(
                grpc=str(d["grpc"]),
                broker_url=str(d["broker_url"]),
                advertise_broker=str(d.get("advertise_broker") or d["broker_url"]),
                pid=int(d["pid"]),
                metrics=str(d.get("metrics", "")),
                fl_superlink=str(d.get("fl_superlink") or ""),
                grpc_tls=bool(d.get("grpc_tls", False)),
                grpc_ca=str(d.get("grpc_ca") or ""),
                ui=str(d.get("ui") or ""),
                ui_ca=str(d.get("ui_ca") or ""),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return info

    def answers(self, timeout: float = 1.0) -> bool:
        """Whether a gRPC server completes a handshake at `grpc` within `timeout` (TLS with
        the coordinator's own CA when it serves TLS; a certificate the operator brought is
        checked by the client later, so then a TCP answer is enough here)."""
        import grpc

        if self.grpc_tls:
            try:
                ca = Path(self.grpc_ca).read_bytes() if self.grpc_ca else None
            except OSError:
                ca = None
            if ca is None:
                import socket

                host, _, port = self.grpc.rpartition(":")
                try:
                    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                        return True
                except (OSError, ValueError):
                    return False
            channel = grpc.secure_channel(
                self.grpc, grpc.ssl_channel_credentials(root_certificates=ca)
            )
        else:
            channel = grpc.insecure_channel(self.grpc)
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
            return True
        except grpc.FutureTimeoutError:
            return False
        finally:
            channel.close()


def load_settings(**overrides: Any) -> CloudSettings:
    """Build settings once (in the CLI callback), then pass them down."""
    given = {k: v for k, v in overrides.items() if v not in (None, "")}
    env = CloudSettings(**given)
    path = env.home_dir / CONFIG_FILE
    if not path.exists():
        return env
    try:
        stored = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, OSError) as e:
        raise InvalidArgument(f"{path}: not valid TOML: {e}") from e
    known = set(CloudSettings.model_fields) - {"home"}
    merged = {k: v for k, v in stored.items() if k in known}
    # env/flags win over the file: only fill what they left empty
    merged.update(
        {k: getattr(env, k) for k in known if k in env.model_fields_set or getattr(env, k)}
    )
    return CloudSettings(home=env.home, **merged)


def write_config(settings: CloudSettings) -> Path:
    path = settings.home_dir / CONFIG_FILE
    lines = ["# edgefleet coordinator settings; FLEET_* variables and flags override these"]
    for key in ("db_url", "artifact_uri", "s3_endpoint_url"):
        value = getattr(settings, key)
        if value:
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'{key} = "{escaped}"')
    write_private(path, "\n".join(lines) + "\n")
    return path


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only (0600, also when it existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
