"""A foreign-architecture Debian root filesystem to run the device agent in, under emulation.

`debootstrap` (Debian's own tool) builds the root filesystem for another architecture;
`qemu-user-static`, registered with the kernel's `binfmt_misc` with the F flag (the
interpreter is opened once, at registration), runs its programs, so a plain `chroot` into it
runs arm64 binaries on an x86_64 host. The chroot shares the host's network namespace:
a coordinator on the host's 127.0.0.1 is reachable from inside, and the other way round.

The bootstrapped tree is kept as a tarball in a cache folder, keyed by architecture, suite
and package list, so only the first run pays for debootstrap. Each command runs in its own
mount namespace (`unshare --mount`) where /proc, /dev and the requested host folders are
mounted into the tree: the mounts vanish with the process, even when it is killed.

Needs root (binfmt_misc, chroot, mounts) and the Debian packages `debootstrap`,
`qemu-user-static` and `binfmt-support` (`make arm64-deps`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BINFMT = Path("/proc/sys/fs/binfmt_misc")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# what `uname -m` says in the tree, and the binfmt_misc entry (qemu-user-static's name)
MACHINES = {"arm64": ("aarch64", "qemu-aarch64"), "armhf": ("armv7l", "qemu-arm")}


@dataclass(frozen=True)
class RootfsSpec:
    """What debootstrap builds: architecture, Debian suite and the packages it adds."""

    arch: str = "arm64"
    suite: str = "bookworm"
    packages: tuple[str, ...] = ("python3", "python3-venv", "ca-certificates")

    @property
    def machine(self) -> str:
        return MACHINES[self.arch][0]

    @property
    def key(self) -> str:
        """The cache key: a different suite or package list is a different tarball."""
        text = "\n".join([self.arch, self.suite, *sorted(self.packages)])
        return f"{self.suite}-{self.arch}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def missing_tools() -> list[str]:
    """The Debian packages this module needs that are not installed here."""
    tools = {
        "debootstrap": "debootstrap",
        "qemu-aarch64-static": "qemu-user-static",
        "update-binfmts": "binfmt-support",
        "unshare": "util-linux",
    }
    return [pkg for tool, pkg in tools.items() if shutil.which(tool) is None]


def enable_binfmt(arch: str = "arm64") -> str | None:
    """Make the kernel run `arch` binaries through qemu-user-static: mount binfmt_misc if
    it is not, enable the interpreter if it is not. None when done, else why not."""
    if os.geteuid() != 0:
        return "binfmt_misc, chroot and mounts need root"
    name = MACHINES[arch][1]
    if not (BINFMT / "register").exists():
        r = subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            return f"cannot mount binfmt_misc on {BINFMT}: {r.stderr.strip()}"
    entry = BINFMT / name
    if not entry.exists() or "enabled" not in entry.read_text():
        r = subprocess.run(["update-binfmts", "--enable", name], capture_output=True, text=True)
        if r.returncode != 0 or not entry.exists():
            return f"update-binfmts --enable {name} failed: {(r.stderr or r.stdout).strip()}"
    text = entry.read_text()
    if "enabled" not in text.splitlines()[0]:
        return f"{entry} is registered but disabled"
    flags = next((ln.split(":", 1)[1] for ln in text.splitlines() if ln.startswith("flags:")), "")
    if "F" not in flags:
        # without F the interpreter's path is looked up inside the chroot, where it is not
        return f"{entry} lacks the F flag (flags:{flags}); a chroot cannot find qemu"
    return None


def debian_mirror(sources: Sequence[Path] = ()) -> str:
    """The Debian mirror apt uses on this machine (its sources list), else deb.debian.org."""
    files = list(sources) or [
        Path("/etc/apt/sources.list"),
        *sorted(Path("/etc/apt/sources.list.d").glob("*.sources")),
        *sorted(Path("/etc/apt/sources.list.d").glob("*.list")),
    ]
    for f in files:
        try:
            lines = f.read_text().splitlines()
        except OSError:
            continue
        for ln in lines:
            words = ln.split("#", 1)[0].split()
            urls = words[1:] if words[:1] == ["URIs:"] else []
            if words[:1] == ["deb"]:
                urls = [w for w in words[1:] if "://" in w][:1]
            for url in urls:
                if "security" not in url and url.rstrip("/").endswith("/debian"):
                    return url
    return DEFAULT_MIRROR


def cached_rootfs(spec: RootfsSpec, cache: Path, *, mirror: str | None = None) -> Path:
    """The tarball of `spec`'s root filesystem in `cache`, debootstrapping it the first
    time (a partial build never lands under the final name)."""
    tarball = cache / f"{spec.key}.tar.gz"
    if tarball.exists():
        return tarball
    cache.mkdir(parents=True, exist_ok=True)
    work = cache / f"{spec.key}.building"
    _remove(work)
    root = work / "root"
    # in a private mount namespace: the /proc and /sys debootstrap mounts in the tree go
    # away with it, even when it is killed half-way
    cmd = [
        *("unshare", "--mount", "--propagation", "private"),
        "debootstrap",
        f"--arch={spec.arch}",
        "--variant=minbase",
        f"--include={','.join(spec.packages)}",
        spec.suite,
        str(root),
        mirror or debian_mirror(),
    ]
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            out, err = proc.communicate()
        except BaseException:  # a test timeout: debootstrap's dpkg runs in the group too
            stop(proc, timeout=5)
            raise
        r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        if r.returncode != 0:
            log = root / "debootstrap" / "debootstrap.log"
            tail = log.read_text()[-3000:] if log.exists() else r.stdout[-3000:]
            raise RuntimeError(f"{shlex.join(cmd)} failed ({r.returncode}): {r.stderr}{tail}")
        partial = work / "rootfs.tar.gz"
        subprocess.run(["tar", "-C", str(root), "-czf", str(partial), "."], check=True)
        partial.rename(tarball)
    finally:
        _remove(work)
    return tarball


def _remove(tree: Path) -> None:
    """Delete `tree`, unmounting first whatever is mounted inside it (never delete through
    a mount: a bind-mounted /dev is the host's)."""
    if not tree.exists():
        return
    prefix = str(tree.resolve()) + "/"
    mounted = [ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounted if m.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    if any(m.startswith(prefix) for m in Path("/proc/mounts").read_text().split()):
        raise RuntimeError(f"{tree}: cannot unmount what is mounted inside; not deleting it")
    shutil.rmtree(tree)


def unpack(tarball: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-C", str(dest), "-xzf", str(tarball)], check=True)
    return dest


@dataclass(frozen=True)
class Chroot:
    """Commands run as root (or `user`) inside `root`, with /proc, /dev and each of
    `binds` (host folders, mounted at the same path inside) in a private mount namespace.
    The host's DNS settings and CA bundle are copied in (a TLS-intercepting proxy's CA
    included), and PIP_CERT points pip at that bundle."""

    root: Path
    binds: tuple[Path, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in ("/etc/resolv.conf", "/etc/hosts"):
            if Path(f).exists():
                shutil.copy2(f, self.root / f.lstrip("/"), follow_symlinks=True)
        bundle = Path("/etc/ssl/certs/ca-certificates.crt")
        if bundle.exists():
            (self.root / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle, self.root / "etc/ssl/certs/host-ca-bundle.crt")
        for b in self.binds:
            (self.root / str(b).lstrip("/")).mkdir(parents=True, exist_ok=True)

    def argv(
        self, cmd: Sequence[str], *, user: str | None = None, env: Mapping[str, str] | None = None
    ) -> list[str]:
        r = shlex.quote(str(self.root))
        mounts = [
            f"mount -t proc proc {r}/proc",
            f"mount --rbind /dev {r}/dev",
            *(f"mount --bind {shlex.quote(str(b))} {r}{shlex.quote(str(b))}" for b in self.binds),
        ]
        spec = ["--userspec", f"{user}:{user}"] if user else []
        inner = shlex.join(
            ["chroot", *spec, str(self.root), "/usr/bin/env", "-i", *self._env(env), *cmd]
        )
        script = " && ".join([*mounts, f"exec {inner}"])
        return ["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c", script]

    def _env(self, extra: Mapping[str, str] | None) -> list[str]:
        base = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "PIP_CERT": "/etc/ssl/certs/host-ca-bundle.crt",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        }
        return [f"{k}={v}" for k, v in {**base, **self.env, **(extra or {})}.items()]

    def run(
        self,
        cmd: Sequence[str],
        *,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 1800,
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` inside (as `user`, with `env` added) and wait: exit code, stdout, stderr."""
        proc = subprocess.Popen(
            self.argv(cmd, user=user, env=env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def popen(
        self,
        cmd: Sequence[str],
        *,
        log: Path,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `cmd` inside, its output to `log`, in its own process group (see `stop`)."""
        with log.open("wb") as out:
            return subprocess.Popen(
                self.argv(cmd, user=user, env=env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 30) -> None:
    """SIGTERM to the process group of a `Chroot` command (unshare, sh, the program), then
    SIGKILL if it has not ended within `timeout`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
