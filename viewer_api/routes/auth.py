"""Sign-in for people: ``POST /api/auth/token`` (OAuth2 password and refresh_token grants),
``GET /api/auth/me``, ``POST /api/auth/logout``.

Tokens are opaque and short-lived (reading_queue.accounts); every request looks its token
up with the user, so a disabled user is refused at once (401) even with a live token. Every
sign-in, refusal, refresh and sign-out goes to the audit trail (reading_queue.audit).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.security import OAuth2PasswordBearer

from reading_queue.accounts import (
    AccountError,
    Accounts,
    Principal,
    SignInRefused,
    Tokens,
    TooManyAttempts,
)
from reading_queue.audit import SECURITY_ALERT, USER_AUTHENTICATION, AuditTrail, Outcome

router = APIRouter(prefix="/api/auth", tags=["auth"])

_bearer = OAuth2PasswordBearer(tokenUrl="/api/auth/token", auto_error=False)

_UNAUTHORISED = {"WWW-Authenticate": "Bearer"}


def get_accounts(request: Request) -> Accounts:
    accounts: Accounts = request.app.state.accounts
    return accounts


AccountsDep = Annotated[Accounts, Depends(get_accounts)]


def get_audit(request: Request) -> AuditTrail:
    audit: AuditTrail = request.app.state.audit
    return audit


AuditDep = Annotated[AuditTrail, Depends(get_audit)]


def current_user(
    accounts: AccountsDep, token: Annotated[str | None, Depends(_bearer)]
) -> Principal:
    """The signed-in caller; 401 for a missing, expired or revoked token, or a disabled user."""
    principal = accounts.principal(token) if token else None
    if principal is None:
        raise HTTPException(401, "sign in first (token missing, expired or revoked)", _UNAUTHORISED)
    return principal


UserDep = Annotated[Principal, Depends(current_user)]


def _address(request: Request) -> str:
    return request.client.host if request.client else ""


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
    address = _address(request)
    event = "auth.login" if grant_type == "password" else "auth.refresh"
    try:
        if grant_type == "password":
            if not username or not password:
                raise HTTPException(400, "username and password are required")
            tokens = accounts.sign_in(username, password, address)
        elif grant_type == "refresh_token":
            if not refresh_token:
                raise HTTPException(400, "refresh_token is required")
            tokens = accounts.refresh(refresh_token, address)
        else:
            raise HTTPException(400, "grant_type must be password or refresh_token")
    except TooManyAttempts as exc:
        audit.record(
            username, "", event, SECURITY_ALERT,
            address=address, outcome=Outcome.SERIOUS_FAILURE, detail="too many failed sign-ins",
        )  # fmt: skip
        raise HTTPException(
            429, str(exc), {"Retry-After": str(int(exc.retry_after_s) + 1)}
        ) from None
    except SignInRefused as exc:
        audit.record(
            username, "", event, USER_AUTHENTICATION,
            address=address, outcome=Outcome.MINOR_FAILURE, detail="refused",
        )  # fmt: skip
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


@router.post("/logout", status_code=204)
def logout(
    request: Request,
    accounts: AccountsDep,
    audit: AuditDep,
    user: UserDep,
    token: Annotated[str | None, Depends(_bearer)],
) -> None:
    if token:
        accounts.sign_out(token)
    audit.record(user, "", "auth.logout", USER_AUTHENTICATION, address=_address(request))
