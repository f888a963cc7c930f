"""The agent-only distribution on aarch64, under emulation, as docs/agent.md installs it.

A Debian arm64 root filesystem (debootstrap, cached as a tarball between runs) is run with
qemu-user-static through binfmt_misc. Inside it, as a device installer would: a venv in
/opt/edgefleet, the `edgefleet-agent` wheel built from this tree installed from the package
registry (PyPI's aarch64 wheels), `fleet-agent enroll` with a real bundle from `fleet
devices enroll --out`, `fleet-agent service install`, and the agent run as the unit's
ExecStart as the unit's user. A `fleet serve` coordinator on the host (the chroot shares
its network namespace, so loopback reaches it) deploys to it and to an x86_64 agent on the
host; both verify, activate, and answer the same local Predict with the same numbers.

Slow (minutes; see docs/agent.md for the measured times). Each phase's duration goes to
`$EDGEFLEET_CACHE/arm64-timings.json` (default ~/.cache/edgefleet).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Cli
from tests.e2e.test_identity import _free_port, _wait_for
from tests.e2e.test_packaging import _source_copy
from tests.e2e.test_serve import REPO, _env, fleet_serve
from tests.support.rootfs import Chroot, RootfsSpec, cached_rootfs, enable_binfmt, stop, unpack

# minutes under emulation; an empty cache adds debootstrap (see docs/agent.md for times)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

CACHE = Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache" / "edgefleet"))
SPEC = RootfsSpec(arch="arm64", suite="bookworm")
VENV = "/opt/edgefleet"
FLEET_AGENT = f"{VENV}/bin/fleet-agent"


def _require_emulation() -> None:
    if sys.platform != "linux":
        pytest.skip("needs Linux (binfmt_misc, chroot)")
    from tests.support.rootfs import missing_tools

    missing = missing_tools()
    if missing:
        pytest.skip(f"missing Debian packages: {' '.join(missing)} (make arm64-deps)")
    why = enable_binfmt(SPEC.arch)
    if why:
        pytest.skip(f"cannot run {SPEC.machine} binaries here: {why}")


class Phases:
    """Wall-clock seconds per phase, written out at the end (not asserted on)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - t0, 1)


def _ok(r: subprocess.CompletedProcess[str], what: str) -> str:
    assert r.returncode == 0, (
        f"{what} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    )
    return r.stdout


def _predict(port: int, x: np.ndarray) -> tuple[np.ndarray, str]:
    import grpc

    from edgefleet.agent.serde import decode_predict_response, encode_predict_request
    from edgefleet.protos.fleet.v1 import inference_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        out = decode_predict_response(stub.Predict(encode_predict_request(x), timeout=300))
    assert out.model is not None
    return np.asarray(out.output), f"{out.model.model}:{out.model.version}/{out.model.variant}"


DOC = REPO / "docs" / "agent.md"
# the device is a chroot where we are root: `sudo CMD` runs CMD, `sudo -u USER CMD` runuser
SUDO = 'sudo() { if [ "$1" = -u ]; then u=$2; shift 2; runuser -u "$u" -- "$@"; else "$@"; fi; }\n'
NO_SYSTEMD = ("sudo systemctl ", "journalctl ")  # a chroot has no systemd: run ExecStart instead


def doc_blocks(step: str) -> list[str]:
    """The ```bash blocks of docs/agent.md's section `## {step}`: what an installer types."""
    for section in re.split(r"^## ", DOC.read_text(), flags=re.M):
        if section.startswith(step):
            blocks = re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M)
            assert blocks, f"docs/agent.md: no bash block under '## {step}'"
            return blocks
    raise AssertionError(f"docs/agent.md has no section '## {step}'")


