"""AgentSettings: the one place the agent reads its environment (FLEET_AGENT_*) and its
config file (written by `fleet-agent enroll` from an enrolment bundle)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

#: where the local InferenceService listens unless told otherwise
DEFAULT_LISTEN = "127.0.0.1:50051"


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_AGENT_", extra="ignore")

    device_id: str = Field(description="enrolled device id")
    state_dir: Path = Field(
        default=Path("/var/lib/edgefleet"), description="models, downloads, spool"
    )
    broker_url: str = Field(description="mqtt://host:port or mqtts://host:port")
    broker_urls: list[str] = Field(
        default_factory=list,
        description="further brokers of the fleet (a cluster's nodes), tried in order "
        "when the current one cannot be reached",
    )
    mqtt_version: str = Field(
        default="auto", description="auto (5, else 3.1.1), 5 or 3.1.1 (docs/protocol.md)"
    )
    username: str | None = None
    password: str | None = None
    ca_file: str | None = Field(default=None, description="CA of the broker (mqtts://)")
    cert_file: str | None = Field(default=None, description="this device's client certificate")
    key_file: str | None = Field(default=None, description="its private key (mode 0600)")
    public_key_pem: str = Field(description="the coordinator's Ed25519 signing key (PEM)")
    root_public_key_pem: str = Field(
        default="", description="the fleet's root key (PEM): key lists signed by it are taken"
    )
    key_list: str = Field(default="", description="the enrolment key list (base64 SignedKeyList)")
    topic_prefix: str = "ef/v1"
    listen: str = Field(default=DEFAULT_LISTEN, description="InferenceService address; empty: off")
    telemetry_interval: float = 10.0
    switch_deadline_s: float = Field(
        default=60.0,
        gt=0,
        description="seconds a new agent version has to become healthy (connected, serving "
        "the active model) after a switch; else the running version takes over again",
    )
    telemetry_ack_timeout: float = Field(
        default=30.0,
        gt=0,
        description="seconds a sent telemetry window waits for the coordinator's ack "
        "before it is sent again (doubling per window up to 600 s)",
    )
    telemetry_spool_max: int = Field(
        default=10_000, ge=1, description="unacknowledged windows kept on disk (oldest dropped)"
    )
    inference_threads: int = Field(
        default=0,
        ge=0,
        description="ONNX Runtime intra-op threads per model; 0: one per core",
    )
    group: str = ""
    tags: dict[str, str] = Field(default_factory=dict)
    # federated learning (the bundle's "fl" part; the sidecar needs edgefleet-agent[fl]; non-mlp
    # checkpoints also torch)
    fl_superlink: str = Field(default="", description="SuperLink HOST:PORT; empty: FL off")
    fl_ca_pem: str = Field(default="", description="the SuperLink's CA certificate (PEM)")
    fl_private_key: str = Field(default="", description="this node's auth key (OpenSSH PEM)")
    fl_data_dir: Path | None = Field(
        default=None, description="local shard-*.npz training data (default STATE_DIR/data)"
    )


BUNDLE_FIELDS = ("device_id", "broker_url", "signing_public_key")
#: bundle field -> file under STATE_DIR/credentials (folder 0700, files 0600)
CREDENTIAL_FILES = {
    "ca_certificate": ("ca_file", "ca.pem"),
    "client_certificate": ("cert_file", "client.pem"),
    "client_key": ("key_file", "client.key"),
}


def store_credentials(bundle: dict[str, Any], directory: Path) -> dict[str, str]:
    """Write the bundle's CA, client certificate and key as files; {setting: path}."""
    from edgefleet.protos.errors import InvalidArgument

    paths: dict[str, str] = {}
    for field, (setting, name) in CREDENTIAL_FILES.items():
        pem = bundle.get(field)
        if not pem:
            continue
        if not isinstance(pem, str) or "-----BEGIN " not in pem or len(pem) > 64 * 1024:
            raise InvalidArgument(f"enrolment bundle field {field} is not a PEM text")
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        path = directory / name
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pem)
        os.replace(tmp, path)
        paths[setting] = str(path)
    if ("cert_file" in paths) != ("key_file" in paths):
        raise InvalidArgument("enrolment bundle has a client certificate or key without the other")
    return paths


