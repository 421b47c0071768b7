"""The hub serves the prebuilt OHIF viewer (viewer_api/routes/viewer.py), checked over real HTTP
against uvicorn: index.html at OHIF's routes (or the sign-in page without a session), a
generated app-config.js pointing at the hub's own DICOMweb, bundles and wasm codecs with the
right types and cache headers, nothing outside the build reachable, a clear 503 when it is
not installed, and the hub's own routes never swallowed by the viewer's.

Tests of the real build need ``scripts/install_viewer.sh`` to have run (``require_peer``:
skipped, or failed under TELERAD_REQUIRE_PEERS=1). The others use a small fake build in a
temporary directory via ``TELERAD_VIEWER_DIR``.
"""

from __future__ import annotations

import gzip
import html
import http.client
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from reading_queue.accounts import Accounts
from tests.support.peers import require_peer
from tests.support.telerad_procs import InProcessHub
from viewer_api.routes import viewer

NO_DICOM = -1
HASHED_BUNDLE = "app.bundle.0123456789abcdef0123.js"
FAKE_INDEX = (
    "<!doctype html><html><head><script>window.PUBLIC_URL = '/';</script>"
    '<script src="/app-config.js"></script></head><body><div id="root"></div>'
    f'<script defer="defer" src="/{HASHED_BUNDLE}"></script></body></html>'
)


PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessHub]:
    """One hub for the module: the viewer directory is looked up per request, so each test
    points ``TELERAD_VIEWER_DIR`` where it needs."""
    with InProcessHub(tmp_path_factory.mktemp("viewer-hub") / "hub", dicom_port=NO_DICOM) as h:
        Accounts(h.hub.ingest.engine).add_user(
            "reader", "radiologist", PASSWORD, radiologist="dr.reader"
        )
        yield h


@pytest.fixture
def client(hub: InProcessHub) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hub.url, timeout=30) as c:
        yield c


@pytest.fixture
def signed_in(hub: InProcessHub) -> Iterator[httpx.Client]:
    """A visitor with a live session: a browser signed in at /login (cookie)."""
    with httpx.Client(base_url=hub.url, timeout=30) as c:
        page = c.get("/login")
        csrf = c.cookies["telerad_csrf"]
        done = c.post(
            "/api/auth/login",
            data={"username": "reader", "password": PASSWORD, "csrf_token": csrf},
            headers={"Origin": hub.url, "Accept": "application/json"},
        )
        assert page.status_code == 200 and done.status_code == 200, done.text
        yield c


def test_a_dead_session_cookie_is_sent_to_sign_in(client: httpx.Client) -> None:
    answer = client.get(
        "/viewer?StudyInstanceUIDs=1.2.3", headers={"Cookie": "telerad_session=stale-value"}
    )
    assert answer.status_code == 302
    assert answer.headers["location"].startswith("/login?next=")


