"""Agent releases: the agent's wheels for one platform, signed and rolled out like a model.

An agent release is stored in the model registry as a version of the reserved model
`edgefleet-agent` with one variant per platform (`uname -m`: x86_64, aarch64, armv7l).
The variant's artifact is an uncompressed tar of the wheels (deterministic: sorted
names, zero times), and its signed manifest has ``kind = "agent"`` and
``labels["agent_version"]``. Everything after publishing is the model path: the
artifact store, the chunked distribution, the staged rollout (``fleet rollouts create
edgefleet-agent:N``), its gates and rollback. The device side is `agent/selfupdate.py`.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.cloud.artifacts import ArtifactStore
from edgefleet.cloud.registry import ModelRef, ModelVersion, RegistryStore
from edgefleet.cloud.registry.entities import Lineage, NewVariant, NewVersion
from edgefleet.protos.errors import InvalidArgument, NotFound
from edgefleet.protos.manifest import AGENT_KIND, Manifest, sign_manifest

#: the registry's model name for agent releases
AGENT_MODEL = "edgefleet-agent"
AGENT_WHEEL = re.compile(r"edgefleet_agent-([^-]+)-py3-none-any\.whl")
_PLATFORM = re.compile(r"[a-z0-9_]{2,32}")  # uname -m
_VERSION = re.compile(r"[0-9][0-9A-Za-z.+!-]{0,63}")


@dataclass(frozen=True)
class AgentRelease:
    """One published agent release for one platform."""

    ref: str  # edgefleet-agent:N (what `fleet rollouts create` takes)
    version: int
    agent_version: str
    platform: str
    sha256: str
    size: int
    wheels: tuple[str, ...]


def is_agent_release(model: str) -> bool:
    return model == AGENT_MODEL


def pack(directory: Path, *, agent_version: str) -> tuple[bytes, tuple[str, ...]]:
    """The release tar of the wheels in `directory`; it must hold the agent wheel of
    `agent_version` (its dependencies' wheels are optional: a device reuses the ones
    its running agent has)."""
    if not _VERSION.fullmatch(agent_version):
        raise InvalidArgument(f"agent version {agent_version!r} is not a version (e.g. 0.3.0)")
    wheels = sorted(directory.glob("*.whl")) if directory.is_dir() else []
    if not wheels:
        raise NotFound(f"no wheels in {directory} (build them: fleet-agent wheelhouse, make dist)")
    agents = {m.group(1): w for w in wheels if (m := AGENT_WHEEL.fullmatch(w.name))}
    if agent_version not in agents:
        raise InvalidArgument(
            f"{directory} holds no edgefleet_agent-{agent_version}-py3-none-any.whl; "
            f"agent wheels there: {', '.join(sorted(agents)) or 'none'}"
        )
    if len(agents) > 1:
        raise InvalidArgument(
            f"{directory} holds agent wheels of versions {', '.join(sorted(agents))}: keep one"
        )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for w in wheels:
            info = tarfile.TarInfo(w.name)
            data = w.read_bytes()
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), tuple(w.name for w in wheels)


def publish(
    registry: RegistryStore,
    store: ArtifactStore,
    key: Ed25519PrivateKey,
    directory: Path,
    *,
    agent_version: str,
    platform: str,
) -> AgentRelease:
    """Store and sign the release; a new registry version of `edgefleet-agent`."""
    if not _PLATFORM.fullmatch(platform):
        raise InvalidArgument(
            f"platform {platform!r} is not a machine name as `uname -m` prints it "
            "(x86_64, aarch64, armv7l)"
        )
    data, wheels = pack(directory, agent_version=agent_version)
    sha = store.put(data).sha256
    assert sha == hashlib.sha256(data).hexdigest()
    new = NewVersion(
        arch="agent-release",
        inputs=(),
        outputs=(),
        classes=(),
        metrics={},
        lineage=Lineage(
            source="agent-release",
            code_version=agent_version,
            origin={"platform": platform, "agent_version": agent_version, "wheels": list(wheels)},
        ),
        checkpoint_sha256=None,
        evalset_sha256=None,
    )

    def variants(version: int) -> Sequence[NewVariant]:
        manifest = Manifest(
            model=AGENT_MODEL,
            version=version,
            variant=platform,
            runtime="",
            sha256=sha,
            size=len(data),
            inputs=(),
            outputs=(),
            created_at_ms=int(time.time() * 1000),
            labels={"agent_version": agent_version},
            kind=AGENT_KIND,
        )
        return [
            NewVariant(
                name=platform,
                runtime=AGENT_KIND,
                sha256=sha,
                size=len(data),
                accuracy=None,
                latency_ms={},
                quantization={"agent_version": agent_version},
                deployable=True,
                reason="",
                signed_manifest=sign_manifest(manifest, key).to_bytes(),
            )
        ]

    mv = registry.create_version(AGENT_MODEL, new, variants)
    return _release(mv)


def list_releases(registry: RegistryStore) -> list[AgentRelease]:
    """Published agent releases, oldest first (none: an empty list)."""
    try:
        return [_release(mv) for mv in registry.list_versions(AGENT_MODEL)]
    except NotFound:
        return []


def get_release(registry: RegistryStore, version: int) -> AgentRelease:
    return _release(registry.get_version(ModelRef(AGENT_MODEL, version)))


def _release(mv: ModelVersion) -> AgentRelease:
    v = mv.variants[0]
    origin = mv.lineage.origin
    return AgentRelease(
        ref=mv.ref,
        version=mv.version,
        agent_version=str(origin.get("agent_version", "")),
        platform=v.name,
        sha256=v.sha256,
        size=v.size,
        wheels=tuple(str(w) for w in origin.get("wheels", ())),
    )


__all__ = [
    "AGENT_MODEL",
    "AgentRelease",
    "get_release",
    "is_agent_release",
    "list_releases",
    "pack",
    "publish",
]
