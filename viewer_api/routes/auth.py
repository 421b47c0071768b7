"""Sign-in for people: ``POST /api/auth/token`` (OAuth2 password and refresh_token grants),
``GET /api/auth/me``, ``POST /api/auth/logout``; the browser's sign-in page and
``POST /api/auth/login`` (the session cookie) are in ``routes.login``.

Tokens are opaque and short-lived (reading_queue.accounts); every request looks its token
up with the user, so a disabled user is refused at once (401) even with a live token. Every
sign-in, refusal, refresh and sign-out goes to the audit trail (reading_queue.audit).

A caller is either a bearer token (``Authorization: Bearer``: tools, scripts, integrations)
or the browser's ``telerad_session`` cookie; the bearer wins when both are sent, and an
invalid bearer is refused without looking at the cookie. On an unsafe method the cookie
counts only once ``viewer_api.csrf.CsrfProtection`` has checked the request's origin and
CSRF token (docs/security.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Final, TypeVar
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, HTTPException, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.security import APIKeyCookie, OAuth2PasswordBearer

from reading_queue.accounts import (
    AccountError,
    Accounts,
    BrowserSession,
    Principal,
    SignInRefused,
    Tokens,
    TooManyAttempts,
)
from reading_queue.audit import SECURITY_ALERT, USER_AUTHENTICATION, AuditTrail, Outcome
from viewer_api.csrf import (
    CSRF_CHECKED,
    CSRF_COOKIE,
    CSRF_REFUSED,
    SAFE_METHODS,
    SESSION_COOKIE,
    bearer_token,
    csrf_token_for,
)

router = APIRouter(prefix="/api/auth", tags=["auth"])

_bearer = OAuth2PasswordBearer(tokenUrl="/api/auth/token", auto_error=False)
_cookie = APIKeyCookie(name=SESSION_COOKIE, auto_error=False)

_UNAUTHORISED = {"WWW-Authenticate": "Bearer"}
#: Where a signed-in browser goes when ``next`` is missing or not a path on this hub.
DEFAULT_NEXT: Final = "/"
LOGIN_PAGE: Final = "/login"
_MAX_NEXT: Final = 2048

T = TypeVar("T")


def get_accounts(request: Request) -> Accounts:
    accounts: Accounts = request.app.state.accounts
    return accounts


AccountsDep = Annotated[Accounts, Depends(get_accounts)]


def get_audit(request: Request) -> AuditTrail:
    audit: AuditTrail = request.app.state.audit
    return audit


AuditDep = Annotated[AuditTrail, Depends(get_audit)]


def _csrf_cleared(request: Request) -> bool:
    """May the session cookie act on this request: a safe method, or a CSRF check passed."""
    return request.method in SAFE_METHODS or request.scope.get(CSRF_CHECKED) is True


def signed_in(request: Request) -> Principal | None:
    """Who is calling, or None: no credentials, or an unknown, expired or revoked token or
    session, a disabled user, or a session cookie on an unsafe request without a passed CSRF
    check. Never raises; for pages that answer differently to visitors (the viewer sends
    them to ``/login?next=…``). Routes use ``UserDep``, which answers 401/403."""
    accounts = get_accounts(request)
    token = bearer_token(request.headers)
    if token is not None:
        return accounts.principal(token)
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie or not _csrf_cleared(request):
        return None
    return accounts.session_principal(cookie)


def current_user(
    request: Request,
    token: Annotated[str | None, Depends(_bearer)],
    cookie: Annotated[str | None, Depends(_cookie)],
) -> Principal:
    """The signed-in caller; 401 for a missing, expired or revoked token or session, or a
    disabled user; 403 for a session cookie on an unsafe request that skipped the CSRF check.
    (``token`` and ``cookie`` document the two schemes; ``signed_in`` decides.)"""
    if token is None and cookie and not _csrf_cleared(request):
        raise HTTPException(403, CSRF_REFUSED)
    principal = signed_in(request)
    if principal is None:
        raise HTTPException(401, "sign in first (token missing, expired or revoked)", _UNAUTHORISED)
    return principal


UserDep = Annotated[Principal, Depends(current_user)]


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def audited_sign_in(
    audit: AuditTrail, event: str, username: str, address: str, attempt: Callable[[], T]
) -> T:
    """Run a sign-in ``attempt`` and audit its refusal (a rate limit is a Security Alert); the
    exception goes on to the caller, who answers it. Success is audited by the caller, with
    the principal."""
    try:
        return attempt()
    except TooManyAttempts:
        audit.record(
            username, "", event, SECURITY_ALERT,
            address=address, outcome=Outcome.SERIOUS_FAILURE, detail="too many failed sign-ins",
        )  # fmt: skip
        raise
    except SignInRefused:
        audit.record(
            username, "", event, USER_AUTHENTICATION,
            address=address, outcome=Outcome.MINOR_FAILURE, detail="refused",
        )  # fmt: skip
        raise


def safe_next(value: str | None) -> str:
    """``value`` if it is a path on this hub, else ``DEFAULT_NEXT``: never another host.

    Refused: anything not starting with one ``/`` (``//evil``, ``https://…``, ``evil``),
    backslashes (browsers read ``/\\evil`` as ``//evil``), whitespace and control characters
    (browsers drop tabs and newlines: ``/\\t/evil`` is ``//evil``), anything outside printable
    ASCII, and anything over 2,048 characters."""
    if not value or len(value) > _MAX_NEXT:
        return DEFAULT_NEXT
    if any(not "!" <= c <= "~" for c in value) or "\\" in value:
        return DEFAULT_NEXT
    if not value.startswith("/") or value.startswith("//"):
        return DEFAULT_NEXT
    try:
        parts = urlsplit(value)
    except ValueError:
        return DEFAULT_NEXT
    if parts.scheme or parts.netloc:
        return DEFAULT_NEXT
    return value


def _cookie_secure(request: Request) -> bool:
    """``Secure`` when the browser reached us over HTTPS: uvicorn's own TLS (``https_cert``)
    or a TLS proxy on a trusted address that says so (``X-Forwarded-Proto``). A plain-HTTP
    loopback demo keeps working without it."""
    return request.url.scheme == "https"


def set_session_cookies(response: Response, request: Request, session: BrowserSession) -> None:
    """The session cookie (HTTP-only) and its CSRF cookie (readable by the hub's pages), both
    ``SameSite=Lax``, ``Path=/``, no ``Domain``, browser-session lifetime (docs/security.md)."""
    secure = _cookie_secure(request)
    response.set_cookie(
        SESSION_COOKIE, session.token, path="/", secure=secure, httponly=True, samesite="lax"
    )
    response.set_cookie(
        CSRF_COOKIE, csrf_token_for(session.token), path="/", secure=secure, httponly=False,
        samesite="lax",
    )  # fmt: skip


def set_presession_cookie(response: Response, request: Request, token: str) -> None:
    """The login form's CSRF token (double submit with the form's ``csrf_token`` field)."""
    response.set_cookie(
        CSRF_COOKIE, token, path="/", secure=_cookie_secure(request), httponly=False,
        samesite="lax",
    )  # fmt: skip


def clear_session_cookies(response: Response, request: Request) -> None:
    secure = _cookie_secure(request)
    response.delete_cookie(SESSION_COOKIE, path="/", secure=secure, httponly=True, samesite="lax")
    response.delete_cookie(CSRF_COOKIE, path="/", secure=secure, httponly=False, samesite="lax")


def _answer(tokens: Tokens) -> dict[str, Any]:
    return {
        "access_token": tokens.access_token,
        "token_type": "bearer",
        "expires_in": tokens.expires_in,
        "refresh_token": tokens.refresh_token,
    }


@router.post("/token")
def token(
    request: Request,
    accounts: AccountsDep,
    audit: AuditDep,
    grant_type: Annotated[str, Form()] = "password",
    username: Annotated[str, Form(max_length=64)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    refresh_token: Annotated[str, Form(max_length=128)] = "",
) -> dict[str, Any]:
    """OAuth2 token endpoint (RFC 6749 §4.3 password grant, §6 refresh)."""
    address = client_address(request)
    event = "auth.login" if grant_type == "password" else "auth.refresh"
    try:
        if grant_type == "password":
            if not username or not password:
                raise HTTPException(400, "username and password are required")
            tokens = audited_sign_in(
                audit, event, username, address,
                lambda: accounts.sign_in(username, password, address),
            )  # fmt: skip
        elif grant_type == "refresh_token":
            if not refresh_token:
                raise HTTPException(400, "refresh_token is required")
            tokens = audited_sign_in(
                audit, event, username, address, lambda: accounts.refresh(refresh_token, address)
            )
        else:
            raise HTTPException(400, "grant_type must be password or refresh_token")
    except TooManyAttempts as exc:
        raise HTTPException(
            429, str(exc), {"Retry-After": str(int(exc.retry_after_s) + 1)}
        ) from None
    except SignInRefused as exc:
        raise HTTPException(401, str(exc), _UNAUTHORISED) from None
    except AccountError as exc:
        raise HTTPException(400, str(exc)) from None
    # Who signed in (a refresh names no user): one lookup, only on success.
    who = accounts.principal(tokens.access_token)
    audit.record(
        who if who is not None else username, "", event, USER_AUTHENTICATION, address=address
    )
    return _answer(tokens)


@router.get("/me")
def me(user: UserDep) -> dict[str, Any]:
    return {
        "username": user.username,
        "role": user.role,
        "radiologist": user.radiologist,
        "station": user.station,
    }


def _is_form_navigation(request: Request) -> bool:
    """A plain HTML form post (a sign-out button without JS): answered with a redirect."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    return media == "application/x-www-form-urlencoded" and "text/html" in request.headers.get(
        "accept", ""
    )


@router.post("/logout", status_code=204, response_model=None)
def logout(
    request: Request,
    accounts: AccountsDep,
    audit: AuditDep,
    token: Annotated[str | None, Depends(_bearer)],
    cookie: Annotated[str | None, Depends(_cookie)],
) -> Response:
    """Ends the bearer token's session, or the browser's (the cookies are cleared, also when
    the session had already ended). A form post is sent on to the sign-in page."""
    address = client_address(request)
    if token is not None:
        user = accounts.principal(token)
        if user is None:
            raise HTTPException(401, "sign in first (token missing, expired or revoked)",
                                _UNAUTHORISED)  # fmt: skip
        accounts.sign_out(token)
        audit.record(user, "", "auth.logout", USER_AUTHENTICATION, address=address)
        return Response(status_code=204)
    if not cookie:
        raise HTTPException(401, "sign in first (token missing, expired or revoked)", _UNAUTHORISED)
    if not _csrf_cleared(request):
        raise HTTPException(403, CSRF_REFUSED)
    user = accounts.session_principal(cookie, touch=False)
    accounts.end_session(cookie)
    if user is not None:
        audit.record(
            user, "", "auth.logout", USER_AUTHENTICATION, address=address, detail="browser session"
        )
    response: Response = (
        RedirectResponse(LOGIN_PAGE, status_code=303)
        if _is_form_navigation(request)
        else Response(status_code=204)
    )
    response.headers["Cache-Control"] = "no-store"
    clear_session_cookies(response, request)
    return response