@pytest.fixture
def real_dist(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The installed OHIF build (the default place, or ``TELERAD_VIEWER_DIR`` if set)."""
    dist = viewer.viewer_dir()
    require_peer(
        "OHIF viewer",
        viewer.viewer_installed(dist),
        f"no built viewer in {dist} (run scripts/install_viewer.sh)",
    )
    monkeypatch.setenv(viewer.VIEWER_DIR_ENV, str(dist))
    return dist


@pytest.fixture
def fake_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny build with OHIF's layout, and a secret file next to it that must stay out of
    reach."""
    dist = tmp_path / "dist"
    (dist / "assets" / "images").mkdir(parents=True)
    (dist / "index.html").write_text(FAKE_INDEX)
    bundle = b"console.log('telerad');\n" * 200
    (dist / HASHED_BUNDLE).write_bytes(bundle)
    (dist / f"{HASHED_BUNDLE}.gz").write_bytes(gzip.compress(bundle))
    (dist / "app.bundle.css").write_text("body { color: black }\n")
    (dist / "0123456789abcdef0123.wasm").write_bytes(b"\0asm\1\0\0\0")
    (dist / "assets" / "images" / "logo.svg").write_text("<svg/>")
    (dist / "app-config.js").write_text("window.config = {from: 'disk'};")
    (dist / "sw.js").write_text("importScripts('https://cdn.invalid/workbox.js');")
    (dist / "_headers").write_text("/* x-from-disk: 1")
    (dist / ".hidden").write_text("hidden")
    (dist / "healthz").write_text("not the hub's health")
    (tmp_path / "secret.txt").write_text("outside the build")
    (dist / "assets" / "escape.txt").symlink_to(tmp_path / "secret.txt")
    monkeypatch.setenv(viewer.VIEWER_DIR_ENV, str(dist))
    return dist


def _raw_get(
    hub: InProcessHub, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """A GET with ``path`` sent exactly as written (httpx would normalise ``..`` away)."""
    host, port = hub.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        conn.close()


def _config_json(script: str) -> dict[str, Any]:
    match = re.search(r"^window\.config = (\{.*?^\});$", script, re.S | re.M)
    assert match, script[:500]
    config: dict[str, Any] = json.loads(match.group(1))
    return config


# -- index.html and sign-in ---------------------------------------------------------------------


def test_viewer_opens_a_study_from_the_real_build(signed_in: httpx.Client, real_dist: Path) -> None:
    answer = signed_in.get("/viewer", params={"StudyInstanceUIDs": "1.2.3"})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    assert answer.content == (real_dist / "index.html").read_bytes()  # served as built
    assert 'src="/app-config.js"' in answer.text
    bundles = re.findall(r'src="/(app\.bundle\.[0-9a-f]+\.js)"', answer.text)
    assert bundles and (real_dist / bundles[0]).is_file()
    assert answer.headers["cache-control"] == "no-cache"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["referrer-policy"] == "same-origin"
    csp = answer.headers["content-security-policy"]
    assert "'wasm-unsafe-eval'" in csp and "worker-src 'self' blob:" in csp
    # OHIF's inline scripts run by hash, nothing else inline
    assert len(re.findall(r"'sha256-[A-Za-z0-9+/=]+'", csp)) >= 1
    assert "'unsafe-inline'" not in csp.split("script-src", 1)[1].split(";", 1)[0]
    # every OHIF client route and the study list answer the same page
    for path in ("/viewer/dicomweb", "/", "/segmentation", "/microscopy"):
        again = signed_in.get(path, params={"StudyInstanceUIDs": "1.2.3"})
        assert again.status_code == 200 and again.content == answer.content, path
    head = signed_in.head("/viewer")
    assert head.status_code == 200 and head.content == b""


def test_a_visit_without_a_session_goes_to_sign_in(
    hub: InProcessHub, client: httpx.Client, fake_dist: Path
) -> None:
    answer = client.get("/viewer", params={"StudyInstanceUIDs": "1.2.3\\4.5.6"})
    assert answer.status_code == 302
    location = urlsplit(answer.headers["location"])
    assert location.path == "/login"
    # ``next`` is the request target as sent, so the sign-in page can go back to it verbatim
    assert parse_qs(location.query) == {"next": ["/viewer?StudyInstanceUIDs=1.2.3%5C4.5.6"]}
    assert answer.headers["cache-control"] == "no-store"
    # a raw backslash (as some browsers send it) comes back percent-encoded, never as ``\``
    status, headers, _ = _raw_get(hub, "/viewer?StudyInstanceUIDs=1.2.3\\4.5.6,7.8")
    assert status == 302
    [target] = parse_qs(urlsplit(headers["location"]).query)["next"]
    assert target == "/viewer?StudyInstanceUIDs=1.2.3%5C4.5.6,7.8"
    assert client.get("/").headers["location"] == "/login?next=/"
    # the static files themselves hold no patient data: no session needed
    assert client.get(f"/{HASHED_BUNDLE}").status_code == 200
    assert client.get("/app-config.js").status_code == 200


def test_a_reader_signs_in_and_lands_on_the_study(hub: InProcessHub, fake_dist: Path) -> None:
    """The whole round trip through the hub's sign-in page (viewer_api/routes/login.py)."""
    accounts = hub.hub.app.state.accounts
    if all(u.username != "viewer-reader" for u in accounts.users()):  # one hub per module
        accounts.add_user("viewer-reader", "admin", "correct horse battery staple")
    with httpx.Client(base_url=hub.url, timeout=30) as browser:
        visit = browser.get("/viewer?StudyInstanceUIDs=1.2.3,4.5.6")  # as OHIF links are
        assert visit.status_code == 302
        page = browser.get(visit.headers["location"])
        assert page.status_code == 200
        [token] = re.findall(r'name="csrf_token" value="([^"]+)"', page.text)
        [next_path] = re.findall(r'name="next" value="([^"]+)"', page.text)
        signed = browser.post(
            "/api/auth/login",
            data={
                "username": "viewer-reader",
                "password": "correct horse battery staple",
                "next": html.unescape(next_path),
                "csrf_token": token,
            },
            headers={"Origin": hub.url, "Accept": "text/html"},
        )
        assert signed.status_code == 303
        assert signed.headers["location"] == "/viewer?StudyInstanceUIDs=1.2.3,4.5.6"
        viewer_page = browser.get(signed.headers["location"])
        assert viewer_page.status_code == 200
        assert viewer_page.text == FAKE_INDEX


# -- app-config.js -------------------------------------------------------------------------------


def test_app_config_is_generated_for_this_hub(client: httpx.Client, fake_dist: Path) -> None:
    answer = client.get("/app-config.js")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/javascript")
    assert answer.headers["cache-control"] == "no-cache"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert "from: 'disk'" not in answer.text  # never the build's own file
    assert 'window.location.origin + "/dicom-web"' in answer.text
    config = _config_json(answer.text)
    assert config == viewer.ohif_config()
    assert config["defaultDataSourceName"] == "dicomweb"
    assert config["investigationalUseDialog"] == {"option": "never"}
    assert config["showStudyList"] is True
    [source] = config["dataSources"]
    assert source["sourceName"] == "dicomweb"
    settings = source["configuration"]
    for flag in (
        "qidoSupportsIncludeField",
        "enableStudyLazyLoad",
        "supportsFuzzyMatching",
        "supportsWildcard",
        "omitQuotationForMultipartRequest",
    ):
        assert settings[flag] is True, flag
    assert settings["imageRendering"] == settings["thumbnailRendering"] == "wadors"


def test_app_config_roots_are_the_pages_origin(
    client: httpx.Client, hub: InProcessHub, fake_dist: Path
) -> None:
    """Run the script as a browser would (node, with ``window.location`` of the hub)."""
    node = shutil.which("node")
    require_peer("Node.js", node is not None, "node not on PATH (apt-get install nodejs)")
    assert node is not None
    script = client.get("/app-config.js").text
    harness = (
        f"var window = {{location: {{origin: {json.dumps(hub.url)}, pathname: '/viewer',"
        " search: ''}};\n"
        f"{script}\n"
        "var c = window.config.dataSources[0].configuration;\n"
        "console.log(JSON.stringify({qido: c.qidoRoot, wado: c.wadoRoot, uri: c.wadoUriRoot,"
        " handler: typeof window.config.httpErrorHandler}));\n"
    )
    done = subprocess.run(
        [node, "-e", harness], capture_output=True, text=True, timeout=60, check=True
    )
    roots = json.loads(done.stdout)
    expected = f"{hub.url}/dicom-web"
    assert roots == {"qido": expected, "wado": expected, "uri": expected, "handler": "function"}


# -- bundles, codecs, caching --------------------------------------------------------------------


def test_bundles_and_codecs_of_the_real_build(
    client: httpx.Client, signed_in: httpx.Client, real_dist: Path
) -> None:
    index = signed_in.get("/viewer").text
    bundle = re.findall(r'src="/(app\.bundle\.[0-9a-f]+\.js)"', index)[0]
    plain = client.get(f"/{bundle}", headers={"Accept-Encoding": "identity"})
    assert plain.status_code == 200
    assert plain.headers["content-type"] == "text/javascript; charset=utf-8"
    assert plain.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert plain.headers["x-content-type-options"] == "nosniff"
    assert "content-encoding" not in plain.headers
    assert plain.content == (real_dist / bundle).read_bytes()
    if (real_dist / f"{bundle}.gz").is_file():  # install_viewer.sh precompresses
        packed = client.get(f"/{bundle}", headers={"Accept-Encoding": "gzip"})
        assert packed.headers["content-encoding"] == "gzip"
        assert packed.headers["vary"] == "Accept-Encoding"
        assert int(packed.headers["content-length"]) < len(plain.content)
        assert packed.content == plain.content  # httpx decodes it

    wasm = sorted(real_dist.glob("*.wasm"))[0].name
    codec = client.get(f"/{wasm}", headers={"Accept-Encoding": "identity"})
    assert codec.status_code == 200
    assert codec.headers["content-type"] == "application/wasm"
    assert codec.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert codec.content.startswith(b"\0asm")

    css = client.get("/app.bundle.css")  # not hashed: revalidated, answered 304 when unchanged
    assert css.headers["content-type"] == "text/css; charset=utf-8"
    assert css.headers["cache-control"] == "no-cache"
    again = client.get("/app.bundle.css", headers={"If-None-Match": css.headers["etag"]})
    assert again.status_code == 304 and again.content == b""

    types = {".woff2": "font/woff2", ".svg": "image/svg+xml", ".json": "application/json"}
    for suffix, media_type in types.items():
        name = sorted(real_dist.glob(f"*{suffix}"))[0].name
        answer = client.get(f"/{name}")
        assert answer.status_code == 200, name
        assert answer.headers["content-type"] == media_type, name


def test_every_directory_of_the_real_build_is_served(client: httpx.Client, real_dist: Path) -> None:
    """An OHIF upgrade that adds a top-level directory fails here, not in a reader's browser."""
    directories = {p.name for p in real_dist.iterdir() if p.is_dir()}
    assert directories == set(viewer.ASSET_DIRS)
    for directory in sorted(directories):
        first = next(p for p in sorted((real_dist / directory).rglob("*")) if p.is_file())
        relative = first.relative_to(real_dist).as_posix()
        answer = client.get(f"/{relative}", headers={"Accept-Encoding": "identity"})
        assert answer.status_code == 200, relative
        assert answer.content == first.read_bytes(), relative


def test_precompressed_files_follow_accept_encoding(hub: InProcessHub, fake_dist: Path) -> None:
    (fake_dist / f"{HASHED_BUNDLE}.br").write_bytes(b"pretend brotli")
    original = (fake_dist / HASHED_BUNDLE).read_bytes()
    cases = {
        "gzip, deflate, br": ("br", b"pretend brotli"),
        "br;q=0, gzip": ("gzip", (fake_dist / f"{HASHED_BUNDLE}.gz").read_bytes()),
        "gzip;q=0": (None, original),
        "gzip;q=0, br;q=0, *": (None, original),
        "*": ("br", b"pretend brotli"),
        "identity": (None, original),
        "": (None, original),
    }
    for accept, (coding, body) in cases.items():
        status, headers, payload = _raw_get(hub, f"/{HASHED_BUNDLE}", {"Accept-Encoding": accept})
        assert status == 200, accept
        assert headers.get("content-encoding") == coding, accept
        assert headers["content-type"] == "text/javascript; charset=utf-8", accept
        assert headers["vary"] == "Accept-Encoding", accept
        assert payload == body, accept


# -- what must not be reachable ------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/assets/../../secret.txt",
        "/assets/%2e%2e/%2e%2e/secret.txt",
        "/assets/..%2f..%2fsecret.txt",
        "/assets/images/..%5c..%5c..%5csecret.txt",
        "/%2e%2e%2fsecret.txt",
        "/assets/escape.txt",  # a symlink out of the build
        "/assets/",  # no directory listings
        "/assets/images",
        "/assets/images/",
        "/.hidden",
        "/assets/%00logo.svg",
        "/sw.js",  # OHIF's service worker imports Workbox from a CDN
        "/_headers",
        "/index.html",
        "/no-such-file.js",
    ],
)
def test_nothing_outside_the_build_is_served(hub: InProcessHub, fake_dist: Path, path: str) -> None:
    status, _headers, payload = _raw_get(hub, path, {"Cookie": "telerad_session=x"})
    assert status in (400, 404), (path, status)
    assert b"outside the build" not in payload
    assert b"hidden" not in payload


