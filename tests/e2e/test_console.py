"""The fleet console in a real headless Chromium (Debian's `chromium`, driven by
Playwright; no browser is downloaded) against a real `fleet serve --ui-listen` with
simulated devices sending live traffic: the pages show what the database holds (text
and chart data), a rollout page follows the rollout without a reload, a request without
a token is refused, a viewer cannot act; the static HTML reports carry the same charts.

One `fleet serve`, one simulated fleet and one browser for the whole module.
Set FLEET_CONSOLE_SCREENSHOTS=DIR to also write the screenshots docs/images/ shows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.cloud.broker import find_mosquitto
from edgefleet.cloud.config import ServeInfo
from edgefleet.protos.errors import NotFound
from tests.conftest import Cli
from tests.e2e.test_newcomer import DEVICES, sim, wait_for
from tests.e2e.test_serve import REPO, _env, fleet_serve

try:
    find_mosquitto()
except NotFound:
    pytest.skip("mosquitto is not installed", allow_module_level=True)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (make system-deps)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="needs edgefleet[dev] (playwright)")

# DEVICES (6: profiles cpu,gpu, groups "cpu" and "gpu", 3 each) and the `sim` fixture
# (their live traffic, a drift fault on group gpu) are test_newcomer's
__all__ = ["sim"]
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits:1 and digits:2 (both good: the staged rollout goes through), digits:2 with
    an int8 variant beside fp32."""
    from edgefleet.cloud.cli.main import run

    h = tmp_path_factory.mktemp("console") / "home"
    base = ["--home", str(h)]
    assert run([*base, "init"]) == 0
    for seed in ("0", "1"):
        assert run([*base, "train", "--model", "digits", "--epochs", "2", "--seed", seed]) == 0
    assert run([*base, "quantize", "digits:2", "--variants", "int8", "--max-drop", "100"]) == 0
    return h


@pytest.fixture(scope="module")
def served(home: Path) -> Iterator[ServeInfo]:
    fast_drift = {"FLEET_DRIFT_INTERVAL": "1", "FLEET_DRIFT_WINDOW": "20"}
    with fleet_serve(home, "--ui-listen", "127.0.0.1:0", env=fast_drift) as (_proc, info):
        assert info.ui.startswith("http://127.0.0.1:"), info
        yield info


