"""The update state machine: signed desired state → download → verify → load beside
the active model → self-test → atomic swap → report. The active model keeps
serving through every failure; the previous one stays on disk as last-known-good.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent import delta as deltas
from edgefleet.agent.download import PartialDownload
from edgefleet.agent.inference import ActiveModel, ModelHolder, ModelLoader, load
from edgefleet.agent.keys import save_key_list
from edgefleet.agent.offline import clear_report, pending_report
from edgefleet.agent.selfupdate import Release, SelfUpdate, SwitchTarget
from edgefleet.agent.serde import (
    Desired,
    ModelRef,
    Reason,
    UpdateState,
    decode_chunk,
    decode_desired,
    decode_signed_desired,
    encode_reported,
    encode_want,
)
from edgefleet.agent.shadow import ShadowEvaluator
from edgefleet.agent.slots import EXTENSIONS, InstalledModel, ModelSlots
from edgefleet.protos.errors import (
    Conflict,
    DataLoss,
    FleetError,
    InvalidArgument,
    NotFound,
    SelfTestFailed,
    Unauthenticated,
)
from edgefleet.protos.keys import KeyRefused, KeyTrust, verify_manifest_trusted
from edgefleet.protos.manifest import AGENT_KIND, Manifest, SignedManifest, check_artifact
from edgefleet.protos.topics import Topics
from edgefleet.protos.variants import NAMES as VARIANT_NAMES

logger = logging.getLogger(__name__)

KNOWN_VARIANTS = VARIANT_NAMES  # the catalogue shared with the coordinator
Publish = Callable[[str, bytes, bool], Awaitable[None]]  # topic, payload, retain
Subscribe = Callable[[str], Awaitable[None]]


@dataclass
class _Download:
    desired: Desired
    manifest: Manifest
    partial: PartialDownload
    last_chunk_at: float
    last_report_at: float = 0.0
    #: set while downloading a delta against this installed model (agent/delta.py)
    base: InstalledModel | None = None
    #: when a chunk last added something (a delta nobody serves is given up on)
    progress_at: float = 0.0

    def __post_init__(self) -> None:
        self.progress_at = self.progress_at or self.last_chunk_at


#: A hook for fault injection and link shaping (the simulator's lost, corrupted and slow
#: chunks): it gets each chunk's payload as it arrives and returns the payload the updater
#: should see (the same, or altered), or None to drop it.
ChunkFilter = Callable[[bytes], Awaitable[bytes | None]]


class Updater:
    def __init__(
        self,
        *,
        device_id: str,
        state_dir: Path,
        trust: KeyTrust,
        holder: ModelHolder,
        runtimes: Sequence[str],
        providers: Sequence[str],
        topics: Topics,
        publish: Publish,
        subscribe: Subscribe,
        unsubscribe: Subscribe,
        durable: bool = True,
        want_interval: float = 2.0,
        progress_interval: float = 0.5,
        tflite_runtime_legacy: bool = False,
        threads: int = 0,
        chunk_filter: ChunkFilter | None = None,
        selfupdate: SelfUpdate | None = None,
        model_loader: ModelLoader | None = None,
    ) -> None:
        self.progress_interval = progress_interval
        #: sees every chunk before the updater does (see `ChunkFilter`)
        self.chunk_filter = chunk_filter
        #: opens and self-tests verified model bytes (`inference.load` unless a simulator
        #: shares sessions among its devices: `simulator.sessions.SharedSessions`)
        self.model_loader: ModelLoader = model_loader or load
        #: agent releases (agent/selfupdate.py); None: this agent cannot update itself
        self.selfupdate = selfupdate
        #: want intervals without a new delta chunk before the full artifact is fetched
        self.delta_patience = 10
        self.device_id = device_id
        self.slots = ModelSlots(state_dir)
        self._downloads_dir = state_dir / "downloads"
        self._state_dir = state_dir
        self.trust = trust
        #: messages this device would not act on, by reason (forged, garbled, not for it)
        self.refused: Counter[str] = Counter()
        self._warned: dict[str, float] = {}
        #: the newest desired state signed by a key not (yet) in the key list: tried
        #: again when a newer list arrives (it may carry the key)
        self._parked: bytes | None = None
        self.holder = holder
        self._runtimes = tuple(runtimes)
        self._providers = tuple(providers)
        self._legacy = tflite_runtime_legacy
        self._threads = threads
        self._topics = topics
        self._publish = publish
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        self._durable = durable
        self._want_interval = want_interval
        self._download: _Download | None = None
        #: the latest report that could not be sent (retained, so the latest is enough)
        self._unsent: bytes | None = None
        self.shadow: ShadowEvaluator | None = None
        self._lock = asyncio.Lock()
        self.state = UpdateState.IDLE
        self.accepted_generation = self.slots.generation
        self._reported_since_start = False
        #: the generation of the last verified desired state received (applied or not)
        self.last_desired_generation = 0

    # -- startup ------------------------------------------------------------------

    def load_active(self) -> None:
        """Serve the model the slots say is active (after a restart), if any."""
        inst = self.slots.active()
        if inst is None:
            return
        try:
            manifest = self._verify_manifest(SignedManifest.from_bytes(inst.manifest_bytes))
            data = inst.path.read_bytes()
            check_artifact(manifest, data)
            self.holder.swap(
                self.model_loader(manifest, data, providers=self._providers, threads=self._threads)
            )
            self.state = UpdateState.ACTIVE
            logger.info("%s: serving %s from disk", self.device_id, manifest.ref)
        except (FleetError, OSError) as e:
            logger.error(
                "%s: active model on disk unusable (%s); waiting for a deployment",
                self.device_id,
                e,
            )

    # -- messages -----------------------------------------------------------------

    async def on_desired(self, payload: bytes) -> None:
        """A desired state this device cannot verify (forged, garbled, another device's)
        is counted and logged, never reported: a retained FAILED would let anyone who
        can publish make a healthy device look broken. The last report stands."""
        async with self._lock:
            if not payload:
                return
            try:
                desired = self._verify_desired(payload)
            except KeyRefused as e:
                if e.reason == "unknown" and self.trust.rotatable:
                    self._parked = payload  # perhaps signed with a key in a list on its way
                self._refuse(f"desired_{e.reason}", str(e))
                return
            except Unauthenticated as e:
                self._refuse("desired_bad_signature", str(e))
                return
            except InvalidArgument as e:
                self._refuse("desired_malformed", str(e))
                return
            self._parked = None
            self.last_desired_generation = desired.generation
            if desired.generation <= self.accepted_generation and self.state != UpdateState.IDLE:
                if desired.generation < self.accepted_generation:
                    logger.info(
                        "%s: ignoring stale generation %d", self.device_id, desired.generation
                    )
                elif not self._reported_since_start:
                    await self._confirm(desired)
                return
            now_ms = int(time.time() * 1000)
            if desired.not_after_ms and now_ms > desired.not_after_ms:
                await self._report(
                    desired.generation,
                    UpdateState.FAILED,
                    Reason.EXPIRED,
                    f"desired state generation {desired.generation} expired at "
                    f"{desired.not_after_ms} (now {now_ms}); the coordinator signs a fresh one "
                    "when it publishes it again",
                )
                return
            await self._start(desired)

    async def on_keys(self, payload: bytes) -> None:
        """A key list from `{prefix}/keys`: taken if the root signed it and it is newer
        than the one held (then saved, so it survives a restart); refused and counted
        otherwise. A desired state parked for an unknown key is tried again."""
        if not payload:
            return
        try:
            new = self.trust.update(payload)
        except Conflict as e:
            self._refuse("key_list_old", str(e))
            return
        except (Unauthenticated, InvalidArgument) as e:
            self._refuse("key_list_bad", str(e))
            return
        if new is None:
            return
        await asyncio.to_thread(save_key_list, self._state_dir, payload)
        logger.info(
            "%s: key list version %d: signing keys %s; revoked %s",
            self.device_id,
            new.version,
            ", ".join(k.key_id for k in new.keys) or "none",
            ", ".join(new.revoked) or "none",
        )
        parked, self._parked = self._parked, None
        if parked is not None:
            await self.on_desired(parked)

    def _refuse(self, reason: str, detail: str) -> None:
        self.refused[reason] += 1
        now = time.monotonic()
        if now - self._warned.get(reason, -1e9) >= 60.0:
            self._warned[reason] = now
            logger.warning("%s: refused (%s): %s", self.device_id, reason, detail)

    async def _confirm(self, desired: Desired) -> None:
        """The agent was killed after recording this generation on disk but before it
        reported it: report it now (else the coordinator would wait forever on the
        report the killed process last sent, e.g. `loading`)."""
        serving = self.holder.active
        if serving is None or self.state != UpdateState.ACTIVE:
            return
        try:
            manifest = self._verify_manifest(
                SignedManifest(
                    desired.manifest_bytes, desired.manifest_signature, desired.manifest_key_id
                )
            )
        except FleetError:
            return
        if manifest.sha256 != serving.ref.sha256:
            return
        state = UpdateState.ROLLED_BACK if desired.action == "rollback" else UpdateState.ACTIVE
        logger.info(
            "%s: generation %d was done before a restart: reporting it %s",
            self.device_id,
            desired.generation,
            state.name.lower(),
        )
        await self._report(desired.generation, state, Reason.OK, "", provider=serving.provider)

    async def on_chunk(self, payload: bytes) -> None:
        if self.chunk_filter is not None:
            filtered = await self.chunk_filter(payload)
            if filtered is None:
                return
            payload = filtered
        dl = self._download
        if dl is None:
            return
        try:
            sha, index, _total, data = decode_chunk(payload)
        except InvalidArgument as e:
            logger.warning("%s: %s", self.device_id, e)
            return
        if sha != dl.partial.sha256:
            return
        expected = min(dl.partial.chunk_size, dl.partial.size - index * dl.partial.chunk_size)
        if 0 <= index < dl.partial.chunks_total and len(data) < expected:
            await self._report(
                dl.desired.generation,
                UpdateState.DOWNLOADING,
                Reason.TRUNCATED,
                f"chunk {index} of {dl.partial.sha256[:12]}… is {len(data)} bytes; expected {expected}",
                dl=dl,
            )
            return
        try:
            # a flushed write waits on the disk: off the loop. Without the flush it is a
            # page-cache copy plus a hash, cheaper than the hop to a thread and back
            if dl.partial.durable:
                added = await asyncio.to_thread(dl.partial.add, index, data)
            else:
                added = dl.partial.add(index, data)
        except (DataLoss, InvalidArgument) as e:
            logger.warning("%s: chunk rejected: %s", self.device_id, e)
            await self._report(
                dl.desired.generation,
                UpdateState.DOWNLOADING,
                Reason.CHUNK_DIGEST_MISMATCH,
                str(e),
                dl=dl,
            )
            return
        if added:
            now = time.monotonic()
            dl.last_chunk_at = dl.progress_at = now
            if now - dl.last_report_at >= self.progress_interval and not dl.partial.complete:
                dl.last_report_at = now
                await self._report(
                    dl.desired.generation, UpdateState.DOWNLOADING, Reason.OK, "", dl=dl
                )
        if dl.partial.complete and self._download is dl:
            async with self._lock:
                if self._download is dl:
                    await self._complete(dl)

    async def tick(self) -> None:
        """Re-ask for missing chunks when none arrived for a while (lost chunks, late subscribe)."""
        dl = self._download
        if dl is None or time.monotonic() - dl.last_chunk_at < self._want_interval:
            return
        dl.last_chunk_at = time.monotonic()
        if dl.base is not None and await self._delta_stalled(dl):
            return
        await self._want(dl)

    async def on_reconnect(self) -> None:
        unsent = self._unsent
        if unsent is not None:  # e.g. `active`, reached while failing over to another broker
            try:
                await self._publish(self._topics.reported(self.device_id), unsent, True)
                if self._unsent is unsent:
                    self._unsent = None
            except FleetError as e:
                logger.info("%s: report still not sent (%s)", self.device_id, e)
        dl = self._download
        if dl is not None:
            await self._want(dl, resume=True)

    async def report_offline_install(self) -> None:
        """Tell the coordinator about a model installed by `fleet-agent install` while
        the agent was stopped: ACTIVE with reason OFFLINE_INSTALL (once; the record is
        removed when the report is sent)."""
        record = await asyncio.to_thread(pending_report, self._state_dir)
        if record is None:
            return
        active = self.holder.active
        if active is None or active.ref.sha256 != record.get("sha256", active.ref.sha256):
            logger.warning(
                "%s: offline install record does not match the active model; dropped",
                self.device_id,
            )
            await asyncio.to_thread(clear_report, self._state_dir)
            return
        detail = f"installed offline: {active.ref.model}:{active.ref.version}/{active.ref.variant}"
        if record.get("source"):
            detail += f" from {record['source']}"
        if isinstance(record.get("installed_at_ms"), int):
            detail += f" at {record['installed_at_ms']} ms"
        async with self._lock:
            sent = await self._report(
                self.accepted_generation, UpdateState.ACTIVE, Reason.OFFLINE_INSTALL, detail
            )
        if sent:  # else the next connect tries again
            await asyncio.to_thread(clear_report, self._state_dir)

    # -- steps --------------------------------------------------------------------

    async def _start(self, desired: Desired) -> None:
        gen = desired.generation
        try:
            manifest = self._verify_manifest(
                SignedManifest(
                    desired.manifest_bytes, desired.manifest_signature, desired.manifest_key_id
                )
            )
        except KeyRefused as e:
            reason = {
                "revoked": Reason.KEY_REVOKED,
                "unknown": Reason.UNTRUSTED_KEY,
                "expired": Reason.UNTRUSTED_KEY,
            }.get(e.reason, Reason.BAD_SIGNATURE)
            await self._report(gen, UpdateState.FAILED, reason, str(e))
            return
        except Unauthenticated as e:
            await self._report(gen, UpdateState.FAILED, Reason.BAD_SIGNATURE, str(e))
            return
        except InvalidArgument as e:
            await self._report(gen, UpdateState.FAILED, Reason.MALFORMED_MESSAGE, str(e))
            return
        self.accepted_generation = gen
        # a new desired state ends any shadow evaluation; an activation of the same
        # candidate reuses its loaded, self-tested model
        shadowed = self._stop_shadow()
        if manifest.kind == AGENT_KIND:
            await self._agent_release(desired, manifest)
            return
        if desired.action == "rollback":
            await self._rollback(desired, manifest)
            return
        if manifest.variant not in KNOWN_VARIANTS:
            await self._report(
                gen,
                UpdateState.FAILED,
                Reason.UNKNOWN_VARIANT,
                f"variant {manifest.variant!r} unknown; this agent runs {', '.join(KNOWN_VARIANTS)}",
            )
            return
        if manifest.runtime not in self._runtimes or (
            self._legacy and "dynamic-int8" in manifest.requires
        ):
            await self._report(
                gen,
                UpdateState.FAILED,
                Reason.UNSUPPORTED_RUNTIME,
                f"{manifest.ref} needs {manifest.runtime}"
                f"{' with dynamic-range int8' if 'dynamic-int8' in manifest.requires else ''}; "
                f"this device has {', '.join(self._runtimes) or 'no runtime'}",
            )
            return
        await self._abandon_download()
        if self.slots.has(manifest.sha256):
            inst = self.slots.installed(manifest.sha256)
            if inst is not None:
                if desired.action == "shadow":
                    await self._shadow(desired, manifest, inst)
                else:
                    reuse = (
                        shadowed if shadowed and shadowed.ref.sha256 == manifest.sha256 else None
                    )
                    await self._activate(desired, manifest, inst, preloaded=reuse)
                return
        if desired.delta is not None and await self._start_delta(desired, manifest):
            return
        await self._download_full(desired, manifest)

    async def _download_full(self, desired: Desired, manifest: Manifest) -> None:
        gen = desired.generation
        try:
            partial = await self._open_partial(
                manifest.sha256, manifest.size, desired.chunk_size, desired.chunk_digests
            )
        except InvalidArgument as e:
            await self._report(gen, UpdateState.FAILED, Reason.MALFORMED_MESSAGE, str(e))
            return
        except OSError as e:
            await self._report(
                gen, UpdateState.FAILED, Reason.DISK_FULL, f"cannot store download: {e}"
            )
            return
        await self._begin(_Download(desired, manifest, partial, time.monotonic()))

    async def _open_partial(
        self, sha256: str, size: int, chunk_size: int, chunk_digests: Sequence[bytes]
    ) -> PartialDownload:
        """The partial download of (sha256, size) in the downloads folder, resumed if one
        is there (full artifact and delta alike)."""
        return await asyncio.to_thread(
            PartialDownload.open,
            self._downloads_dir,
            sha256=sha256,
            size=size,
            chunk_size=chunk_size,
            chunk_digests=chunk_digests,
            durable=self._durable,
        )

    async def _begin(self, dl: _Download) -> None:
        """Start (or finish, if it is already complete) the download of `dl.partial`."""
        self._download = dl
        self.state = UpdateState.DOWNLOADING
        await self._report(dl.desired.generation, UpdateState.DOWNLOADING, Reason.OK, "", dl=dl)
        if dl.partial.complete:
            await self._complete(dl)
            return
        await self._subscribe(self._topics.chunk(dl.partial.sha256))
        await self._want(dl)

    async def _want(self, dl: _Download, *, resume: bool = False) -> None:
        missing = dl.partial.missing_ranges(limit=64)
        if not missing:
            return
        payload = encode_want(
            self.device_id, dl.partial.sha256, dl.partial.chunks_total, missing, resume=resume
        )
        try:
            await self._publish(self._topics.want(dl.partial.sha256), payload, False)
        except FleetError as e:
            logger.debug("%s: want not sent (%s); will retry", self.device_id, e)

    async def _complete(self, dl: _Download) -> None:
        gen = dl.desired.generation
        self._download = None
        await self._unsubscribe_quietly(self._topics.chunk(dl.partial.sha256))
        if dl.base is not None:
            await self._complete_delta(dl)
            return
        self.state = UpdateState.VERIFYING
        await self._report(gen, UpdateState.VERIFYING, Reason.OK, "", dl=dl)
        if dl.manifest.kind == AGENT_KIND:
            await self._agent_downloaded(dl)
            return
        ext = EXTENSIONS[dl.manifest.runtime]
        dest = self.slots.artifact_path(dl.manifest.sha256, extension=ext)
        try:
            await asyncio.to_thread(dl.partial.finish, dest)
            inst = await asyncio.to_thread(
                self.slots.install, dl.desired.signed_manifest, dest, extension=ext
            )
        except DataLoss as e:
            await self._fetch_again(dl, e)
            return
        except OSError as e:
            await self._report(gen, UpdateState.FAILED, Reason.DISK_FULL, str(e))
            return
        await self._install_done(dl.desired, dl.manifest, inst)

    async def _install_done(
        self, desired: Desired, manifest: Manifest, inst: InstalledModel
    ) -> None:
        if desired.action == "shadow":
            await self._shadow(desired, manifest, inst)
        else:
            await self._activate(desired, manifest, inst)

    # -- deltas (agent/delta.py; docs/protocol.md, "Deltas") ---------------------------

    async def _start_delta(self, desired: Desired, manifest: Manifest) -> bool:
        """Download the offered delta if this device holds its base; False (after a
        DELTA_NO_BASE report) when it does not, and the full artifact is fetched."""
        offer = desired.delta
        assert offer is not None
        gen = desired.generation
        base = deltas.find_base(self.slots, offer.base_sha256)
        if base is None:
            await self._report(
                gen,
                UpdateState.DOWNLOADING,
                Reason.DELTA_NO_BASE,
                f"delta for base {offer.base_sha256[:16]}… offered; this device holds neither "
                "it as active nor as last-known-good: downloading the full artifact",
            )
            return False
        try:
            partial = await self._open_partial(
                offer.sha256, offer.size, offer.chunk_size, offer.chunk_digests
            )
        except (InvalidArgument, OSError) as e:
            await self._report(gen, UpdateState.DOWNLOADING, Reason.DELTA_FAILED, str(e))
            return False
        await self._begin(_Download(desired, manifest, partial, time.monotonic(), base=base))
        return True

    async def _delta_stalled(self, dl: _Download) -> bool:
        """A delta download with no new chunk for `delta_patience` wants: nobody serves
        it (e.g. its blob left the coordinator's store). Report DELTA_FAILED and fetch
        the full artifact; True if so."""
        if time.monotonic() - dl.progress_at < self.delta_patience * self._want_interval:
            return False
        async with self._lock:
            if self._download is not dl:
                return True
            await self._abandon_download()
            dl.partial.discard()
            await self._report(
                dl.desired.generation,
                UpdateState.DOWNLOADING,
                Reason.DELTA_FAILED,
                f"no chunk of delta {dl.partial.sha256[:16]}… for {self.delta_patience} "
                "want intervals; downloading the full artifact",
            )
            await self._download_full(dl.desired, dl.manifest)
        return True

    async def _complete_delta(self, dl: _Download) -> None:
        """Rebuild the artifact from the downloaded delta; on any mismatch report
        DELTA_FAILED and download the full artifact."""
        assert dl.base is not None
        gen = dl.desired.generation
        self.state = UpdateState.VERIFYING
        await self._report(gen, UpdateState.VERIFYING, Reason.OK, "", dl=dl)
        ext = EXTENSIONS[dl.manifest.runtime]
        dest = self.slots.artifact_path(dl.manifest.sha256, extension=ext)
        delta_path = self._downloads_dir / f"{dl.partial.sha256}.delta"
        try:
            await asyncio.to_thread(dl.partial.finish, delta_path)
        except DataLoss as e:  # chunks damaged on disk: fetch them again, as for an artifact
            await self._report(
                gen, UpdateState.DOWNLOADING, Reason.CHUNK_DIGEST_MISMATCH, str(e), dl=dl
            )
            self._download = dl
            await self._subscribe(self._topics.chunk(dl.partial.sha256))
            await self._want(dl)
            return
        try:
            await asyncio.to_thread(deltas.rebuild, dl.base, delta_path, dl.manifest, dest)
            inst = await asyncio.to_thread(
                self.slots.install, dl.desired.signed_manifest, dest, extension=ext
            )
        except (DataLoss, InvalidArgument, OSError) as e:
            logger.warning("%s: delta for %s failed (%s)", self.device_id, dl.manifest.ref, e)
            await self._report(
                gen,
                UpdateState.DOWNLOADING,
                Reason.DELTA_FAILED,
                f"{e}; downloading the full artifact",
            )
            await self._download_full(dl.desired, dl.manifest)
            return
        await self._install_done(dl.desired, dl.manifest, inst)

    async def _fetch_again(self, dl: _Download, e: DataLoss) -> None:
        """The whole file failed its digest; finish() cleared the bad chunks: fetch them again."""
        await self._report(
            dl.desired.generation,
            UpdateState.DOWNLOADING,
            Reason.ARTIFACT_DIGEST_MISMATCH,
            str(e),
            dl=dl,
        )
        self._download = dl
        await self._subscribe(self._topics.chunk(dl.partial.sha256))
        await self._want(dl)

    async def _load(self, gen: int, manifest: Manifest, inst: InstalledModel) -> ActiveModel | None:
        """Read, check and load (self-test included) an installed model; None after a failure
        report."""
        self.state = UpdateState.LOADING
        await self._report(gen, UpdateState.LOADING, Reason.OK, "")
        try:
            data = await asyncio.to_thread(inst.path.read_bytes)
            check_artifact(manifest, data)
            return await asyncio.to_thread(
                self.model_loader,
                manifest,
                data,
                providers=self._providers,
                threads=self._threads,
            )
        except DataLoss as e:
            await self._fail(gen, Reason.ARTIFACT_DIGEST_MISMATCH, str(e))
        except SelfTestFailed as e:
            await self._fail(gen, Reason.SELF_TEST_FAILED, str(e))
        except FleetError as e:
            await self._fail(gen, Reason.LOAD_FAILED, str(e))
        return None

    async def _shadow(self, desired: Desired, manifest: Manifest, inst: InstalledModel) -> None:
        gen = desired.generation
        model = await self._load(gen, manifest, inst)
        if model is None:
            return
        device = self.device_id
        shadow = ShadowEvaluator(
            device_id=device,
            holder=self.holder,
            candidate=self.holder.prepare(model),
            generation=gen,
            rollout_id=desired.rollout_id,
            settings=desired.shadow,
            publish=lambda p: self._publish(self._topics.shadow(device), p, True),
        )
        shadow.start()
        self.shadow = shadow
        self.state = UpdateState.SHADOWING
        serving = self.holder.active
        await self._report(
            gen,
            UpdateState.SHADOWING,
            Reason.OK,
            f"evaluating {manifest.ref} beside {serving.ref if serving else 'nothing'}",
            provider=model.provider,
        )
        await shadow.publish_report()

    def _stop_shadow(self) -> ActiveModel | None:
        """End the shadow evaluation, if any; return its candidate."""
        shadow, self.shadow = self.shadow, None
        if shadow is None:
            return None
        shadow.stop()
        return shadow.candidate

    async def _activate(
        self,
        desired: Desired,
        manifest: Manifest,
        inst: InstalledModel,
        *,
        preloaded: ActiveModel | None = None,
    ) -> None:
        gen = desired.generation
        model = preloaded or await self._load(gen, manifest, inst)
        if model is None:
            return
        self.holder.swap(model)
        await asyncio.to_thread(self.slots.activate, manifest.sha256, gen)
        await asyncio.to_thread(self.slots.gc)
        self.state = UpdateState.ACTIVE
        logger.info("%s: %s active on %s", self.device_id, manifest.ref, model.provider)
        await self._report(gen, UpdateState.ACTIVE, Reason.OK, "", provider=model.provider)

    async def _rollback(self, desired: Desired, target: Manifest) -> None:
        """Serve `target` again, without a download: it is the active model (a shadow was
        dropped, or the activation never happened), the last-known-good one, or still
        installed. Repeating a rollback changes nothing."""
        gen = desired.generation
        await self._abandon_download()
        serving = self.holder.active
        if serving is not None and serving.ref.sha256 == target.sha256:
            try:
                await asyncio.to_thread(self.slots.activate, target.sha256, gen)
            except FleetError as e:
                logger.warning("%s: rollback generation not recorded: %s", self.device_id, e)
            self.state = UpdateState.ROLLED_BACK
            await self._report(
                gen, UpdateState.ROLLED_BACK, Reason.OK, f"still on {serving.ref}; nothing to undo"
            )
            return
        lkg = self.slots.last_known_good()
        try:
            if lkg is not None and lkg.sha256 == target.sha256:
                inst = await asyncio.to_thread(self.slots.rollback, generation=gen)
            elif (inst_or_none := self.slots.installed(target.sha256)) is not None:
                inst = inst_or_none
                await asyncio.to_thread(self.slots.activate, target.sha256, gen)
            else:
                raise NotFound(
                    f"cannot roll back to {target.ref}: it is not on this device (serving "
                    f"{serving.ref if serving else 'nothing'}, last-known-good "
                    f"{self._ref(lkg) or 'none'})"
                )
            manifest = self._verify_manifest(SignedManifest.from_bytes(inst.manifest_bytes))
            data = await asyncio.to_thread(inst.path.read_bytes)
            check_artifact(manifest, data)
            model = await asyncio.to_thread(
                load, manifest, data, providers=self._providers, threads=self._threads
            )
        except NotFound as e:
            await self._report(gen, UpdateState.FAILED, Reason.NO_LAST_KNOWN_GOOD, str(e))
            return
        except FleetError as e:
            await self._report(gen, UpdateState.FAILED, Reason.LOAD_FAILED, str(e))
            return
        self.holder.swap(model)
        self.state = UpdateState.ROLLED_BACK
        await self._report(
            gen,
            UpdateState.ROLLED_BACK,
            Reason.OK,
            f"back on {manifest.ref}",
            provider=model.provider,
        )

    async def _fail(self, gen: int, reason: Reason, detail: str) -> None:
        self.state = UpdateState.FAILED
        logger.warning("%s: update %d failed (%s): %s", self.device_id, gen, reason.name, detail)
        await self._report(gen, UpdateState.FAILED, reason, detail)

    async def _abandon_download(self) -> None:
        dl, self._download = self._download, None
        if dl is not None:
            await self._unsubscribe_quietly(self._topics.chunk(dl.partial.sha256))

    async def _unsubscribe_quietly(self, topic: str) -> None:
        try:
            await self._unsubscribe(topic)
        except FleetError as e:
            logger.debug("%s: unsubscribe %s: %s", self.device_id, topic, e)

    # -- agent releases (agent/selfupdate.py) -----------------------------------------

    async def _agent_release(self, desired: Desired, manifest: Manifest) -> None:
        """An agent release: install it beside this agent and check it (shadow), switch
        to it (activate), or undo it (rollback). The active model keeps serving."""
        gen, su = desired.generation, self.selfupdate
        version = manifest.labels.get("agent_version", "")
        await self._abandon_download()
        if su is None:
            await self._fail(
                gen,
                Reason.AGENT_INSTALL_FAILED,
                f"agent release {version or manifest.ref}: this agent runs without a config "
                "file (fleet-agent run --config FILE), so it cannot start another version",
            )
            return
        if desired.action == "rollback":
            await self._agent_rollback(gen, version, su)
            return
        if manifest.variant != su.machine:
            await self._fail(
                gen,
                Reason.AGENT_PLATFORM,
                f"agent release {manifest.ref} ({version}) is for {manifest.variant}; "
                f"this device is {su.machine}",
            )
            return
        if version == su.running_version:
            state = UpdateState.SHADOWING if desired.action == "shadow" else UpdateState.ACTIVE
            self.state = state
            await self._report(gen, state, Reason.OK, f"agent {version} is running")
            return
        failed = su.releases.failed(manifest.sha256)
        if failed is not None:
            reason, _, detail = failed.partition(":")
            await self._fail(
                gen,
                Reason.__members__.get(reason, Reason.AGENT_CHECK_FAILED),
                f"agent {version} failed on this device before (not retried): {detail.strip()}",
            )
            return
        rel = su.releases.installed(version, manifest.sha256)
        if rel is not None:
            await self._agent_staged(desired, manifest, rel, su)
            return
        await self._download_full(desired, manifest)

    async def _agent_downloaded(self, dl: _Download) -> None:
        gen, su = dl.desired.generation, self.selfupdate
        assert su is not None
        version = dl.manifest.labels.get("agent_version", "")
        dest = su.releases.downloads / f"{dl.manifest.sha256}.tar"
        try:
            await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(dl.partial.finish, dest)
        except DataLoss as e:
            await self._fetch_again(dl, e)
            return
        except OSError as e:
            await self._report(gen, UpdateState.FAILED, Reason.DISK_FULL, str(e))
            return
        self.state = UpdateState.LOADING
        await self._report(
            gen,
            UpdateState.LOADING,
            Reason.OK,
            f"installing agent {version} beside {su.running_version}",
        )
        try:
            rel = await asyncio.to_thread(
                su.releases.install, dest, version=version, sha256=dl.manifest.sha256
            )
        except (FleetError, OSError) as e:
            await self._fail(gen, Reason.AGENT_INSTALL_FAILED, f"agent {version}: {e}")
            return
        finally:
            dest.unlink(missing_ok=True)
        await self._agent_staged(dl.desired, dl.manifest, rel, su)

    async def _agent_staged(
        self, desired: Desired, manifest: Manifest, rel: Release, su: SelfUpdate
    ) -> None:
        gen = desired.generation
        self.state = UpdateState.SELF_TEST
        await self._report(gen, UpdateState.SELF_TEST, Reason.OK, f"checking agent {rel.version}")
        try:
            info = await asyncio.to_thread(su.releases.check, rel, su.config_path)
        except FleetError as e:
            await asyncio.to_thread(
                su.releases.mark_failed, manifest.sha256, f"AGENT_CHECK_FAILED: {e}"
            )
            await self._fail(gen, Reason.AGENT_CHECK_FAILED, str(e))
            return
        if desired.action == "shadow":
            self.state = UpdateState.SHADOWING
            model = info.get("model")
            await self._report(
                gen,
                UpdateState.SHADOWING,
                Reason.OK,
                f"agent {rel.version} installed beside {su.running_version} and checked"
                + (f" ({model}: self-test ok)" if model else "")
                + "; switches on activate",
            )
            return
        self.state = UpdateState.LOADING
        await self._report(gen, UpdateState.LOADING, Reason.OK, f"switching to agent {rel.version}")
        su.switch(SwitchTarget(gen, manifest.sha256, rel.version, rel.python, str(rel.root)))

    async def _agent_rollback(self, gen: int, version: str, su: SelfUpdate) -> None:
        if version != su.running_version:
            dropped = await asyncio.to_thread(su.releases.drop, version)
            self.state = UpdateState.ROLLED_BACK
            await self._report(
                gen,
                UpdateState.ROLLED_BACK,
                Reason.OK,
                f"agent {version} {'removed' if dropped else 'not installed'}; "
                f"running {su.running_version}",
            )
            return
        prev = su.releases.previous()
        if prev is None:
            await self._fail(
                gen,
                Reason.NO_LAST_KNOWN_GOOD,
                f"agent {version} is running and no earlier agent is recorded to go back to",
            )
            return
        self.state = UpdateState.LOADING
        await self._report(
            gen, UpdateState.LOADING, Reason.OK, f"switching back to agent {prev['version']}"
        )
        su.switch(
            SwitchTarget(
                gen, "", prev.get("version", ""), Path(prev["python"]), prev.get("root", "")
            )
        )

    async def agent_switch_failed(self, target: SwitchTarget, detail: str) -> None:
        """The agent started by a switch was not healthy: this one serves on (called by
        the agent after it took the broker session back)."""
        async with self._lock:
            if target.sha256 and self.selfupdate is not None:
                await asyncio.to_thread(
                    self.selfupdate.releases.mark_failed,
                    target.sha256,
                    f"AGENT_UNHEALTHY: {detail}",
                )
            await self._fail(target.generation, Reason.AGENT_UNHEALTHY, detail)

    # -- verification and reports ----------------------------------------------------

    def _verify_desired(self, payload: bytes) -> Desired:
        body, signature, kid = decode_signed_desired(payload)
        self.trust.verify(body, signature, kid, what="desired state")
        desired = decode_desired(body)
        if desired.device_id != self.device_id:
            raise InvalidArgument(
                f"desired state is for device {desired.device_id!r}, not {self.device_id!r}"
            )
        return desired

    def _verify_manifest(self, signed: SignedManifest) -> Manifest:
        return verify_manifest_trusted(signed, self.trust)

    def _ref(self, inst: InstalledModel | None) -> ModelRef | None:
        if inst is None:
            return None
        try:
            m = self._verify_manifest(SignedManifest.from_bytes(inst.manifest_bytes))
        except FleetError:
            return None
        return ModelRef.from_manifest(m)

    def active_ref(self) -> ModelRef | None:
        active = self.holder.active
        return active.ref if active is not None else None

    def download_progress(self) -> tuple[int, int]:
        """(chunks stored, chunks in all) of the download under way; (0, 0) when none."""
        dl = self._download
        return (dl.partial.chunks_have, dl.partial.chunks_total) if dl is not None else (0, 0)

    async def _report(
        self,
        generation: int,
        state: UpdateState,
        reason: Reason,
        detail: str,
        *,
        dl: _Download | None = None,
        provider: str = "",
    ) -> bool:
        """Publish the reported state (retained); False if it could not be sent."""
        self._reported_since_start = True
        active = self.holder.active
        payload = encode_reported(
            device_id=self.device_id,
            generation=generation or self.accepted_generation,
            state=state,
            reason=reason,
            detail=detail,
            active=active.ref if active else None,
            last_known_good=self._ref(self.slots.last_known_good()),
            chunks_have=dl.partial.chunks_have if dl else 0,
            chunks_total=dl.partial.chunks_total if dl else 0,
            provider=provider or (active.provider if active else ""),
            timestamp_ms=int(time.time() * 1000),
        )
        try:
            await self._publish(self._topics.reported(self.device_id), payload, True)
        except FleetError as e:
            logger.info("%s: report not sent (%s); sent on reconnect", self.device_id, e)
            self._unsent = payload
            return False
        self._unsent = None
        return True