def test_fake_build_files_are_served(hub: InProcessHub, fake_dist: Path) -> None:
    """The control for the test above: the same server does serve the build's files."""
    status, headers, payload = _raw_get(hub, "/assets/images/logo.svg")
    assert (status, headers["content-type"], payload) == (200, "image/svg+xml", b"<svg/>")
    status, headers, _ = _raw_get(hub, "/0123456789abcdef0123.wasm")
    assert (status, headers["content-type"]) == (200, "application/wasm")


def test_not_installed_answers_503_with_the_fix(
    client: httpx.Client, signed_in: httpx.Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(viewer.VIEWER_DIR_ENV, str(empty))
    page = signed_in.get("/viewer", headers={"Accept": "text/html"})
    assert page.status_code == 503
    assert page.headers["content-type"].startswith("text/html")
    assert "scripts/install_viewer.sh" in page.text
    as_json = client.get("/app-config.js")
    assert as_json.status_code == 503
    assert "run scripts/install_viewer.sh" in as_json.json()["detail"]
    assert signed_in.get("/viewer/dicomweb").status_code == 503
    assert client.get("/viewer").status_code == 503  # before any sign-in: nothing to sign in to
    assert client.get(f"/{HASHED_BUNDLE}").status_code == 404
    assert client.get("/healthz").status_code == 200  # the hub itself is fine


def test_the_hubs_own_routes_win(
    client: httpx.Client, signed_in: httpx.Client, fake_dist: Path
) -> None:
    """API, DICOMweb, health and metrics are never answered by the viewer, even where the
    build has a file of the same name (the fake one has ``healthz``)."""
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for path in ("/api/auth/me", "/dicom-web/studies", "/dicom-web/studies/1.2.3/series"):
        answer = signed_in.get(path)
        assert not answer.headers.get("content-type", "").startswith("text/html"), path
        assert "content-security-policy" not in answer.headers, path
        assert answer.status_code != 200 or answer.headers["content-type"].startswith(
            ("application/json", "application/dicom+json")
        ), path
    # a GET to a POST-only API route is the API's 405, not a viewer 404
    assert client.get("/api/auth/token").status_code == 405
    unknown = client.get("/api/no-such-thing")
    assert unknown.status_code == 404 and unknown.json() == {"detail": "Not Found"}
