"""AgentSettings: the one place the agent reads its environment (FLEET_AGENT_*)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_AGENT_", extra="ignore")

    device_id: str = Field(description="enrolled device id")
    state_dir: Path = Field(
        default=Path("/var/lib/edgefleet"), description="models, downloads, spool"
    )
    broker_url: str = Field(description="mqtt://host:port or mqtts://host:port")
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    public_key_pem: str = Field(description="the coordinator's Ed25519 signing key (PEM)")
    topic_prefix: str = "ef/v1"
    listen: str = Field(
        default="127.0.0.1:50051", description="InferenceService address; empty: off"
    )
    telemetry_interval: float = 10.0
    group: str = ""
    tags: dict[str, str] = Field(default_factory=dict)
