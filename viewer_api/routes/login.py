"""The browser's sign-in: ``GET /login`` (the page) and ``POST /api/auth/login`` (the session
cookie). Tools and scripts use ``POST /api/auth/token`` instead (``routes.auth``).

``POST /api/auth/login`` takes the form fields ``username``, ``password``, ``next`` and
``csrf_token``, makes the same checks, rate limits and audit events as the password grant
(``Accounts.start_session``, ``auth.audited_sign_in``), then sets the ``telerad_session``
cookie (HTTP-only) and ``telerad_csrf`` (the session's CSRF token, for the hub's pages to
echo in ``X-CSRF-Token``). A form post is answered ``303`` to ``next`` when it is a path on
this hub (``auth.safe_next``), else to ``/``; a client that asks for JSON (``Accept:
application/json`` without ``text/html``) gets ``200 {"username", "role", "csrf_token"}``.
A refused form sign-in shows the page again with one message for a wrong username, a wrong
password and a disabled user.

Login CSRF (a foreign page signing the browser in as someone else): the page sets a random
pre-session ``telerad_csrf`` cookie and puts the same value in the form; the POST must carry
both, and its ``Origin`` (else ``Referer``), when sent, must be this hub. A script signing in
for a cookie therefore GETs ``/login`` first.

The page is plain HTML: no script, no external file, inline CSS only; its strings are the
``MESSAGES`` catalogue (English only so far).
"""

from __future__ import annotations

import html
import math
import re
import secrets
from string import Template
from typing import Annotated, Final

from fastapi import APIRouter, Form, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from reading_queue.accounts import AccountError, SignInRefused, TooManyAttempts
from reading_queue.audit import SECURITY_ALERT, USER_AUTHENTICATION, Outcome
from viewer_api.csrf import (
    CSRF_COOKIE,
    CSRF_REFUSED,
    SESSION_COOKIE,
    csrf_token_for,
    login_request_ok,
)
from viewer_api.routes.auth import (
    AccountsDep,
    AuditDep,
    audited_sign_in,
    client_address,
    safe_next,
    set_presession_cookie,
    set_session_cookies,
    signed_in,
)

router = APIRouter(tags=["auth"])

LOGIN_PATH: Final = "/login"
LOGIN_POST: Final = "/api/auth/login"

#: The page's headers (and those of every answer to the sign-in POST). ``form-action`` and
#: ``base-uri`` go beyond ``default-src``, which does not cover them.
PAGE_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; "
        "form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}

#: The page's strings, per language.
MESSAGES: Final[dict[str, dict[str, str]]] = {
    "en": {
        "title": "Sign in · telerad",
        "hub": "telerad",
        "tagline": "Teleradiology reading hub",
        "heading": "Sign in",
        "username": "Username",
        "password": "Password",
        "submit": "Sign in",
        "refused": "Wrong username or password, or this account is disabled.",
        "missing": "Enter your username and your password.",
        "limited": "Too many failed sign-ins. Try again in {minutes} min.",
        "form_expired": "This sign-in form has expired or came from elsewhere. "
        "Please sign in again.",
        "invalid": "That username or password cannot be right: please check it.",
    }
}
LANGUAGE: Final = "en"

_PRESESSION = re.compile(r"[A-Za-z0-9_-]{32,128}")

_PAGE: Final = Template("""<!doctype html>
<html lang="$lang">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="same-origin">
<title>$title</title>
<style>
  :root { color-scheme: light dark; --fg: #1b1f24; --bg: #f4f6f8; --card: #fff;
          --muted: #57606a; --line: #8c959f; --accent: #0b5cad; --bad: #a40e26; }
  @media (prefers-color-scheme: dark) {
    :root { --fg: #e6edf3; --bg: #0d1117; --card: #161b22; --muted: #9da7b3;
            --line: #6e7681; --accent: #58a6ff; --bad: #ff7b72; }
  }
  * { box-sizing: border-box; }
  body { margin: 0; min-height: 100vh; display: grid; place-items: center;
         font: 16px/1.5 system-ui, -apple-system, "Segoe UI", "Noto Sans", sans-serif;
         color: var(--fg); background: var(--bg); }
  main { width: min(24rem, calc(100vw - 2rem)); padding: 2rem; background: var(--card);
         border: 1px solid var(--line); border-radius: 0.5rem; }
  .hub { margin: 0; font-size: 1.5rem; font-weight: 700; letter-spacing: 0.02em; }
  .tagline { margin: 0 0 1.5rem; color: var(--muted); }
  h1 { font-size: 1.25rem; margin: 0 0 1rem; }
  label { display: block; font-weight: 600; margin: 1rem 0 0.25rem; }
  input { width: 100%; padding: 0.6rem 0.7rem; font: inherit; color: inherit;
          background: transparent; border: 1px solid var(--line); border-radius: 0.3rem; }
  input:focus-visible, button:focus-visible { outline: 3px solid var(--accent);
          outline-offset: 2px; }
  button { margin-top: 1.5rem; width: 100%; padding: 0.7rem; font: inherit; font-weight: 600;
           color: #fff; background: var(--accent); border: 0; border-radius: 0.3rem;
           cursor: pointer; }
  .problem { margin: 0 0 1rem; padding: 0.6rem 0.8rem; color: var(--bad);
             border: 1px solid currentColor; border-radius: 0.3rem; }
</style>
</head>
<body>
<main aria-labelledby="heading">
  <p class="hub">$hub</p>
  <p class="tagline">$tagline</p>
  <h1 id="heading">$heading</h1>
  $problem
  <form method="post" action="$action">
    <input type="hidden" name="csrf_token" value="$csrf">
    <input type="hidden" name="next" value="$next">
    <label for="username">$username_label</label>
    <input id="username" name="username" type="text" autocomplete="username"
           autocapitalize="none" spellcheck="false" required maxlength="64"
           value="$username"$describe$focus_user>
    <label for="password">$password_label</label>
    <input id="password" name="password" type="password" autocomplete="current-password"
           required maxlength="1024"$describe$focus_password>
    <button type="submit">$submit</button>
  </form>
</main>
</body>
</html>
""")