def devices(cli: Cli, home: Path) -> list[dict[str, Any]]:
    r = cli("--home", str(home), "devices", "ls", "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def fleet(home: Path, served: ServeInfo, sim: subprocess.Popen[bytes]) -> None:
    """Simulated devices with live traffic (test_newcomer's `sim`: a drift fault on group
    gpu), all on digits:1."""
    from edgefleet.cloud.cli.main import run
    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.config import load_settings

    local = LocalClient(load_settings(home=home))

    def ready() -> bool:
        found = local.devices.find()
        return sum(d.online and bool(d.capabilities) for d in found) == DEVICES

    wait_for("simulated devices online", ready)
    local.close()
    assert sim.poll() is None, (home / "sim.log").read_text()
    assert run(["--home", str(home), "deploy", "digits:1", "--to", "all", "--timeout", "120"]) == 0


@pytest.fixture(scope="module")
def viewer_token(home: Path, served: ServeInfo) -> str:
    from edgefleet.cloud.access import open_access_store
    from edgefleet.cloud.config import load_settings

    tokens = open_access_store(load_settings(home=home).registry_url)
    try:
        return tokens.create_token("console-viewer", "viewer", created_by="test")[1]
    finally:
        tokens.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def signed_in(browser: Any, ui: str, token: str) -> Any:
    """A browser page signed in through the login form (the HttpOnly cookie)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(ui)
    assert "/login" in page.url  # no token yet: the form
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(ui)
    page.js_errors = errors  # read by the tests: no page may throw
    return page


@pytest.fixture(scope="module")
def admin(browser: Any, home: Path, served: ServeInfo, fleet: None) -> Iterator[Any]:
    page = signed_in(browser, served.ui, (home / "keys" / "token").read_text().strip())
    yield page
    page.context.close()


def chart(page: Any, chart_id: str) -> dict[str, Any]:
    """The spec uPlot drew (waits until the chart is drawn)."""
    page.wait_for_function(
        f"window.fleetCharts && window.fleetCharts[{chart_id!r}]", timeout=WAIT_MS
    )
    got: dict[str, Any] = page.evaluate(
        f"(() => {{ const c = window.fleetCharts[{chart_id!r}];"
        " return {spec: c.spec, drawn: c.plot ? c.plot.data.length : 0}; })()"
    )
    return got


def bars(spec: dict[str, Any]) -> dict[str, float]:
    return dict(zip(spec["xlabels"], spec["series"][0]["values"], strict=True))


def _get(url: str, **headers: str) -> tuple[int, str, dict[str, str]]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    req = urllib.request.Request(url, headers=headers)
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def _post(url: str, data: dict[str, str], **headers: str) -> tuple[int, str]:
    from urllib.parse import urlencode

    req = urllib.request.Request(url, data=urlencode(data).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_a_request_without_a_valid_token_is_refused(served: ServeInfo, browser: Any) -> None:
    ui = served.ui
    code, _body, headers = _get(ui, Accept="text/html")
    assert code == 303 and headers["location"] == "/login?next=%2F"
    code, body, _ = _get(ui + "devices")
    assert code == 401 and "token" in body
    code, _body, _ = _get(ui + "devices", Authorization="Bearer not-a-token")
    assert code == 401
    code, _body, _ = _get(ui + "static/console.js")
    assert code == 200  # the login page's own files are public
    page = browser.new_page()
    try:
        page.goto(ui + "rollouts")
        assert page.url == ui + "login?next=%2Frollouts"
        page.fill("#token", "wrong")
        page.click("button[type=submit]")
        assert "not valid" in page.text_content("#login-error")
        assert "Rollouts" not in page.text_content("header")  # still signed out
    finally:
        page.close()


def test_overview_shows_what_the_database_holds(admin: Any, home: Path, cli: Cli) -> None:
    page = admin
    page.goto(page.url.split("?")[0])
    listed = devices(cli, home)
    assert len(listed) == DEVICES
    page.wait_for_function(f"document.querySelector('#n-online').textContent == '{DEVICES}'")
    assert page.text_content("#n-total") == str(DEVICES)
    assert page.text_content("#n-offline") == "0"
    by_version = Counter(f"{d['active']['model']}:{d['active']['version']}" for d in listed)
    assert by_version == {"digits:1": DEVICES}
    got = chart(page, "by-version")
    assert got["drawn"] == 2  # x and one series
    assert bars(got["spec"]) == {"digits:1": DEVICES}
    assert bars(chart(page, "by-state")["spec"]) == dict(Counter(d["state"] for d in listed))
    assert bars(chart(page, "by-variant")["spec"]) == dict(
        Counter(d["active"]["variant"] for d in listed)
    )
    groups = page.inner_text("#groups")
    assert "cpu\t3\t3" in groups and "gpu\t3\t3" in groups
    # live traffic: telemetry arrives every second, the activity chart counts the devices
    page.wait_for_function(
        "window.fleetCharts.activity.spec.series[0].values.some(v => v >= 1)", timeout=WAIT_MS
    )
    assert not page.js_errors


def test_device_list_filters_pages_and_device_page(admin: Any, home: Path, cli: Cli) -> None:
    page = admin
    ui = page.url.split("/")[0] + "//" + page.url.split("/")[2] + "/"
    page.goto(ui + "devices?group=gpu")
    assert page.text_content("#device-total") == "3"
    rows = page.locator("#devices tr[data-device]")
    assert rows.count() == 3
    gpu = sorted(d["device_id"] for d in devices(cli, home) if d["group"] == "gpu")
    assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.device)")) == gpu
    page.goto(ui + "devices?per_page=4")
    assert page.locator("#devices tr[data-device]").count() == 4
    page.click("#next")
    assert page.locator("#devices tr[data-device]").count() == DEVICES - 4

    device = gpu[0]
    page.goto(ui + f"devices/{device}")
    shown = json.loads(cli("--home", str(home), "devices", "show", device, "--json").out)
    assert page.text_content("#device-model").split()[0] == "digits:1"
    caps = page.inner_text("#capabilities")
    for key in shown["capabilities"]:
        assert key in caps
    updates = page.inner_text("#updates")
    assert "digits:1" in updates and "ok" in updates  # the deploy, its reason code
    page.wait_for_function(
        "window.fleetCharts['device-predictions']"
        " && window.fleetCharts['device-predictions'].spec.x.length > 0",
        timeout=WAIT_MS,
    )
    assert not page.js_errors


def test_rollout_page_follows_a_rollout_live_and_a_viewer_cannot_act(
    admin: Any,
    browser: Any,
    home: Path,
    served: ServeInfo,
    viewer_token: str,
    cli: Cli,
    tmp_path: Path,
) -> None:
    ui = served.ui
    deploy = subprocess.Popen(
        [
            *(sys.executable, "-m", "edgefleet.cloud.cli.main", "--home", str(home), "deploy"),
            *("digits:2", "--to", "all", "--canary", "34%", "--waves", "100%"),
            *("--bake", "4s", "--min-samples", "10", "--json"),
        ],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def newest() -> dict[str, Any] | None:
            r = cli("--home", str(home), "rollouts", "ls", "--json")
            found = [x for x in json.loads(r.out or "[]") if x["ref"] == "digits:2"]
            return found[0] if found else None

        rollout_id = wait_for("the staged rollout", newest, timeout=60)["rollout_id"]
        page = admin
        page.goto(ui + f"rollouts/{rollout_id}")
        page.evaluate("window.notReloaded = true")
        first = page.text_content("h1 .pill")
        assert first not in ("done", "rolled_back", "aborted"), first
        assert page.locator("#rollout-actions button").count() == 3  # the admin may act
        out, err = deploy.communicate(timeout=180)
    finally:
        if deploy.poll() is None:
            deploy.kill()
            deploy.wait()
    assert deploy.returncode == 0, err
    final = json.loads(out)
    assert final["state"] == "done", final
    # the page followed it without a reload (htmx swapped #live)
    page.wait_for_function("document.querySelector('h1 .pill').textContent == 'done'")
    assert page.evaluate("window.notReloaded") is True
    shown = json.loads(cli("--home", str(home), "rollouts", "show", rollout_id, "--json").out)
    canary = shown["stages"][0]
    gates = chart(page, "gates-0")["spec"]
    assert gates["xlabels"] == [g["name"] for g in canary["gates"]]
    assert gates["series"][0]["values"] == pytest.approx([g["value"] for g in canary["gates"]])
    assert gates["series"][1]["values"] == pytest.approx([g["threshold"] for g in canary["gates"]])
    states = chart(page, "stage-states")["spec"]
    assert states["xlabels"] == [s["name"] for s in shown["stages"]]
    assert {s["label"]: sum(s["values"]) for s in states["series"]} == dict(
        Counter(d["state"] or d["phase"] for d in shown["devices"])
    )
    assert not page.js_errors

    # a viewer reads it but gets no buttons, and a POST is refused (and audited)
    viewer = signed_in(browser, ui, viewer_token)
    try:
        viewer.goto(ui + f"rollouts/{rollout_id}")
        assert viewer.text_content("h1 .pill") == "done"
        assert viewer.locator("#rollout-actions").count() == 0
        assert "console-viewer (viewer)" in viewer.text_content("header .who")
    finally:
        viewer.context.close()
    code, body = _post(
        ui + f"rollouts/{rollout_id}/control",
        {"action": "abort"},
        Authorization=f"Bearer {viewer_token}",
    )
    assert code == 403 and "needs role operator" in body
    audit = cli("--home", str(home), "audit", "ls", "--json")
    assert audit.code == 0, audit.err
    refused = [e for e in json.loads(audit.out) if e["who"] == "console-viewer"]
    assert refused and refused[-1]["result"] == "PERMISSION_DENIED", refused

    # the static report of the same rollout carries the same charts, no server needed
    report = tmp_path / "rollout.html"
    r = cli("--home", str(home), "report", "rollout", rollout_id, "--html", str(report))
    assert r.code == 0, r.err
    html = report.read_text()
    assert "<script src=" not in html and "http" not in html.split("<body>", 1)[1][:200]
    static = browser.new_page()
    try:
        static.goto(report.as_uri())
        assert chart(static, "gates-0")["spec"] == gates
        assert static.locator("#rollout-devices tr").count() == DEVICES + 1
    finally:
        static.close()


def test_models_page_and_model_report(
    admin: Any, browser: Any, home: Path, served: ServeInfo, cli: Cli, tmp_path: Path
) -> None:
    page = admin
    page.goto(served.ui + "models")
    assert page.locator("table.versions a", has_text="digits:2").count() == 1
    page.goto(served.ui + "models/digits/2")
    shown = json.loads(cli("--home", str(home), "models", "show", "digits:2", "--json").out)
    variants = chart(page, "variants")["spec"]
    expected = sorted(shown["variants"], key=lambda v: v["size"])
    assert len(expected) == 2  # fp32 and int8: two points on the size-accuracy chart
    assert variants["x"] == pytest.approx([v["size"] / 1024 for v in expected])
    assert variants["series"][0]["values"] == pytest.approx([v["accuracy"] for v in expected])
    # devices run digits:2 now: the live latency histogram per variant has counts
    page.wait_for_function(
        "window.fleetCharts['live-latency']"
        " && window.fleetCharts['live-latency'].spec.series"
        ".some(s => s.values.some(v => v > 0))",
        timeout=WAIT_MS,
    )
    report = tmp_path / "digits-2.html"
    r = cli("--home", str(home), "models", "show", "digits:2", "--html", str(report))
    assert r.code == 0, r.err
    static = browser.new_page()
    try:
        static.goto(report.as_uri())
        assert chart(static, "variants")["spec"] == variants
    finally:
        static.close()


def test_drift_page_shows_psi_per_group_and_the_open_alert(
    admin: Any, served: ServeInfo, home: Path
) -> None:
    page = admin
    page.goto(served.ui + "drift")
    page.wait_for_selector("#alerts tr[data-subject=gpu]", timeout=60_000)
    psi = chart(page, "psi")["spec"]
    labels = {s["label"] for s in psi["series"]}
    assert any(label.startswith("gpu (") for label in labels), labels
    assert "threshold" in labels
    gpu = next(s for s in psi["series"] if s["label"].startswith("gpu ("))
    assert max(v for v in gpu["values"] if v is not None) > 0.2
    assert not page.js_errors


def test_federated_run_page_shows_its_rounds(admin: Any, served: ServeInfo, home: Path) -> None:
    """A run as the federation records it (rounds appended as the ServerApp journals
    them); the page shows its per-round metrics, participants and skips."""
    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.fl.store import FlRun, FlStore

    page = admin
    page.goto(served.ui + "fl")
    assert "no federated runs yet" in page.inner_text("#fl-runs")
    store = FlStore(load_settings(home=home).registry_url)
    try:
        store.create_run(FlRun("run-console", "digits", 1, "fedavg", 3, {}, "running"))
        store.update_run(
            "run-console",
            participants=["sim-0000", "sim-0001"],
            skipped={"sim-0002": "no training data"},
        )
        for rnd, acc in ((1, 0.61), (2, 0.78)):
            store.update_run(
                "run-console",
                history_append={
                    "event": "round",
                    "round": rnd,
                    "participants": ["sim-0000", "sim-0001"][:rnd],
                    "errors": {"sim-0001": "timeout"} if rnd == 1 else {},
                    "train": {"loss": 1.0 / rnd},
                    "evaluate": {"accuracy": acc},
                },
            )
    finally:
        store.close()
    page.goto(served.ui + "fl/run-console")
    rounds = chart(page, "rounds")["spec"]
    assert rounds["x"] == [1.0, 2.0]
    series = {s["label"]: s["values"] for s in rounds["series"]}
    assert series == {"evaluate.accuracy": [0.61, 0.78], "train.loss": [1.0, 0.5]}
    assert chart(page, "participants")["spec"]["series"][0]["values"] == [1.0, 2.0]
    assert "sim-0002" in page.inner_text("#participants")
    assert "no training data" in page.inner_text("#participants")
    assert "sim-0001: timeout" in page.inner_text("#rounds")
    page.goto(served.ui + "fl")
    assert "run-console" in page.inner_text("#fl-runs")
    assert not page.js_errors


@pytest.mark.skipif(
    not os.environ.get("FLEET_CONSOLE_SCREENSHOTS"), reason="set FLEET_CONSOLE_SCREENSHOTS=DIR"
)
def test_screenshots(admin: Any, served: ServeInfo, home: Path) -> None:
    """The pictures in docs/images/ (FLEET_CONSOLE_SCREENSHOTS=docs/images)."""
    out = Path(os.environ["FLEET_CONSOLE_SCREENSHOTS"])
    out.mkdir(parents=True, exist_ok=True)
    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.config import load_settings

    local = LocalClient(load_settings(home=home))
    rollouts = [{"rollout_id": r.rollout_id} for r in local.rollouts.find(active_only=False)]
    local.close()
    shots = {
        "console-overview": "",
        "console-rollout": f"rollouts/{rollouts[0]['rollout_id']}" if rollouts else "rollouts",
        "console-model": "models/digits/2",
        "console-drift": "drift",
    }
    page = admin
    for name, path in shots.items():
        page.goto(served.ui + path)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out / f"{name}.png"), full_page=True)