def as_typed(device: Chroot, block: str, *, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a block of docs/agent.md in the device's shell (bash, stop at the first error)."""
    script = f"{SUDO}cd {shlex.quote(str(cwd))}\n{block}"
    return _ok(device.run(["bash", "-euo", "pipefail", "-c", script], env=env), block)


def test_agent_on_aarch64_is_deployed_to_and_predicts_like_x86_64(
    cli: Cli, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _require_emulation()
    phases = Phases()
    t_start = time.monotonic()
    tarball = CACHE / "arm64-rootfs" / f"{SPEC.key}.tar.gz"
    cached = tarball.exists()

    # -- the device: a Debian arm64 tree, from the cache after the first run -------------
    with phases("rootfs (debootstrap + tar)" if not cached else "rootfs (cached)"):
        tarball = cached_rootfs(SPEC, CACHE / "arm64-rootfs")
    work = tmp_path_factory.mktemp("arm64")
    with phases("unpack"):
        root = unpack(tarball, work / "root")
    share = work / "share"  # mounted at the same path inside the chroot
    share.mkdir()
    # meant as pip's download cache between runs; pip 23.0 in the chroot has left it empty
    pip_cache = CACHE / "arm64-pip"
    pip_cache.mkdir(parents=True, exist_ok=True)
    device = Chroot(root, binds=(share, pip_cache), env={"PIP_CACHE_DIR": str(pip_cache)})
    assert _ok(device.run(["uname", "-m"]), "uname -m").strip() == "aarch64"
    file_of_python = _ok(
        device.run(["python3", "-c", "import platform; print(platform.machine())"]), "python3"
    )
    assert file_of_python.strip() == "aarch64"

    # -- the agent-only wheel, built from this tree --------------------------------------
    with phases("agent wheel"):
        src = _source_copy(work / "src")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "-w",
                str(share),
                str(src / "packaging" / "agent"),
            ],
            check=True,
            capture_output=True,
        )
        shutil.copy2(REPO / "constraints.txt", share / "constraints.txt")
    (wheel,) = share.glob("edgefleet_agent-*.whl")

    # -- docs/agent.md step 1, as typed on the device: PyPI's aarch64 wheels --------------
    assert wheel.name in DOC.read_text(), f"docs/agent.md does not install {wheel.name}"
    (step1,) = doc_blocks("1. Install")
    with phases("docs step 1: venv + pip install (registry)"):
        # the versions CI tests: pip reads PIP_CONSTRAINT as `-c constraints.txt`
        pinned = {"PIP_CONSTRAINT": str(share / "constraints.txt")}
        info = as_typed(device, step1, cwd=share, env=pinned)
    # the block ends in `fleet-agent info`: an aarch64 machine with ONNX Runtime
    assert re.search(r"^machine\s+aarch64$", info, re.M), info
    assert re.search(r"^runtimes\s+.*onnxruntime", info, re.M), info
    listed = _ok(device.run([f"{VENV}/bin/pip", "list", "--format=json"]), "pip list")
    names = {p["name"].lower() for p in json.loads(listed)}
    assert "edgefleet-agent" in names and "onnxruntime" in names
    assert not names & {"edgefleet", "torch", "sqlalchemy", "boto3"}, names
    gone = device.run([f"{VENV}/bin/python", "-c", "import edgefleet.cloud"])
    assert gone.returncode != 0 and "edgefleet.cloud" in gone.stderr

    # -- the coordinator on the host, a model to deploy ----------------------------------
    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.evaluation import EvalSet
    from edgefleet.cloud.registry import ModelRef

    home = work / "home"
    h = ("--home", str(home))
    with phases("coordinator: init + train + quantize"):
        assert cli(*h, "init").code == 0
        local = LocalClient(load_settings(home=home))
        local.train(
            "digits", "digits", arch="mlp", epochs=2, seed=0, batch_size=64, lr=3e-3, on_epoch=None
        )
        local.quantize(
            ModelRef("digits", 1), ["int8"], max_drop=100.0, force=False, progress=lambda *_: None
        )
        mv = local.registry.get_version(ModelRef("digits", 1))
        assert mv.evalset_sha256 is not None
        ev = EvalSet.from_bytes(local.pipeline.store.get(mv.evalset_sha256))
        local.close()

    x86_dir = work / "x86"
    arm_port, x86_port = _free_port("127.0.0.1"), _free_port("127.0.0.1")
    procs: list[subprocess.Popen[bytes]] = []
    with fleet_serve(home) as (_proc, _info):
        try:
            # the operator's commands of docs/agent.md step 0, and one x86_64 device
            enroll = ("devices", "enroll", "cam-01", "--group", "lobby", "--tag", "site=paris")
            r = cli(*h, *enroll, "--out", str(share / "cam-01.json"))
            assert r.code == 0, r.err
            r = cli(*h, "devices", "enroll", "x86-0", "--out", str(share / "x86-0.json"))
            assert r.code == 0, r.err

            # docs/agent.md steps 2 and 3 on the aarch64 device, as typed, but systemctl
            (step2,) = doc_blocks("2. Enrol")
            (step3,) = doc_blocks("3. Run it as a service")
            kept = [ln for ln in step3.splitlines() if not ln.startswith(NO_SYSTEMD)]
            assert len(kept) == len(step3.splitlines()) - 2, step3
            with phases("docs steps 2-3: enroll, service install, useradd, chown"):
                as_typed(device, step2, cwd=share)
                as_typed(device, "\n".join(kept) + "\n", cwd=share)
            assert not (share / "cam-01.json").exists()  # step 2 deletes the bundle
            unit = (root / "etc/systemd/system/edgefleet-agent.service").read_text()
            exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M)
            user = re.search(r"^User=(.*)$", unit, re.M)
            assert exec_start and user, unit
            assert exec_start.group(1).startswith(FLEET_AGENT + " run")
            log = work / "arm64-agent.log"
            # what systemd would start; the listen port is free here (50051 may not be)
            listen = {"FLEET_AGENT_LISTEN": f"127.0.0.1:{arm_port}"}
            cmd = exec_start.group(1).split()
            procs.append(device.popen(cmd, log=log, user=user.group(1), env=listen))

            # the x86_64 device: the same agent code on the host
            x86_dir.mkdir()
            agent = [sys.executable, "-m", "edgefleet.agent.cli"]
            cfg = ["--config", str(x86_dir / "agent.json")]
            subprocess.run(
                [
                    *agent,
                    "enroll",
                    str(share / "x86-0.json"),
                    *cfg,
                    "--state-dir",
                    str(x86_dir / "state"),
                    "--listen",
                    f"127.0.0.1:{x86_port}",
                ],
                cwd=REPO,
                env=_env(),
                check=True,
                capture_output=True,
                timeout=120,
            )
            with (x86_dir / "agent.log").open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [*agent, "run", *cfg],
                        cwd=REPO,
                        env=_env(),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )

            def online(dev: str) -> Callable[[], bool]:
                def check() -> bool:
                    for p in procs:
                        assert p.poll() is None, log.read_text()[-3000:]
                    r = cli(*h, "devices", "show", dev, "--json")
                    return r.code == 0 and bool(json.loads(r.out).get("online"))

                return check

            with phases("agent start until online (emulated)"):
                _wait_for(online("cam-01"), 600, "the aarch64 agent to come online")
            _wait_for(online("x86-0"), 120, "the x86_64 agent to come online")

            with phases("deploy: download, verify, self-test, activate"):
                r = cli(*h, "deploy", "digits:1", "--to", "device=cam-01,x86-0", "--timeout", "600")
            assert r.code == 0, r.out + r.err + log.read_text()[-3000:]
            rows = {ln.split()[0]: ln.split() for ln in r.out.splitlines() if ln.split()[:1]}
            assert rows["cam-01"][1:3] == ["int8", "active"], r.out
            assert rows["x86-0"][1:3] == ["int8", "active"], r.out
            shown = json.loads(cli(*h, "devices", "show", "cam-01", "--json").out)
            assert shown["active"]["variant"] == "int8", shown
            assert shown["capabilities"]["machine"] == "aarch64", shown

            with phases("predict (emulated)"):
                arm_out, arm_model = _predict(arm_port, ev.x)
            x86_out, x86_model = _predict(x86_port, ev.x)
            # docs/agent.md step 4 on the device: its Predict snippet, on this port
            (_operator, step4) = doc_blocks("4. Check it end to end")
            snippet = step4.replace("127.0.0.1:50051", f"127.0.0.1:{arm_port}")
            assert snippet != step4, step4
            said = as_typed(device, snippet, cwd=share)
            assert "digits" in said and "int8" in said, said
        finally:
            for p in procs:
                stop(p)
    assert arm_model == x86_model == "digits:1/int8"
    assert arm_out.shape == x86_out.shape == (len(ev.x), 10)
    # the same int8 graph: ONNX Runtime's integer kernels differ by architecture (NEON vs
    # AVX2/VNNI), so allow a small float difference; the classes agree on every row
    diff = float(np.abs(arm_out - x86_out).max())
    scale = float(np.abs(x86_out).max())
    assert diff <= 1e-3 * max(scale, 1.0), (diff, scale)
    assert (arm_out.argmax(1) == x86_out.argmax(1)).all()

    phases.seconds["total"] = round(time.monotonic() - t_start, 1)
    record = {"cached_rootfs": cached, "max_abs_diff": diff, "seconds": phases.seconds}
    (CACHE / "arm64-timings.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
