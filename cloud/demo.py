"""`make demo`: the main job on embedded defaults, start to finish, then cleanup.

Fresh FLEET_HOME under .demo/ (SQLite, file:// store, new signing key): train the
digits CNN, build every variant, show the table, verify signatures, export, and
check one exported artifact the way a device does.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

logger = logging.getLogger("edgefleet.demo")


def step(title: str) -> None:
    sys.stderr.write(f"\n\033[1m== {title}\033[0m\n" if sys.stderr.isatty() else f"\n== {title}\n")


def main() -> int:
    from agent.cli import app as agent_app
    from cloud.cli.main import run

    root = Path(".demo").resolve()
    home = root / "home"
    shutil.rmtree(root, ignore_errors=True)
    h = ["--home", str(home)]
    steps = [
        ("fleet init", [*h, "init"]),
        (
            "fleet train --model digits --arch cnn",
            [*h, "train", "--model", "digits", "--arch", "cnn"],
        ),
        ("fleet quantize digits:1", [*h, "quantize", "digits:1"]),
        ("fleet models show digits:1", [*h, "models", "show", "digits:1"]),
        ("fleet models verify digits:1", [*h, "models", "verify", "digits:1"]),
        ("fleet models promote digits:1 --stage production", [*h, "models", "promote", "digits:1"]),
        (
            "fleet models export digits:1 --out .demo/dist",
            [*h, "models", "export", "digits:1", "--out", str(root / "dist")],
        ),
    ]
    for title, argv in steps:
        step(title)
        code = run(argv)
        if code != 0:
            sys.stderr.write(f"demo: '{title}' failed with exit code {code}\n")
            return code
    dist = root / "dist"
    step("fleet-agent verify (what a device does with an artifact it received)")
    code = agent_app(
        args=[
            "verify",
            str(dist / "digits-1-tflite-int8.tflite"),
            "--manifest",
            str(dist / "digits-1-tflite-int8.manifest"),
            "--public-key",
            str(home / "keys" / "signing.pub"),
        ],
        prog_name="fleet-agent",
        standalone_mode=False,
    )
    if code:
        return int(code)
    sys.stderr.write(f"\ndemo done: state in {home} (delete .demo/ to clean up)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