def _presession_token(request: Request) -> str:
    """The browser's ``telerad_csrf`` value when it has a sound one (a session's, or an
    earlier page's), else a new one."""
    current = request.cookies.get(CSRF_COOKIE, "")
    return current if _PRESESSION.fullmatch(current) else secrets.token_urlsafe(32)


def login_page(
    request: Request,
    *,
    next_path: str = "/",
    problem: str = "",
    username: str = "",
    status_code: int = 200,
    extra_headers: dict[str, str] | None = None,
) -> HTMLResponse:
    """The sign-in page, with its pre-session CSRF cookie set."""
    text = MESSAGES[LANGUAGE]
    csrf = _presession_token(request)
    esc = html.escape
    page = _PAGE.substitute(
        lang=LANGUAGE,
        title=esc(text["title"]),
        hub=esc(text["hub"]),
        tagline=esc(text["tagline"]),
        heading=esc(text["heading"]),
        problem=(
            f'<p id="problem" class="problem" role="alert">{esc(problem)}</p>' if problem else ""
        ),
        action=LOGIN_POST,
        csrf=esc(csrf),
        next=esc(safe_next(next_path)),
        username_label=esc(text["username"]),
        password_label=esc(text["password"]),
        username=esc(username),
        describe=' aria-describedby="problem" aria-invalid="true"' if problem else "",
        focus_user="" if username else " autofocus",
        focus_password=" autofocus" if username else "",
        submit=esc(text["submit"]),
    )
    response = HTMLResponse(
        page, status_code=status_code, headers={**PAGE_HEADERS, **(extra_headers or {})}
    )
    set_presession_cookie(response, request, csrf)
    return response


@router.get(LOGIN_PATH, include_in_schema=False, response_model=None)
def show_login(request: Request, next_path: Annotated[str, Query(alias="next")] = "/") -> Response:
    """The sign-in page; a visitor already signed in goes straight on to ``next``."""
    if signed_in(request) is not None:
        return RedirectResponse(safe_next(next_path), status_code=303, headers=PAGE_HEADERS)
    return login_page(request, next_path=next_path)


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


@router.post(LOGIN_POST, response_model=None)
def login(
    request: Request,
    accounts: AccountsDep,
    audit: AuditDep,
    username: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    next_path: Annotated[str, Form(alias="next")] = "/",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Sign a browser in: the session cookie, then ``next`` (a form) or JSON."""
    text = MESSAGES[LANGUAGE]
    as_json = _wants_json(request)
    address = client_address(request)
    destination = safe_next(next_path)
    username = username.strip()

    def refuse(
        code: int, detail: str, problem: str, headers: dict[str, str] | None = None
    ) -> Response:
        if as_json:
            return JSONResponse(
                {"detail": detail}, status_code=code, headers={**PAGE_HEADERS, **(headers or {})}
            )
        shown = username if len(username) <= 64 else ""
        return login_page(
            request, next_path=destination, problem=problem, username=shown,
            status_code=code, extra_headers=headers,
        )  # fmt: skip

    if not login_request_ok(request.headers, dict(request.cookies), csrf_token):
        audit.record(
            username[:64], "", "auth.login", SECURITY_ALERT,
            address=address, outcome=Outcome.MINOR_FAILURE, detail="login CSRF check failed",
        )  # fmt: skip
        return refuse(403, CSRF_REFUSED, text["form_expired"])
    if not username or not password:
        return refuse(400, "username and password are required", text["missing"])
    if len(username) > 64 or len(password) > 1024:
        return refuse(400, "username or password too long", text["invalid"])
    try:
        session = audited_sign_in(
            audit, "auth.login", username, address,
            lambda: accounts.start_session(username, password, address),
        )  # fmt: skip
    except TooManyAttempts as exc:
        minutes = max(1, math.ceil(exc.retry_after_s / 60))
        return refuse(
            429, str(exc), text["limited"].format(minutes=minutes),
            {"Retry-After": str(int(exc.retry_after_s) + 1)},
        )  # fmt: skip
    except SignInRefused as exc:
        return refuse(401, str(exc), text["refused"], {"WWW-Authenticate": "Bearer"})
    except AccountError as exc:
        return refuse(400, str(exc), text["invalid"])
    previous = request.cookies.get(SESSION_COOKIE)
    if previous:
        accounts.end_session(previous)  # one browser, one session
    user = session.principal
    audit.record(
        user, "", "auth.login", USER_AUTHENTICATION, address=address, detail="browser session"
    )
    response: Response
    if as_json:
        answer = {
            "username": user.username,
            "role": user.role,
            "csrf_token": csrf_token_for(session.token),
        }
        response = JSONResponse(answer, headers=PAGE_HEADERS)
    else:
        response = RedirectResponse(destination, status_code=303, headers=PAGE_HEADERS)
    set_session_cookies(response, request, session)
    return response
