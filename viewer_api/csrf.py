"""CSRF protection for browser sessions: ``CsrfProtection``, an ASGI middleware.

A browser sends the session cookie with every request to the hub, also with those another
site makes it send (a form that posts to ``/api/studies/…/cancel``); those must not act for
the signed-in user. So a request that **carries the session cookie, no bearer token, and an
unsafe method** (anything but GET, HEAD, OPTIONS, TRACE) needs both:

* **the same origin**: its ``Origin`` header, or without one its ``Referer``, names this
  hub's ``Host`` (scheme left out: a TLS proxy in front may hand us plain HTTP). Browsers send
  ``Origin`` with every cross-site POST, ``null`` from sandboxes: refused. With neither header
  the token alone decides.
* **the CSRF token** (double submit): ``X-CSRF-Token: <value of the telerad_csrf cookie>``, or
  for an HTML form (``application/x-www-form-urlencoded`` only) a ``csrf_token`` field. The
  value is ``csrf_token_for(session token)``, an HMAC keyed with the HTTP-only session token:
  bound to the session, checkable without a database or a server secret, valid across hub
  restarts, and telling nothing about the session token. A site that cannot read our cookies
  cannot compute it, and it cannot read the ``telerad_csrf`` cookie either.

Otherwise the answer is 403 ``{"detail": "CSRF token missing or wrong"}`` (or the
cross-origin message), logged and audited as a Security Alert, before the app sees the
request. Bodies are read here only for form posts without the header (at most
``FORM_MAX_BYTES``), and handed on unchanged. A passed check is marked in the ASGI scope
(``CSRF_CHECKED``): ``routes.auth.current_user`` accepts the cookie on an unsafe request only
with that mark, so a route outside this middleware could never act on the cookie alone.

Not checked here: bearer requests (the token is not an ambient credential: a foreign page
cannot attach it), requests without the session cookie (nothing to abuse), the stations'
upload protocol, ``/api/auth/token`` (it reads no cookie), and ``/api/auth/login``, which
checks itself (``login_request_ok``: same origin and the pre-session token of ``GET /login``)
so that a refused sign-in form can be shown again as a page.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
from typing import Final
from urllib.parse import parse_qs, urlsplit

from fastapi.security.utils import get_authorization_scheme_param
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reading_queue.accounts import Accounts
from reading_queue.audit import SECURITY_ALERT, AuditTrail, Outcome

logger = logging.getLogger(__name__)

SESSION_COOKIE: Final = "telerad_session"
CSRF_COOKIE: Final = "telerad_csrf"
CSRF_HEADER: Final = "x-csrf-token"
CSRF_FIELD: Final = "csrf_token"
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
#: Where the middleware leaves its verdict in the ASGI scope.
CSRF_CHECKED: Final = "telerad.csrf_checked"
CSRF_REFUSED: Final = "CSRF token missing or wrong"
CROSS_ORIGIN_REFUSED: Final = "cross-origin request refused (Origin does not match Host)"
#: Paths this middleware leaves alone (see the module docstring).
EXEMPT_PREFIXES: Final = ("/api/v1/ingest/",)
EXEMPT_PATHS: Final = frozenset({"/api/auth/token", "/api/auth/login"})
#: Largest form body read to find a ``csrf_token`` field; bigger forms send the header.
FORM_MAX_BYTES: Final = 64 * 1024

_FORM: Final = "application/x-www-form-urlencoded"
_CSRF_CONTEXT: Final = b"telerad csrf v1"


def csrf_token_for(session_token: str) -> str:
    """The CSRF token of a session: what ``telerad_csrf`` holds and requests echo."""
    mac = hmac.new(session_token.encode(), _CSRF_CONTEXT, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def tokens_match(given: str | None, expected: str | None) -> bool:
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def bearer_token(headers: Headers) -> str | None:
    """The bearer token, exactly as ``OAuth2PasswordBearer`` finds it (so this middleware and
    ``current_user`` always agree on whether a request is bearer-authenticated)."""
    scheme, param = get_authorization_scheme_param(headers.get("authorization"))
    return param if scheme.lower() == "bearer" and param else None


def _host_port(netloc_url: str, scheme: str) -> str | None:
    try:
        parts = urlsplit(netloc_url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    default = 443 if scheme == "https" else 80
    return host if port in (None, default) else f"{host}:{port}"


def _same_origin(url: str, host_header: str) -> bool:
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        return False
    if scheme not in ("http", "https") or not host_header:
        return False
    mine = _host_port("//" + host_header.strip().lower(), scheme)
    theirs = _host_port(url.strip().lower(), scheme)
    return mine is not None and mine == theirs


def origin_ok(headers: Headers) -> bool:
    """Whether ``Origin`` (else ``Referer``) names this hub; True when neither is sent."""
    host = headers.get("host", "")
    origin = headers.get("origin")
    if origin is not None:
        return _same_origin(origin, host)
    referer = headers.get("referer")
    if referer is not None:
        return _same_origin(referer, host)
    return True


def login_request_ok(headers: Headers, cookies: dict[str, str], field: str | None) -> bool:
    """Login CSRF: the sign-in form posts from this hub's own page with the pre-session token
    ``GET /login`` set in ``telerad_csrf`` (field ``csrf_token`` or ``X-CSRF-Token``)."""
    given = headers.get(CSRF_HEADER) or field
    return origin_ok(headers) and tokens_match(given, cookies.get(CSRF_COOKIE))


class CsrfProtection:
    """Refuses cookie-authenticated unsafe requests without the same origin and the session's
    CSRF token (the module docstring says which and why)."""

    def __init__(
        self, app: ASGIApp, *, accounts: Accounts | None = None, audit: AuditTrail | None = None
    ) -> None:
        self.app = app
        self.accounts = accounts
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (
            scope["type"] != "http"
            or scope["method"] in SAFE_METHODS
            or path in EXEMPT_PATHS
            or path.startswith(EXEMPT_PREFIXES)
        ):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        session = cookie_parser(headers.get("cookie", "")).get(SESSION_COOKIE)
        if bearer_token(headers) is not None or not session:
            await self.app(scope, receive, send)
            return
        if not origin_ok(headers):
            await self._refuse(scope, headers, session, send, CROSS_ORIGIN_REFUSED, "cross-origin")
            return
        given = headers.get(CSRF_HEADER)
        if given is None and _media_type(headers) == _FORM:
            try:
                body = await _read_body(receive, FORM_MAX_BYTES)
            except _ClientGone:
                return  # nobody to answer
            if body is None:
                await _answer(send, 413, "form body too large to check its csrf_token", True)
                return
            fields = parse_qs(body.decode("latin-1"), max_num_fields=1000)
            given = next(iter(fields.get(CSRF_FIELD, [])), None)
            receive = _replay(body, receive)
        if not tokens_match(given, csrf_token_for(session)):
            why = "wrong token" if given else "no token"
            await self._refuse(scope, headers, session, send, CSRF_REFUSED, why)
            return
        scope[CSRF_CHECKED] = True
        await self.app(scope, receive, send)

    async def _refuse(
        self, scope: Scope, headers: Headers, session: str, send: Send, detail: str, why: str
    ) -> None:
        client = scope.get("client")
        address = str(client[0]) if client else ""
        method, path = scope["method"], scope.get("path", "")
        logger.warning("CSRF check refused %s %s from %s: %s", method, path, address, why)
        if self.audit is not None:
            who = None
            if self.accounts is not None:
                who = await run_in_threadpool(self.accounts.session_principal, session, touch=False)
            self.audit.record(
                who if who is not None else "", "", "auth.csrf", SECURITY_ALERT,
                address=address, outcome=Outcome.MINOR_FAILURE,
                detail=f"{why}: {method} {path}",
            )  # fmt: skip
        announced = headers.get("content-length", "0") not in ("", "0") or (
            "transfer-encoding" in headers
        )
        await _answer(send, 403, detail, announced)


def _media_type(headers: Headers) -> str:
    return headers.get("content-type", "").partition(";")[0].strip().lower()


class _ClientGone(Exception):
    pass


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None once it passes ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send: Send, code: int, detail: str, close: bool) -> None:
    body = json.dumps({"detail": detail}).encode()
    extra = [(b"connection", b"close")] if close else []  # the body is never read
    await send(
        {
            "type": "http.response.start",
            "status": code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
