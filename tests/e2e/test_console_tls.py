"""The console over HTTPS: `fleet serve --ui-tls` serves it with the certificate the
coordinator makes (the FleetService CA in FLEET_HOME/tls), a client that trusts that CA
signs in and gets a Secure cookie, one that does not is refused by TLS, a plain HTTP
request gets no page; a console off loopback without TLS is refused before anything
starts."""

from __future__ import annotations

import http.client
import ssl
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from edgefleet.cloud.broker import find_mosquitto
from edgefleet.protos.errors import NotFound
from tests.e2e.test_serve import REPO, _env, fleet_serve, serve_argv

try:
    find_mosquitto()
except NotFound:
    pytest.skip("mosquitto is not installed", allow_module_level=True)


@pytest.fixture
def home(fleet_home: Path) -> Path:
    from edgefleet.cloud.cli.main import run

    assert run(["--home", str(fleet_home), "init"]) == 0
    return fleet_home


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def test_console_over_https_signs_in_with_a_secure_cookie_and_refuses_plain_http(
    home: Path,
) -> None:
    with fleet_serve(home, "--ui-listen", "127.0.0.1:0", "--ui-tls") as (_proc, info):
        assert info.ui.startswith("https://127.0.0.1:"), info
        assert info.ui_ca, "serve.json names the CA that signed the console's certificate"
        ca = Path(info.ui_ca)
        assert ca.parent == home / "tls"
        trusting = ssl.create_default_context(cafile=str(ca))

        with urllib.request.urlopen(info.ui + "healthz", context=trusting, timeout=10) as r:
            assert r.status == 200 and r.read() == b"ok"

        # a client without the fleet's CA: the handshake fails, no page
        with pytest.raises(urllib.error.URLError) as refused:
            urllib.request.urlopen(
                info.ui + "healthz", context=ssl.create_default_context(), timeout=10
            )
        assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)

        # plain HTTP on the same port: no HTTP answer
        port = urllib.parse.urlsplit(info.ui).port
        assert port is not None
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain.request("GET", "/healthz")
            plain.getresponse()
        plain.close()

        # signing in: the token travels inside TLS and the cookie is Secure
        token = (home / "keys" / "token").read_text().strip()
        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=trusting), _NoRedirect()
        )
        body = urllib.parse.urlencode({"token": token, "next": "/"}).encode()
        with pytest.raises(urllib.error.HTTPError) as redirected:
            opener.open(info.ui + "login", data=body, timeout=10)
        assert redirected.value.code == 303
        cookie = redirected.value.headers["set-cookie"]
        assert cookie.startswith("fleet_console=") and token in cookie
        flags = {part.strip().lower() for part in cookie.split(";")}
        assert {"secure", "httponly", "samesite=strict"} <= flags, cookie
        redirected.value.close()


def test_console_off_loopback_without_tls_is_refused_in_one_line(home: Path) -> None:
    argv = serve_argv(home, "--ui-listen", "0.0.0.0:0", "--no-ui-tls")
    r = subprocess.run(
        argv,
        cwd=REPO,
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "--no-ui-tls with --ui-listen 0.0.0.0:0" in err, err
    assert "needs TLS" in err, err
    assert "Traceback" not in err, err
    assert not (home / "serve.json").exists(), "nothing started"
