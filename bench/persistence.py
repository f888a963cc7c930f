"""What Mosquitto's persistence costs: QoS 1 msgs/s with and without frequent autosave.

A real Mosquitto per configuration holds a retained store (`--persistence-retained`
desired states of 1 KB, what a fleet's pending deployments look like) and a persistent
subscriber session; a publisher sends `--persistence-messages` QoS 1 telemetry-sized
messages (200 B) with 100 in flight, timed until the subscriber has them all.
Configurations: persistence off; on with the 1800 s default autosave; on with
`autosave_interval 1` (what `ManagedBroker` writes: at most ~1 s of changes lost on
a crash); on with `autosave_on_changes` after every change.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench._table import Table

CONFIGS: dict[str, list[str]] = {
    "persistence off": ["persistence false"],
    "autosave 1800 s (default)": ["persistence true"],
    "autosave 1 s (ours)": ["persistence true", "autosave_interval 1"],
    "autosave every change": [
        "persistence true",
        "autosave_on_changes true",
        "autosave_interval 1",
    ],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("persistence")
    g.add_argument("--persistence-messages", type=int, default=30_000)
    g.add_argument("--persistence-retained", type=int, default=5_000)


def _one(lines: list[str], messages: int, retained: int) -> float:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edgefleet.cloud.broker import find_mosquitto, free_port

    state = Path(tempfile.mkdtemp(prefix="bench-persist-"))
    state.chmod(0o777)  # mosquitto started as root drops to its own user
    port = free_port()
    conf = state / "m.conf"
    conf.write_text(
        "\n".join(
            [
                f"listener {port} 127.0.0.1",
                "allow_anonymous true",
                f"persistence_location {state}/",
                "max_queued_messages 1000000",
                *lines,
            ]
        )
        + "\n"
    )
    proc = subprocess.Popen(
        [find_mosquitto(), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        # the subscriber (persistent session) and publisher are Mosquitto's own clients,
        # each in its own process: the broker is what is measured
        sub = subprocess.Popen(
            [
                "mosquitto_sub",
                "-p",
                str(port),
                "-c",
                "-i",
                "bench-sub",
                "-q",
                "1",
                "-t",
                "bench/tel/#",
                "-C",
                str(messages),
            ],
            stdout=subprocess.DEVNULL,
        )
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-retain")
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        for i in range(retained):
            info = pub.publish(f"bench/desired/{i}", b"d" * 1024, qos=1, retain=True)
            if i % 100 == 99:
                info.wait_for_publish(10)
        pub.loop_stop()
        pub.disconnect()
        time.sleep(2.5)  # an autosave of the retained store happens
        t0 = time.perf_counter()
        line = b"t" * 200 + b"\n"
        subprocess.run(
            ["mosquitto_pub", "-p", str(port), "-q", "1", "-t", "bench/tel/1", "-l"],
            input=line * messages,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        sub.wait(300)
        return messages / (time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(state, ignore_errors=True)


def run(args: argparse.Namespace) -> list[Table]:
    t = Table(
        f"Mosquitto persistence cost ({args.persistence_messages} QoS 1 msgs of 200 B, "
        f"{args.persistence_retained} retained of 1 KB)",
        ["configuration", "msgs/s", "vs off"],
    )
    base = 0.0
    for name, lines in CONFIGS.items():
        n = args.persistence_messages
        if "autosave_on_changes true" in lines:
            n = min(n, 1000)  # ~70 msgs/s: a full run would take minutes
        rate = _one(lines, n, args.persistence_retained)
        base = base or rate
        t.add(name, f"{rate:,.0f}", f"{rate / base:.2f}x")
    t.notes.append("mosquitto_pub -q 1 -l (N lines) into mosquitto_sub -c -q 1; loopback")
    return [t]