def config_from_bundle(data: bytes, *, state_dir: Path, listen: str) -> AgentSettings:
    """Validate an enrolment bundle (JSON from `fleet devices enroll`)."""
    from edgefleet.protos.errors import InvalidArgument
    from edgefleet.protos.manifest import load_public_key
    from edgefleet.protos.transport import MqttVersion

    try:
        bundle = json.loads(data)
    except ValueError as e:
        raise InvalidArgument(f"enrolment bundle is not JSON: {e}") from None
    if not isinstance(bundle, dict):
        raise InvalidArgument("enrolment bundle must be a JSON object")
    urls = bundle.get("broker_urls") or []
    if not isinstance(urls, list) or not all(isinstance(u, str) and u for u in urls):
        raise InvalidArgument(
            f"enrolment bundle field broker_urls is {urls!r}; accepted: a list of broker URLs"
        )
    if urls and not bundle.get("broker_url"):
        bundle["broker_url"] = urls[0]
    missing = [k for k in BUNDLE_FIELDS if not bundle.get(k)]
    if missing:
        raise InvalidArgument(
            f"enrolment bundle lacks {', '.join(missing)}; needs {', '.join(BUNDLE_FIELDS)}"
        )
    load_public_key(str(bundle["signing_public_key"]).encode())  # fail now, not at first update
    MqttVersion.parse(str(bundle.get("mqtt_version") or "auto"))
    files = store_credentials(bundle, state_dir / "credentials")
    values: dict[str, Any] = {
        "device_id": bundle["device_id"],
        "broker_url": bundle["broker_url"],
        "broker_urls": [u for u in urls if u != bundle["broker_url"]],
        "mqtt_version": str(bundle.get("mqtt_version") or "auto"),
        "username": bundle.get("username") or None,
        "password": bundle.get("password") or None,
        "public_key_pem": bundle["signing_public_key"],
        "root_public_key_pem": bundle.get("root_public_key") or "",
        "key_list": bundle.get("key_list") or "",
        "topic_prefix": bundle.get("topic_prefix") or "ef/v1",
        "group": bundle.get("group") or "",
        "tags": bundle.get("tags") or {},
        "state_dir": state_dir,
        "listen": listen,
        **files,
    }
    fl = bundle.get("fl")
    if isinstance(fl, dict) and fl.get("superlink"):
        values["fl_superlink"] = str(fl["superlink"])
        values["fl_ca_pem"] = str(fl.get("ca_certificate") or "")
        values["fl_private_key"] = str(fl.get("private_key") or "")
    return _settings(values, "enrolment bundle")


#: what installs the local InferenceService's gRPC server (grpcio), an extra of the agent
SERVE_INSTALL = "pip install 'edgefleet-agent[serve]'"


def default_listen() -> str:
    """`DEFAULT_LISTEN` when grpcio is installed, else '' (no local server): a device
    installed without the `serve` extra enrols as it is. Checked without importing it."""
    return DEFAULT_LISTEN if importlib.util.find_spec("grpc") is not None else ""


def require_server(listen: str, what: str) -> None:
    """Fail when `listen` asks for the local InferenceService and grpcio is not installed.

    grpcio is the agent package's `serve` extra: an agent with no `listen` address never
    imports it (about 10 MB of RSS, 19 MB installed). Checked without importing it."""
    from edgefleet.protos.errors import InvalidArgument

    if listen and importlib.util.find_spec("grpc") is None:
        raise InvalidArgument(
            f"{what}: listen is {listen!r} (the local InferenceService), which needs grpcio, "
            f"and grpcio is not installed: install it with {SERVE_INSTALL} (offline: add "
            "--no-index --find-links WHEELHOUSE), or set listen to '' to run without the "
            "local server"
        )


def write_config(path: Path, settings: AgentSettings, *, force: bool) -> None:
    from edgefleet.protos.errors import AlreadyExists

    if path.exists() and not force:
        raise AlreadyExists(f"agent config {path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(settings.model_dump(mode="json"), f, indent=2)
    os.replace(tmp, path)


def load_config(path: Path) -> AgentSettings:
    """The config file, with FLEET_AGENT_* variables overriding it."""
    from edgefleet.protos.errors import InvalidArgument, NotFound

    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(
            f"agent config {path} not found: run 'fleet-agent enroll BUNDLE' first"
        ) from None
    except ValueError as e:
        raise InvalidArgument(f"agent config {path} is not JSON: {e}") from None
    env = {
        k: v
        for k, v in AgentSettings.model_fields.items()
        if f"FLEET_AGENT_{k.upper()}" in os.environ
    }
    for k in env:
        values.pop(k, None)  # let the environment win
    return _settings(values, f"agent config {path}")


def _settings(values: dict[str, Any], what: str) -> AgentSettings:
    from edgefleet.protos.errors import InvalidArgument

    try:
        return AgentSettings(**values)
    except ValidationError as e:
        first = e.errors()[0]
        raise InvalidArgument(
            f"{what}: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        ) from None
