"""Browser sessions over real HTTP (issue 10): the sign-in page, the session cookie and its
attributes, redirects only to this hub, CSRF (token and origin) on every cookie-authenticated
unsafe request but never on bearer requests, sessions ended at once by disabling the user or
signing out, idle and absolute expiry, and sign-in refusals rate-limited and audited as for
the token endpoint.

A probe route (``/api/test/probe``, ``UserDep`` like every route, DICOMweb included) is added
to the app before the hub starts, so the checks do not depend on routes being built elsewhere.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Form

from reading_queue.accounts import SESSION_IDLE_S, SESSION_MAX_S, Accounts
from reading_queue.audit import SECURITY_ALERT, USER_AUTHENTICATION, AuditTrail, Outcome
from tests.support.peers import chromium_binary
from tests.support.telerad_procs import InProcessHub
from viewer_api.routes.auth import UserDep, safe_next

LAN_PW = "lan password 12"
ADMIN_PW = "admin password 1"
PROBE = "/api/test/probe"
REFUSED = "Wrong username or password, or this account is disabled."
#: No DICOM listener: these tests are about the HTTP surface only.
NO_DICOM = -1


def _add_probe(hub: InProcessHub) -> None:
    def probe(user: UserDep, note: Annotated[str, Form()] = "") -> dict[str, Any]:
        return {"username": user.username, "note": note}

    hub.hub.app.add_api_route(
        PROBE, probe, methods=["GET", "POST", "PUT", "PATCH", "DELETE"], response_model=None
    )


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[InProcessHub]:
    hub = InProcessHub(tmp_path / "hub", dicom_port=NO_DICOM)
    _add_probe(hub)
    with hub:
        accounts = _accounts(hub)
        accounts.add_user("lan", "radiologist", LAN_PW, radiologist="dr.lan")
        accounts.add_user("root", "admin", ADMIN_PW)
        yield hub


def _accounts(hub: InProcessHub) -> Accounts:
    accounts: Accounts = hub.hub.app.state.accounts
    return accounts


def _audit(hub: InProcessHub) -> AuditTrail:
    audit: AuditTrail = hub.hub.app.state.audit
    audit.flush()
    return audit


def _browser(hub: InProcessHub) -> httpx.Client:
    return httpx.Client(base_url=hub.url, follow_redirects=False, timeout=30)


def _form_token(page: httpx.Response) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found, page.text
    return found.group(1)


def _sign_in(
    client: httpx.Client,
    hub: InProcessHub,
    username: str = "lan",
    password: str = LAN_PW,
    next_path: str = "/",
    **headers: str,
) -> httpx.Response:
    """What a browser does: open the page, post its form from it."""
    page = client.get("/login", params={"next": next_path})
    assert page.status_code == 200, page.text
    return client.post(
        "/api/auth/login",
        data={
            "username": username,
            "password": password,
            "next": next_path,
            "csrf_token": _form_token(page),
        },
        headers={"Origin": hub.url, "Accept": "text/html,*/*;q=0.8", **headers},
    )


def _set_cookie(response: httpx.Response, name: str) -> str:
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(f"{name}="):
            return header
    raise AssertionError(f"no Set-Cookie {name} in {response.headers.get_list('set-cookie')}")


def _attributes(set_cookie: str) -> set[str]:
    return {part.strip().lower() for part in set_cookie.split(";")[1:]}


def _cookie(session: str) -> dict[str, str]:
    """A replayed (or planted) session cookie, sent by hand."""
    return {"Cookie": f"telerad_session={session}"}


def _csrf(client: httpx.Client) -> dict[str, str]:
    return {"X-CSRF-Token": client.cookies["telerad_csrf"]}


def test_the_sign_in_page_is_plain_accessible_html_with_strict_headers(
    hub: InProcessHub,
) -> None:
    with _browser(hub) as browser:
        page = browser.get("/login", params={"next": "/viewer?StudyInstanceUIDs=1.2.3"})
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["Content-Security-Policy"]
        assert csp.startswith(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
        )
        assert page.headers["X-Frame-Options"] == "DENY"
        assert page.headers["Referrer-Policy"] == "same-origin"
        assert page.headers["Cache-Control"] == "no-store"
        text = page.text
        assert '<html lang="en">' in text and "telerad" in text
        assert '<label for="username">' in text and '<label for="password">' in text
        assert 'autocomplete="username"' in text and 'autocomplete="current-password"' in text
        assert 'name="next" value="/viewer?StudyInstanceUIDs=1.2.3"' in text
        assert 'action="/api/auth/login"' in text and 'method="post"' in text
        # No script, nothing from elsewhere.
        assert "<script" not in text and "src=" not in text and "<link" not in text
        # The pre-session CSRF cookie, echoed in the form.
        presession = _set_cookie(page, "telerad_csrf")
        assert _form_token(page) == browser.cookies["telerad_csrf"]
        assert {"path=/", "samesite=lax"} <= _attributes(presession)

        evil = browser.get("/login", params={"next": "//evil.example/x"})
        assert 'name="next" value="/"' in evil.text


def test_form_sign_in_sets_an_http_only_lax_cookie_and_goes_to_next(hub: InProcessHub) -> None:
    with _browser(hub) as browser:
        target = "/viewer?StudyInstanceUIDs=1.2.840.1&x=%2F%2Fevil"
        signed = _sign_in(browser, hub, next_path=target)
        assert signed.status_code == 303, signed.text
        assert signed.headers["location"] == target
        assert signed.headers["Cache-Control"] == "no-store"
        session = _attributes(_set_cookie(signed, "telerad_session"))
        assert {"httponly", "samesite=lax", "path=/"} <= session
        assert "secure" not in session  # plain-HTTP loopback: the demo still works
        assert not any(a.startswith(("max-age", "expires", "domain")) for a in session)
        csrf = _attributes(_set_cookie(signed, "telerad_csrf"))
        assert "httponly" not in csrf and {"samesite=lax", "path=/"} <= csrf

        me = browser.get("/api/auth/me")
        assert me.status_code == 200 and me.json()["username"] == "lan"
        assert browser.get(PROBE).json()["username"] == "lan"  # safe method: no token needed
        # Signed in: the page sends the visitor straight on.
        again = browser.get("/login", params={"next": "/viewer"})
        assert again.status_code == 303 and again.headers["location"] == "/viewer"

    # Behind a TLS proxy on a trusted address (here: loopback) the cookies are Secure.
    with _browser(hub) as browser:
        secure = _sign_in(browser, hub, **{"X-Forwarded-Proto": "https"})
        assert secure.status_code == 303
        assert "secure" in _attributes(_set_cookie(secure, "telerad_session"))
        assert "secure" in _attributes(_set_cookie(secure, "telerad_csrf"))


@pytest.mark.parametrize(
    "value",
    [
        "//evil.example/",
        "https://evil.example/",
        "http:/evil.example",
        "/\\evil.example",
        "\\\\evil.example",
        "/\t/evil.example",
        "/\n/evil.example",
        " /viewer",
        "javascript:alert(1)",
        "evil.example/viewer",
        "/viewer/é",
        "",
        "/" + "a" * 3000,
    ],
)
def test_next_is_a_path_on_this_hub_or_home(value: str) -> None:
    assert safe_next(value) == "/"


def test_open_redirect_attempts_land_at_home(hub: InProcessHub) -> None:
    for value in ["//evil.example/", "https://evil.example/", "/\\evil.example", "/\t/evil"]:
        with _browser(hub) as browser:
            signed = _sign_in(browser, hub, next_path=value)
            assert signed.status_code == 303 and signed.headers["location"] == "/", value
    assert (
        safe_next("/viewer?StudyInstanceUIDs=1.2.3,1.2.4")
        == "/viewer?StudyInstanceUIDs=1.2.3,1.2.4"
    )


def test_json_clients_get_the_user_and_the_csrf_token(hub: InProcessHub) -> None:
    with _browser(hub) as browser:
        page = browser.get("/login")
        answer = browser.post(
            "/api/auth/login",
            data={"username": "root", "password": ADMIN_PW, "csrf_token": _form_token(page)},
            headers={"Origin": hub.url, "Accept": "application/json"},
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body == {
            "username": "root",
            "role": "admin",
            "csrf_token": browser.cookies["telerad_csrf"],
        }
        ok = browser.post(PROBE, headers={"X-CSRF-Token": body["csrf_token"]})
        assert ok.status_code == 200 and ok.json()["username"] == "root"


def test_unsafe_cookie_requests_need_the_csrf_token_and_this_origin(hub: InProcessHub) -> None:
    with _browser(hub) as browser:
        assert _sign_in(browser, hub).status_code == 303
        token = browser.cookies["telerad_csrf"]
        refused = {"detail": "CSRF token missing or wrong"}
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            missing = browser.request(method, PROBE)
            assert missing.status_code == 403 and missing.json() == refused, method
        wrong = browser.post(PROBE, headers={"X-CSRF-Token": token[:-2] + "xx"})
        assert wrong.status_code == 403 and wrong.json() == refused
        # Another session's token is no good either.
        with _browser(hub) as other:
            assert _sign_in(other, hub, "root", ADMIN_PW).status_code == 303
            foreign = browser.post(PROBE, headers={"X-CSRF-Token": other.cookies["telerad_csrf"]})
            assert foreign.status_code == 403
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            ok = browser.request(method, PROBE, headers={"X-CSRF-Token": token})
            assert ok.status_code == 200 and ok.json()["username"] == "lan", method
        # An HTML form sends it as a field; the route still gets the whole body.
        form = browser.post(PROBE, data={"note": "from a form", "csrf_token": token})
        assert form.status_code == 200 and form.json() == {
            "username": "lan",
            "note": "from a form",
        }
        assert browser.post(PROBE, data={"note": "x", "csrf_token": "nope"}).status_code == 403
        # The right token from the wrong place: refused.
        for headers in (
            {"Origin": "https://evil.example"},
            {"Origin": "null"},
            {"Origin": hub.url.replace("127.0.0.1", "localhost")},
            {"Referer": "https://evil.example/page"},
        ):
            cross = browser.post(PROBE, headers={"X-CSRF-Token": token, **headers})
            assert cross.status_code == 403, headers
            assert "cross-origin" in cross.json()["detail"]
        same = browser.post(PROBE, headers={"X-CSRF-Token": token, "Origin": hub.url})
        assert same.status_code == 200
        referred = browser.post(
            PROBE, headers={"X-CSRF-Token": token, "Referer": f"{hub.url}/viewer?x=1"}
        )
        assert referred.status_code == 200
        # The stations' upload protocol is untouched: its own 401, not a CSRF 403.
        ingest = browser.post("/api/v1/ingest/studies/1.2.3/manifest", json={})
        assert ingest.status_code == 401

    # Refusals are Security Alerts with the session's user.
    alerts = _audit(hub).query(event_type="auth.csrf")
    assert alerts and all(a.action == SECURITY_ALERT for a in alerts)
    assert {a.username for a in alerts} == {"lan"}
    assert any("cross-origin" in a.detail for a in alerts)


def test_bearer_requests_need_no_csrf_and_win_over_the_cookie(hub: InProcessHub) -> None:
    bearer = httpx.post(
        f"{hub.url}/api/auth/token", data={"username": "root", "password": ADMIN_PW}
    ).json()["access_token"]
    auth = {"Authorization": f"Bearer {bearer}"}
    ok = httpx.post(f"{hub.url}{PROBE}", headers=auth)
    assert ok.status_code == 200 and ok.json()["username"] == "root"
    with _browser(hub) as browser:
        assert _sign_in(browser, hub).status_code == 303  # lan's cookie
        assert browser.get("/api/auth/me", headers=auth).json()["username"] == "root"
        both = browser.post(PROBE, headers={**auth, "Origin": "https://evil.example"})
        assert both.status_code == 200 and both.json()["username"] == "root"
        # A bad bearer is refused, never rescued by the cookie.
        bad = browser.get("/api/auth/me", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401
        # The cookie's token is not a bearer token, nor a bearer token a cookie.
        session = browser.cookies["telerad_session"]
        assert (
            httpx.get(
                f"{hub.url}/api/auth/me", headers={"Authorization": f"Bearer {session}"}
            ).status_code
            == 401
        )
        planted = httpx.get(f"{hub.url}/api/auth/me", headers=_cookie(bearer))
        assert planted.status_code == 401


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "telerad.cli", "hub", "user", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_disabling_the_user_or_a_new_password_ends_the_live_session(hub: InProcessHub) -> None:
    with _browser(hub) as browser:
        assert _sign_in(browser, hub).status_code == 303
        assert browser.get("/api/auth/me").status_code == 200
        disabled = _cli(hub.settings.data_dir, "disable", "lan")
        assert disabled.returncode == 0, disabled.stderr
        refused = browser.get("/api/auth/me")
        assert refused.status_code == 401
        assert _sign_in(browser, hub).status_code == 401  # and no new one
        assert _cli(hub.settings.data_dir, "enable", "lan").returncode == 0
        assert browser.get("/api/auth/me").status_code == 401  # the old one stays ended

    with _browser(hub) as browser:
        assert _sign_in(browser, hub, "root", ADMIN_PW).status_code == 303
        assert browser.get("/api/auth/me").status_code == 200
        _accounts(hub).set_password("root", "a new admin password")
        assert browser.get("/api/auth/me").status_code == 401


def test_sign_out_clears_the_cookies_and_ends_the_session(hub: InProcessHub) -> None:
    with _browser(hub) as browser:
        assert _sign_in(browser, hub).status_code == 303
        session = browser.cookies["telerad_session"]
        # Signing out is an unsafe request like any other: a foreign page cannot do it.
        assert browser.post("/api/auth/logout").status_code == 403
        assert browser.get("/api/auth/me").status_code == 200
        out = browser.post("/api/auth/logout", headers=_csrf(browser))
        assert out.status_code == 204
        for name in ("telerad_session", "telerad_csrf"):
            cleared = _attributes(_set_cookie(out, name))
            assert "max-age=0" in cleared or any(a.startswith("expires=") for a in cleared)
        assert "telerad_session" not in browser.cookies
    replayed = httpx.get(f"{hub.url}/api/auth/me", headers=_cookie(session))
    assert replayed.status_code == 401

    # A sign-out button in a page without script: a form post, then the sign-in page.
    with _browser(hub) as browser:
        assert _sign_in(browser, hub).status_code == 303
        session = browser.cookies["telerad_session"]
        out = browser.post(
            "/api/auth/logout",
            data={"csrf_token": browser.cookies["telerad_csrf"]},
            headers={"Accept": "text/html", "Origin": hub.url},
        )
        assert out.status_code == 303 and out.headers["location"] == "/login"
    assert httpx.get(f"{hub.url}/api/auth/me", headers=_cookie(session)).status_code == 401
    logouts = _audit(hub).query(event_type="auth.logout", username="lan")
    assert len(logouts) == 2 and {e.detail for e in logouts} == {"browser session"}


def test_sessions_end_when_idle_and_at_their_absolute_end(hub: InProcessHub) -> None:
    accounts = _accounts(hub)
    now = [time.time()]
    accounts.clock = lambda: now[0]
    start = now[0]
    with _browser(hub) as browser:
        assert _sign_in(browser, hub).status_code == 303
        now[0] = start + SESSION_IDLE_S - 60
        assert browser.get("/api/auth/me").status_code == 200  # used: the idle clock restarts
        now[0] += SESSION_IDLE_S - 60
        assert browser.get("/api/auth/me").status_code == 200
        now[0] += SESSION_IDLE_S + 1
        assert browser.get("/api/auth/me").status_code == 401  # idle too long

    now[0] = start = time.time() + 10 * SESSION_MAX_S
    with _browser(hub) as browser:
        assert _sign_in(browser, hub).status_code == 303
        while now[0] + 3600 < start + SESSION_MAX_S:
            now[0] += 3600
            assert browser.get("/api/auth/me").status_code == 200
        now[0] = start + SESSION_MAX_S + 1
        assert browser.get("/api/auth/me").status_code == 401  # in use, but the shift is over


def test_login_csrf_is_refused(hub: InProcessHub) -> None:
    form = {"username": "lan", "password": LAN_PW, "csrf_token": "x" * 43}
    with _browser(hub) as browser:
        # No pre-session cookie (a foreign page posting the form): the page again, 403.
        bare = browser.post("/api/auth/login", data=form, headers={"Accept": "text/html"})
        assert bare.status_code == 403 and "telerad_session" not in browser.cookies
        assert 'role="alert"' in bare.text and "expired" in bare.text
        assert bare.headers["X-Frame-Options"] == "DENY"
        # With the cookie and its token, but from another site.
        token = _form_token(browser.get("/login"))
        foreign = browser.post(
            "/api/auth/login",
            data={**form, "csrf_token": token},
            headers={"Origin": "https://evil.example"},
        )
        assert foreign.status_code == 403 and "telerad_session" not in browser.cookies
        as_json = browser.post("/api/auth/login", data=form, headers={"Accept": "application/json"})
        assert as_json.status_code == 403
        assert as_json.json() == {"detail": "CSRF token missing or wrong"}
    alerts = _audit(hub).query(event_type="auth.login", username="lan")
    assert len(alerts) == 3
    assert all(a.action == SECURITY_ALERT and a.detail == "login CSRF check failed" for a in alerts)


def test_failed_sign_ins_are_rate_limited_as_for_tokens_and_audited(hub: InProcessHub) -> None:
    with _browser(hub) as browser:
        for _ in range(5):
            wrong = _sign_in(browser, hub, "lan", "not her password")
            assert wrong.status_code == 401
            assert REFUSED in wrong.text and 'role="alert"' in wrong.text
            assert 'value="lan"' in wrong.text  # what was typed stays, the password does not
            assert "not her password" not in wrong.text
            assert "telerad_session" not in browser.cookies
        # Unknown users: the same page, the same words.
        ghost = _sign_in(browser, hub, "ghost", "not her password")
        assert ghost.status_code == 401 and REFUSED in ghost.text
        limited = _sign_in(browser, hub, "lan", LAN_PW)  # even the right password, for a while
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
        assert "Too many failed sign-ins" in limited.text
        # One limit for every way in.
        token = httpx.post(
            f"{hub.url}/api/auth/token", data={"username": "lan", "password": LAN_PW}
        )
        assert token.status_code == 429
        page = browser.get("/login")
        as_json = browser.post(
            "/api/auth/login",
            data={"username": "lan", "password": LAN_PW, "csrf_token": _form_token(page)},
            headers={"Accept": "application/json", "Origin": hub.url},
        )
        assert as_json.status_code == 429 and "too many" in as_json.json()["detail"]
        assert _sign_in(browser, hub, "root", ADMIN_PW).status_code == 303

    audit = _audit(hub)
    lan = audit.query(username="lan", event_type="auth.login")
    assert [e.outcome for e in lan[:5]] == [Outcome.MINOR_FAILURE] * 5
    assert all(e.action == USER_AUTHENTICATION and e.address == "127.0.0.1" for e in lan[:5])
    assert any(e.action == SECURITY_ALERT and e.outcome == Outcome.SERIOUS_FAILURE for e in lan[5:])
    assert len(audit.query(username="ghost", event_type="auth.login")) == 1
    root = audit.query(username="root", event_type="auth.login")
    assert [(e.outcome, e.detail, e.role) for e in root] == [
        (Outcome.SUCCESS, "browser session", "admin")
    ]
    everything = audit.query(limit=1000)
    assert not any(LAN_PW in e.detail or "not her password" in e.detail for e in everything)


# -- in a real browser --------------------------------------------------------------------------


@pytest.fixture
def foreign_site() -> Iterator[str]:
    """Another site (``localhost`` is not ``127.0.0.1``) whose page posts a form to the hub."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            target = self.path.partition("?target=")[2]
            body = (
                "<!doctype html><title>prize</title>"
                f'<form method="post" action="{target}">'
                '<input type="hidden" name="note" value="forged">'
                '<button id="go">claim your prize</button></form>'
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.needs_chromium
def test_a_radiologist_signs_in_without_script_and_a_foreign_page_cannot_act_for_her(
    hub: InProcessHub, foreign_site: str, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_binary())
        try:
            # Scripts off: the sign-in page is a plain form.
            context = browser.new_context(java_script_enabled=False)
            page = context.new_page()
            page.goto(f"{hub.url}/login?next=/api/auth/me")
            page.fill("#username", "lan")
            page.fill("#password", "not her password")
            page.click("button[type=submit]")
            assert REFUSED in page.inner_text("[role=alert]")
            page.screenshot(path=str(tmp_path / "sign-in-refused.png"))
            page.fill("#password", LAN_PW)
            page.click("button[type=submit]")
            assert page.url == f"{hub.url}/api/auth/me"
            assert '"username":"lan"' in page.inner_text("body")
            cookies = {c["name"]: c for c in context.cookies(hub.url)}
            assert cookies["telerad_session"]["httpOnly"] is True
            assert cookies["telerad_session"]["sameSite"] == "Lax"
            assert cookies["telerad_csrf"]["httpOnly"] is False

            # Another site's form posting to the hub: the browser keeps the Lax cookie back.
            page.goto(f"{foreign_site}/prize?target={hub.url}{PROBE}")
            page.click("#go")
            assert page.url == f"{hub.url}{PROBE}"
            assert "sign in first" in page.inner_text("body")
            context.close()

            # The hub's own pages (scripts on) echo the CSRF cookie; without it: 403.
            context = browser.new_context()
            page = context.new_page()
            page.goto(f"{hub.url}/login")
            page.fill("#username", "lan")
            page.fill("#password", LAN_PW)
            page.click("button[type=submit]")
            page.wait_for_url(f"{hub.url}/")
            page.goto(f"{hub.url}/api/auth/me")
            statuses = page.evaluate(
                """async (probe) => {
                    const csrf = document.cookie.match(/telerad_csrf=([^;]+)/)[1];
                    const post = (headers) => fetch(probe, {method: 'POST', headers});
                    return [(await post({})).status, (await post({'X-CSRF-Token': csrf})).status];
                }""",
                PROBE,
            )
            assert statuses == [403, 200]
            context.close()
        finally:
            browser.close()
