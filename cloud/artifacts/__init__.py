"""Artifact stores, chosen by URI scheme (file:// default, s3://)."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlparse

from edgefleet.cloud.artifacts.base import ArtifactStore, BlobRef, digest
from edgefleet.cloud.artifacts.local import LocalArtifactStore
from edgefleet.cloud.artifacts.s3 import S3ArtifactStore
from edgefleet.protos.errors import InvalidArgument

_BACKENDS: dict[str, Callable[..., ArtifactStore]] = {
    "": LocalArtifactStore,
    "file": LocalArtifactStore,
    "s3": S3ArtifactStore,
}


def open_artifact_store(uri: str, *, s3_endpoint_url: str = "") -> ArtifactStore:
    scheme = urlparse(uri).scheme
    try:
        backend = _BACKENDS[scheme]
    except KeyError:
        supported = ", ".join(s for s in _BACKENDS if s)
        raise InvalidArgument(f"No artifact store for {uri!r}; supported: {supported}") from None
    return backend(uri, endpoint_url=s3_endpoint_url)


__all__ = ["ArtifactStore", "BlobRef", "digest", "open_artifact_store"]
