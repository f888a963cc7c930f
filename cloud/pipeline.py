"""The model pipeline: train → export → register; quantize → variants; import; verify; export.

Every flow does its work first and writes the registry last, in one transaction,
so a failure at any step leaves the registry as it was (content-addressed blobs
already stored are harmless: nothing references them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

import edgefleet
from edgefleet.cloud.artifacts import ArtifactStore
from edgefleet.cloud.evaluation import EvalSet, predictions
from edgefleet.cloud.quantize import BUILDERS, Sources
from edgefleet.cloud.quantize.compact import compact_onnx
from edgefleet.cloud.registry import Lineage, ModelRef, ModelVersion, NewVersion, RegistryStore
from edgefleet.cloud.registry.entities import check_model_name
from edgefleet.cloud.variants import DEFAULT_MAX_DROP, KINDS, BuiltVariant, measure, sign_variants
from edgefleet.models.checkpoint import dump_checkpoint, load_checkpoint
from edgefleet.models.data import load_dataset, split
from edgefleet.models.runtime import open_session
from edgefleet.protos.errors import (
    AlreadyExists,
    DataLoss,
    FleetError,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from edgefleet.protos.manifest import SignedManifest, check_artifact, verify_manifest

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (what, done, total)
CALIBRATION_SAMPLES = 256


def _noop(_what: str, _done: int, _total: int) -> None:
    pass


def code_version() -> str:
    v = edgefleet.__version__
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        sha = ""
    return f"{v}+g{sha}" if sha else v


@dataclass(frozen=True)
class VerifyResult:
    variant: str
    ok: bool
    detail: str


class Pipeline:
    def __init__(
        self,
        registry: RegistryStore,
        store: ArtifactStore,
        signing_key: Callable[[], Ed25519PrivateKey],
    ) -> None:
        self.registry = registry
        self.store = store
        self._signing_key = signing_key

    # -- train --------------------------------------------------------------------

    def train(
        self,
        name: str,
        data_source: str,
        *,
        arch: str,
        epochs: int = 20,
        seed: int = 0,
        batch_size: int = 64,
        lr: float = 3e-3,
        holdout: float = 0.2,
        options: dict[str, Any] | None = None,
        on_epoch: Callable[[Any], None] | None = None,
        progress: Progress = _noop,
    ) -> ModelVersion:
        """`options` go to the architecture, e.g. {"hidden": [512, 448]} for a wider MLP."""
        from edgefleet.cloud.training.export import INPUT_NAME
        from edgefleet.cloud.training.train import TrainConfig, predict, train
        from edgefleet.models.arch import ARCHITECTURES, to_checkpoint

        check_model_name(name)
        if arch not in ARCHITECTURES:
            raise InvalidArgument(
                f"--arch {arch!r} unknown; available: {', '.join(sorted(ARCHITECTURES))}"
            )
        config = TrainConfig(
            arch=arch,
            epochs=epochs,
            seed=seed,
            batch_size=batch_size,
            lr=lr,
            holdout=holdout,
            options=dict(options or {}),
        )
        key = self._signing_key()  # fail before training if `fleet init` was not run
        progress("load data", 0, 1)
        data = load_dataset(data_source)
        train_ds, hold_ds = split(data, holdout=holdout, seed=seed)
        result = train(train_ds, config, progress=on_epoch)
        torch_logits = predict(result.module, hold_ds.x)
        torch_acc = float((torch_logits.argmax(1) == hold_ds.y).mean())
        rng = np.random.default_rng(seed)
        calib_idx = rng.choice(
            len(train_ds), size=min(CALIBRATION_SAMPLES, len(train_ds)), replace=False
        )
        evalset = EvalSet(hold_ds.x, hold_ds.y, train_ds.x[np.sort(calib_idx)])
        return self._register_module(
            name,
            result.module,
            to_checkpoint(result.arch_config, result.module),
            evalset=evalset,
            torch_logits=torch_logits,
            classes=data.classes,
            metrics={
                "holdout_accuracy": torch_acc,
                "train_accuracy": result.history[-1].train_accuracy,
                "final_loss": result.history[-1].loss,
                "holdout_samples": float(len(hold_ds)),
                "train_samples": float(len(train_ds)),
            },
            lineage=Lineage(
                source="train",
                dataset_name=data.name,
                dataset_digest=data.digest,
                training_config={**config.to_dict(), "device": result.device, "input": INPUT_NAME},
                code_version=code_version(),
            ),
            key=key,
            progress=progress,
        )

    def _register_module(
        self,
        name: str,
        module: Any,
        ckpt: Any,
        *,
        evalset: EvalSet,
        torch_logits: np.ndarray,
        classes: Sequence[str],
        metrics: dict[str, float],
        lineage: Lineage,
        key: Ed25519PrivateKey,
        progress: Progress,
    ) -> ModelVersion:
        """Export fp32 ONNX, check it agrees with torch, register it with its checkpoint."""
        from edgefleet.cloud.training.export import export_onnx

        progress("export onnx", 0, 1)
        fp32 = compact_onnx(export_onnx(module, tuple(evalset.x.shape[1:])))
        progress("evaluate fp32", 0, 1)
        built = measure(
            KINDS["fp32"], fp32, {"mode": "fp32"}, evalset, baseline_accuracy=None, max_drop=0
        )
        agree = float(
            (predictions(self._holdout_outputs(fp32, evalset)) == torch_logits.argmax(1)).mean()
        )
        if agree < 0.99:
            raise InvalidArgument(
                f"exported ONNX agrees with the torch model on only {agree:.1%} of the holdout"
            )
        ckpt_ref = self.store.put(dump_checkpoint(ckpt))
        eval_ref = self.store.put(evalset.to_bytes())
        new = NewVersion(
            arch=ckpt.config.arch,
            inputs=built.inputs,
            outputs=built.outputs,
            classes=tuple(classes),
            metrics=metrics,
            lineage=lineage,
            checkpoint_sha256=ckpt_ref.sha256,
            evalset_sha256=eval_ref.sha256,
        )
        make = sign_variants(
            [built], model=name, labels=_labels(classes), store=self.store, key=key
        )
        return self.registry.create_version(name, new, make)

    # -- federated ------------------------------------------------------------------

    def register_federated(
        self,
        parent_ref: ModelRef,
        weights: bytes,
        *,
        federated: dict[str, Any],
        training_config: dict[str, Any],
        progress: Progress = _noop,
    ) -> ModelVersion:
        """Register a federated run's weights.npz as the next version of the parent's model.

        The weights must fit the parent's architecture exactly; they are evaluated on
        the parent's holdout and go through the same export check as `train`.
        """
        from edgefleet.cloud.training.train import predict
        from edgefleet.models.arch import from_checkpoint

        key = self._signing_key()
        parent = self.registry.get_version(parent_ref)
        if not parent.checkpoint_sha256 or not parent.evalset_sha256:
            raise InvalidArgument(
                f"{parent.ref} has no trainable checkpoint or holdout; federated runs start "
                "from a version made by 'fleet train'"
            )
        base = load_checkpoint(self.store.get(parent.checkpoint_sha256))
        ckpt = load_checkpoint(weights)
        if ckpt.config != base.config or {k: v.shape for k, v in ckpt.arrays.items()} != {
            k: v.shape for k, v in base.arrays.items()
        }:
            raise DataLoss(
                f"federated weights ({ckpt.config.arch}, {len(ckpt.arrays)} arrays) do not "
                f"match {parent.ref} ({base.config.arch}, {len(base.arrays)} arrays)"
            )
        if not all(np.isfinite(a).all() for a in ckpt.arrays.values()):
            raise DataLoss("federated weights hold NaN or infinite values")
        module = from_checkpoint(ckpt)
        evalset = EvalSet.from_bytes(self.store.get(parent.evalset_sha256))
        logits = predict(module, evalset.x)
        acc = float((logits.argmax(1) == evalset.y).mean()) if evalset.y is not None else None
        metrics = {"holdout_samples": float(len(evalset.x))}
        if acc is not None:
            metrics["holdout_accuracy"] = acc
        return self._register_module(
            parent.model,
            module,
            ckpt,
            evalset=evalset,
            torch_logits=logits,
            classes=parent.classes,
            metrics=metrics,
            lineage=Lineage(
                source="federated",
                parent_version=parent.version,
                dataset_name=f"federated:{federated.get('run_id', '')}",
                training_config=training_config,
                code_version=code_version(),
                federated=federated,
            ),
            key=key,
            progress=progress,
        )

    def _holdout_outputs(self, model: bytes, evalset: EvalSet) -> np.ndarray:
        return open_session(model, "onnxruntime").run(evalset.x)

    # -- quantize -----------------------------------------------------------------

    def quantize(
        self,
        ref: ModelRef,
        variants: Sequence[str],
        *,
        max_drop: float = DEFAULT_MAX_DROP,
        force: bool = False,
        progress: Progress = _noop,
    ) -> ModelVersion:
        if max_drop < 0:
            raise InvalidArgument(f"--max-drop {max_drop}: must be 0 or more accuracy points")
        mv = self.registry.get_version(ref)
        existing = {v.name for v in mv.variants}
        clash = sorted(existing & set(variants))
        if clash and not force:
            raise AlreadyExists(
                f"{mv.ref} already has variant(s) {', '.join(clash)}; pass --force to rebuild them"
            )
        needs_ckpt = [v for v in variants if KINDS[v].needs_checkpoint]
        if needs_ckpt and not mv.checkpoint_sha256:
            raise InvalidArgument(
                f"{mv.ref} was imported ({mv.lineage.origin.get('format', 'no checkpoint')}): "
                f"{', '.join(needs_ckpt)} need a trainable checkpoint; buildable: "
                + ", ".join(n for n in BUILDERS if not KINDS[n].needs_checkpoint)
            )
        key = self._signing_key()
        fp32 = mv.variant(_base_variant(mv))
        base = self.store.get(fp32.sha256)
        if not mv.evalset_sha256:
            raise InvalidArgument(
                f"{mv.ref} has no evaluation data; re-import it with --eval-data to quantize"
            )
        evalset = EvalSet.from_bytes(self.store.get(mv.evalset_sha256))
        sources = Sources(
            base, evalset.calibration, mv.inputs[0].shape[1:], lambda: self._module(mv)
        )
        built: list[BuiltVariant] = []
        for i, name in enumerate(variants):
            progress(name, i, len(variants))
            data, qcfg = BUILDERS[name](sources)
            built.append(
                measure(
                    KINDS[name],
                    data,
                    qcfg,
                    evalset,
                    baseline_accuracy=fp32.accuracy,
                    max_drop=max_drop,
                )
            )
        progress("register", len(variants), len(variants))
        make = sign_variants(
            built, model=mv.model, labels=_labels(mv.classes), store=self.store, key=key
        )
        return self.registry.add_variants(mv.model, mv.version, make(mv.version), replace=force)

    def _module(self, mv: ModelVersion) -> Any:
        from edgefleet.models.arch import from_checkpoint

        assert mv.checkpoint_sha256
        return from_checkpoint(load_checkpoint(self.store.get(mv.checkpoint_sha256)))

    # -- import -------------------------------------------------------------------

    def import_model(self, path: Path, name: str, *, eval_data: Path | None = None) -> ModelVersion:
        check_model_name(name)
        key = self._signing_key()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"model file {str(path)!r} not found") from None
        fmt, runtime, variant = _detect_format(path, data)
        session = open_session(data, runtime, threads=1)
        evalset = None
        classes: tuple[str, ...] = ()
        if eval_data is not None:
            x, y = _read_eval_npz(eval_data)
            try:
                out = session.run(x)
            except FleetError as e:
                raise InvalidArgument(f"--eval-data {eval_data.name}: {e}") from e
            if len(out) != len(x):
                raise InvalidArgument(f"model returned {len(out)} rows for {len(x)} inputs")
            evalset = EvalSet(x, y, x[:CALIBRATION_SAMPLES])
            classes = tuple(str(c) for c in np.unique(y))
        else:
            x1 = np.zeros(
                [1, *[max(d, 1) for d in session.inputs[0].shape[1:]]],
                dtype=session.inputs[0].dtype,
            )
            evalset = EvalSet(x1, None, x1)
        built = measure(
            KINDS[variant],
            data,
            {"mode": "imported", "format": fmt},
            evalset,
            baseline_accuracy=None,
            max_drop=0,
        )
        # the registry serves exactly these bytes: reread them and check outputs match the original's
        stored = self.store.get(self.store.put(data).sha256)
        reread = open_session(stored, runtime, threads=1).run(evalset.x)
        original = session.run(evalset.x)
        if not np.array_equal(reread, original):
            raise DataLoss(f"stored copy of {path.name} gives different outputs from the original")
        eval_ref = self.store.put(evalset.to_bytes()) if eval_data is not None else None
        new = NewVersion(
            arch=f"imported-{fmt}",
            inputs=built.inputs,
            outputs=built.outputs,
            classes=classes,
            metrics={"holdout_accuracy": built.accuracy} if built.accuracy is not None else {},
            lineage=Lineage(
                source="import",
                dataset_name=eval_data.name if eval_data else "",
                dataset_digest=hashlib.sha256(eval_data.read_bytes()).hexdigest()
                if eval_data
                else "",
                code_version=code_version(),
                origin={"file": path.name, "format": fmt, "sha256": built.sha256},
            ),
            checkpoint_sha256=None,
            evalset_sha256=eval_ref.sha256 if eval_ref else None,
        )
        make = sign_variants(
            [built], model=name, labels=_labels(classes), store=self.store, key=key
        )
        return self.registry.create_version(name, new, make)

    # -- verify and export ----------------------------------------------------------

    def verify(
        self,
        ref: ModelRef,
        keys: Mapping[str, Ed25519PublicKey],
        *,
        revoked: Sequence[str] = (),
    ) -> tuple[ModelVersion, list[VerifyResult]]:
        """Each variant's signature (by a key in `keys`, not in `revoked`), manifest and
        bytes; the detail names the key that signed."""
        mv = self.registry.get_version(ref)
        results = []
        for v in mv.variants:
            try:
                signed = SignedManifest.from_bytes(v.signed_manifest)
                if signed.key_id in revoked:
                    raise Unauthenticated(f"signed by key {signed.key_id}, which is revoked")
                public_key = keys.get(signed.key_id)
                if public_key is None:
                    raise Unauthenticated(
                        f"signed by key {signed.key_id or '(none)'}, which this fleet does not "
                        f"know (known: {', '.join(keys) or 'none'})"
                    )
                manifest = verify_manifest(signed, public_key)
                if (manifest.model, manifest.version, manifest.variant, manifest.sha256) != (
                    mv.model,
                    mv.version,
                    v.name,
                    v.sha256,
                ):
                    raise DataLoss(
                        f"manifest names {manifest.ref} sha256 {manifest.sha256}; registry row is "
                        f"{mv.ref}/{v.name} sha256 {v.sha256}"
                    )
                check_artifact(manifest, self.store.get(v.sha256))
                results.append(
                    VerifyResult(
                        v.name,
                        True,
                        f"signature ok (key {signed.key_id}), sha256 {v.sha256}, {v.size} bytes",
                    )
                )
            except FleetError as e:
                results.append(VerifyResult(v.name, False, f"{e.kind}: {e}"))
        for label, sha in (("weights.npz", mv.checkpoint_sha256), ("evalset", mv.evalset_sha256)):
            if sha:
                try:
                    self.store.get(sha)
                    results.append(VerifyResult(label, True, f"sha256 {sha}"))
                except FleetError as e:
                    results.append(VerifyResult(label, False, f"{e.kind}: {e}"))
        return mv, results

    def export(self, ref: ModelRef, out_dir: Path, *, variants: Sequence[str] = ()) -> list[Path]:
        mv = self.registry.get_version(ref)
        chosen = [mv.variant(n) for n in variants] if variants else list(mv.variants)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for v in chosen:
            stem = f"{mv.model}-{mv.version}-{v.name}"
            path = out_dir / f"{stem}.{KINDS[v.name].extension}"
            path.write_bytes(self.store.get(v.sha256))
            (out_dir / f"{stem}.manifest").write_bytes(v.signed_manifest)
            written += [path, out_dir / f"{stem}.manifest"]
        if mv.checkpoint_sha256 and not variants:
            p = out_dir / f"{mv.model}-{mv.version}-weights.npz"
            p.write_bytes(self.store.get(mv.checkpoint_sha256))
            written.append(p)
        return written


def _labels(classes: Sequence[str]) -> dict[str, str]:
    return {"task": "classification", "classes": json.dumps(list(classes))}


def _base_variant(mv: ModelVersion) -> str:
    names = {v.name for v in mv.variants}
    if "fp32" in names:
        return "fp32"
    raise InvalidArgument(
        f"{mv.ref} has no fp32 ONNX variant to quantize from (variants: {', '.join(sorted(names))})"
    )


def _detect_format(path: Path, data: bytes) -> tuple[str, str, str]:
    """(format, runtime, variant name) from the bytes, not the file name."""
    if len(data) >= 8 and data[4:8] == b"TFL3":
        s = open_session(data, "litert")
        quantized = s.inputs[0].dtype in ("int8", "uint8")
        return "tflite", "litert", "tflite-int8" if quantized else "tflite-fp32"
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
    except (DecodeError, onnx.checker.ValidationError, ValueError) as e:
        raise InvalidArgument(
            f"{path.name}: neither a TFLite flatbuffer nor a valid ONNX model ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            "accepted: .onnx, .tflite"
        ) from None
    if not model.graph.node:
        raise InvalidArgument(f"{path.name}: ONNX graph is empty; accepted: .onnx, .tflite")
    ops = {n.op_type for n in model.graph.node}
    quantized = bool(
        ops
        & {
            "QuantizeLinear",
            "DequantizeLinear",
            "QLinearMatMul",
            "QLinearConv",
            "MatMulInteger",
            "ConvInteger",
        }
    )
    return "onnx", "onnxruntime", "int8" if quantized else "fp32"


def _read_eval_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if path.suffix.lower() != ".npz":
        raise InvalidArgument(f"--eval-data {path.name}: expected a .npz file with arrays X and y")
    ds = load_dataset(str(path))
    # keep the labels as given: an imported classifier predicts them, not our indices
    labels = np.array([int(float(c)) for c in ds.classes], dtype=np.int64)
    return ds.x, labels[ds.y]
