"""CloudSettings: the one place the coordinator reads its environment.

Precedence: CLI flag > environment (FLEET_*) > FLEET_HOME/config.toml > defaults.
Defaults need nothing installed: SQLite and a file:// store under FLEET_HOME.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomllib
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from protos.errors import InvalidArgument

CONFIG_FILE = "config.toml"


class CloudSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore")

    home: Path = Field(default=Path("~/.edgefleet"), description="state folder (FLEET_HOME)")
    db_url: str = Field(default="", description="registry database URL (FLEET_DB_URL)")
    artifact_uri: str = Field(default="", description="artifact store URI (FLEET_ARTIFACT_URI)")
    s3_endpoint_url: str = Field(default="", description="S3 endpoint (FLEET_S3_ENDPOINT_URL)")

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
    merged.update({k: getattr(env, k) for k in known if getattr(env, k)})
    return CloudSettings(home=env.home, **merged)


def write_config(settings: CloudSettings) -> Path:
    path = settings.home_dir / CONFIG_FILE
    lines = ["# edgefleet coordinator settings; FLEET_* variables and flags override these"]
    for key in ("db_url", "artifact_uri", "s3_endpoint_url"):
        value = getattr(settings, key)
        if value:
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'{key} = "{escaped}"')
    path.write_text("\n".join(lines) + "\n")
    return path
