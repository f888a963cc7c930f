"""One ONNX Runtime session per model per simulator process, shared by its devices.

A real device holds one session for its model; a simulator process holding
thousands of devices would hold thousands of identical sessions (~10 MB each for
the fan-out bench's 1 MB MLP: 10,000 devices would need ~100 GB). `SharedSessions`
is a `ModelLoader` (the updater's seam, `Updater.model_loader`) that opens one
session per (model sha256 as verified against the signed manifest, runtime,
providers, threads) and hands it to every
device that loads those bytes. Everything else stays per device: each agent
downloads, checks digests and signatures, writes its slot, runs its own self-test
against the golden sample on the session it gets, swaps and reports.

Opt-in (`SimulatedFleet(share_sessions=True)`, `SimCluster(share_sessions=True)`,
`fleet sim --share-sessions`): a shared session means one device's load cost is
paid once per process, which is what a fan-out measured this way no longer counts.
Only ONNX Runtime sessions are shared (their `run` is thread-safe); other runtimes
open one session per device as usual. A session lives as long as a device holds a
model on it (weak references): an old model's session is freed with its last user.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

from edgefleet.agent.inference import ActiveModel, load
from edgefleet.models.runtime import ModelSession, open_session
from edgefleet.protos.manifest import Manifest

_Key = tuple[str, str, tuple[str, ...], int]


class SharedSessions:
    """A `ModelLoader` that shares sessions on identical bytes; thread-safe."""

    SHARED_RUNTIMES = ("onnxruntime",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: weakref.WeakValueDictionary[_Key, ModelSession] = (
            weakref.WeakValueDictionary()
        )
        #: sessions this loader opened (shared ones once, others once per load)
        self.opened = 0
        #: models it loaded (one per device load, each self-tested)
        self.loads = 0

    def __call__(
        self, manifest: Manifest, model: bytes, *, providers: Sequence[str], threads: int
    ) -> ActiveModel:
        with self._lock:
            self.loads += 1

        def opener(
            model: bytes, runtime: str, *, providers: Sequence[str] | None = None, threads: int = 0
        ) -> ModelSession:
            # the updater checked the bytes against the signed manifest's sha256 before
            # loading them (`check_artifact`): no second pass over the file for the key
            return self._open(manifest.sha256, model, runtime, providers=providers, threads=threads)

        return load(manifest, model, providers=providers, threads=threads, opener=opener)

    def live(self) -> int:
        """Shared sessions still held by some device."""
        with self._lock:
            return len(self._sessions)

    def _open(
        self,
        sha256: str,
        model: bytes,
        runtime: str,
        *,
        providers: Sequence[str] | None = None,
        threads: int = 0,
    ) -> ModelSession:
        if runtime not in self.SHARED_RUNTIMES:
            with self._lock:
                self.opened += 1
            return open_session(model, runtime, providers=providers, threads=threads)
        key = (sha256, runtime, tuple(providers or ()), threads)
        # one lock for lookups and opens: devices loading the same bytes at once wait for
        # the first one's open (milliseconds) instead of each opening their own
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = open_session(model, runtime, providers=providers, threads=threads)
                self._sessions[key] = session
                self.opened += 1
            return session
