"""People who sign in to the hub: users, argon2id password hashes, sign-in sessions.

Access tokens are opaque random strings, short-lived (15 minutes), kept as sha256 only, and
looked up on every request together with their user: a disabled user is refused at once,
live token or not. Refresh tokens (12 hours) rotate on use. Failed sign-ins are limited per
username and per address (in this process: one hub process serves the HTTP API).

Browser sessions (the ``telerad_session`` cookie, ``start_session``) are rows of the same
table, so disabling a user or a new password ends them with the bearer tokens: the cookie's
token is kept as the sha256 of a domain-separated string, so it is never accepted as a bearer
token nor a bearer token as a cookie. ``access_expires_at`` is the idle deadline (it slides
on use, ``SESSION_IDLE_S``), ``refresh_expires_at`` the absolute one (``SESSION_MAX_S``).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from reading_queue import QueueError
from reading_queue.models import AuthSession, User

ROLES: Final = ("radiologist", "clinic", "admin")
ACCESS_TTL_S: Final = 15 * 60
REFRESH_TTL_S: Final = 12 * 3600
#: Failed sign-ins allowed per window, per username and per address.
MAX_FAILURES_PER_USER: Final = 5
MAX_FAILURES_PER_ADDRESS: Final = 20
FAILURE_WINDOW_S: Final = 300.0
#: A browser session ends after this long without a request: longer than one hard read plus
#: its report in a viewer that fetched every frame up front and asks the hub nothing while
#: the radiologist scrolls and dictates, short enough that a workstation left unlocked over
#: a break or overnight is signed out.
SESSION_IDLE_S: Final = 2 * 3600
#: ... and at the latest this long after signing in, however active: one long reading shift.
SESSION_MAX_S: Final = 12 * 3600
#: The idle deadline is moved on only when that gains this much: with the viewer fetching
#: hundreds of frames a second, one write a minute per session at most.
SESSION_TOUCH_S: Final = 60.0

#: argon2id (the library's default type) with its RFC 9106 "low memory" parameters.
_HASHER = PasswordHasher()
#: Verified against when the username is unknown, so timing does not tell who exists.
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


class AccountError(QueueError):
    pass


class SignInRefused(AccountError):
    """Wrong username or password, or a disabled user: one message for all three."""


class TooManyAttempts(AccountError):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"too many failed sign-ins; try again in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Principal:
    """Who is calling: what every access rule is decided on."""

    user_id: int
    username: str
    role: str
    radiologist: str | None
    station: str | None


@dataclass(frozen=True)
class Tokens:
    access_token: str
    refresh_token: str
    expires_in: int


@dataclass(frozen=True)
class BrowserSession:
    """A browser sign-in: ``token`` goes into the session cookie and nowhere else."""

    token: str
    principal: Principal
    expires_at: float  # the absolute end; the idle deadline slides


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


#: Cookie tokens are stored under a prefix: a bearer lookup (``_sha(token)``) never finds one.
_SESSION_DOMAIN: Final = "telerad browser session\x00"


def _session_sha(token: str) -> str:
    return _sha(_SESSION_DOMAIN + token)


def new_password() -> str:
    return secrets.token_urlsafe(15)


class _Limiter:
    """Failures per key within a sliding window."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit, self.window_s = limit, window_s
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, key: str, now: float) -> float:
        with self._lock:
            q = self._events.get(key)
            while q and q[0] <= now - self.window_s:
                q.popleft()
            if q is None or len(q) < self.limit:
                return 0.0
            return q[0] + self.window_s - now

    def failed(self, key: str, now: float) -> None:
        with self._lock:
            self._events.setdefault(key, deque()).append(now)

    def clear(self, key: str) -> None:
        with self._lock:
            self._events.pop(key, None)


class Accounts:
    def __init__(
        self,
        engine: Engine,
        clock: Callable[[], float] = time.time,
        *,
        session_idle_s: float = SESSION_IDLE_S,
        session_max_s: float = SESSION_MAX_S,
    ) -> None:
        self.session: sessionmaker[Session] = sessionmaker(engine, expire_on_commit=False)
        #: for lookups: on SQLite a plain BEGIN beside the writer, not BEGIN IMMEDIATE (the
        #: write lock, see models.make_engine), so a push round or an audit write never
        #: holds up the authentication of every request
        self.read: sessionmaker[Session] = sessionmaker(
            engine.execution_options(read_only=True), expire_on_commit=False
        )
        self.clock = clock
        self.session_idle_s, self.session_max_s = session_idle_s, session_max_s
        self._by_user = _Limiter(MAX_FAILURES_PER_USER, FAILURE_WINDOW_S)
        self._by_address = _Limiter(MAX_FAILURES_PER_ADDRESS, FAILURE_WINDOW_S)

    # -- users -----------------------------------------------------------------------------

    def add_user(
        self,
        username: str,
        role: str,
        password: str,
        *,
        radiologist: str | None = None,
        station: str | None = None,
    ) -> User:
        username = username.strip()
        if not 0 < len(username) <= 64 or not username.isprintable() or " " in username:
            raise AccountError("a username is 1 to 64 printable characters without spaces")
        if role not in ROLES:
            raise AccountError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if role == "radiologist" and not radiologist:
            raise AccountError("a radiologist user needs --radiologist KEY (their roster key)")
        if role == "clinic" and not station:
            raise AccountError("a clinic user needs --station NAME (the one station they see)")
        if role != "radiologist" and radiologist:
            raise AccountError("--radiologist is only for radiologist users")
        if role != "clinic" and station:
            raise AccountError("--station is only for clinic users")
        _check_password(password)
        now = self.clock()
        with self.session.begin() as s:
            if s.scalar(select(User).where(User.username == username)) is not None:
                raise AccountError(f"user {username!r} already exists")
            user = User(
                username=username,
                role=role,
                radiologist=radiologist,
                station=station,
                password_hash=_HASHER.hash(password),
                active=True,
                created_at=now,
                updated_at=now,
            )
            s.add(user)
        return user

    def users(self) -> list[User]:
        with self.read() as s:
            return list(s.scalars(select(User).order_by(User.username)))

    def _user(self, s: Session, username: str) -> User:
        user = s.scalar(select(User).where(User.username == username))
        if user is None:
            raise AccountError(f"no user {username!r}")
        return user

    def set_active(self, username: str, active: bool) -> None:
        """Disabling revokes every session of the user at once."""
        now = self.clock()
        with self.session.begin() as s:
            user = self._user(s, username)
            user.active, user.updated_at = active, now
            if not active:
                self._revoke_all(s, user.id, now)

    def set_password(self, username: str, password: str) -> None:
        """A new password ends every session of the user."""
        _check_password(password)
        now = self.clock()
        with self.session.begin() as s:
            user = self._user(s, username)
            user.password_hash, user.updated_at = _HASHER.hash(password), now
            self._revoke_all(s, user.id, now)

    @staticmethod
    def _revoke_all(s: Session, user_id: int, now: float) -> None:
        s.execute(
            update(AuthSession)
            .where(AuthSession.user_id == user_id, AuthSession.revoked_at.is_(None))
            .values(revoked_at=now)
        )

    # -- signing in ------------------------------------------------------------------------

    def sign_in(self, username: str, password: str, address: str) -> Tokens:
        now = self.clock()
        user = self._check_sign_in(username, password, address, now)
        return self._issue(user.id, address, now)

    def _check_sign_in(self, username: str, password: str, address: str, now: float) -> User:
        """The user these credentials name; the same checks and limits for every kind of
        sign-in (``TooManyAttempts``, ``SignInRefused``)."""
        wait = max(
            self._by_user.retry_after(username, now), self._by_address.retry_after(address, now)
        )
        if wait > 0:
            raise TooManyAttempts(wait)
        with self.read() as s:
            user = s.scalar(select(User).where(User.username == username))
        ok = False
        try:
            ok = _HASHER.verify(user.password_hash if user else _DUMMY_HASH, password)
        except (VerificationError, InvalidHashError):
            ok = False
        if not ok or user is None or not user.active:
            self._by_user.failed(username, now)
            self._by_address.failed(address, now)
            raise SignInRefused("wrong username or password, or the user is disabled")
        self._by_user.clear(username)
        return user

    def refresh(self, refresh_token: str, address: str) -> Tokens:
        now = self.clock()
        with self.session.begin() as s:
            row = s.scalar(
                select(AuthSession).where(AuthSession.refresh_sha256 == _sha(refresh_token))
            )
            user = s.get(User, row.user_id) if row is not None else None
            if (
                row is None
                or row.revoked_at is not None
                or row.refresh_expires_at <= now
                or user is None
                or not user.active
            ):
                raise SignInRefused("refresh token unknown, expired or revoked")
            row.revoked_at = now  # rotation: each refresh token works once
        return self._issue(row.user_id, address, now)

    def _issue(self, user_id: int, address: str, now: float) -> Tokens:
        access, refresh = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self.session.begin() as s:
            s.add(
                AuthSession(
                    user_id=user_id,
                    access_sha256=_sha(access),
                    refresh_sha256=_sha(refresh),
                    access_expires_at=now + ACCESS_TTL_S,
                    refresh_expires_at=now + REFRESH_TTL_S,
                    address=address[:64],
                    created_at=now,
                )
            )
        return Tokens(access, refresh, ACCESS_TTL_S)

    def sign_out(self, access_token: str) -> None:
        with self.session.begin() as s:
            s.execute(
                update(AuthSession)
                .where(
                    AuthSession.access_sha256 == _sha(access_token),
                    AuthSession.revoked_at.is_(None),
                )
                .values(revoked_at=self.clock())
            )

    # -- browser sessions ------------------------------------------------------------------

    def start_session(self, username: str, password: str, address: str) -> BrowserSession:
        """Sign in for a browser (the session cookie): the checks and limits of ``sign_in``."""
        now = self.clock()
        user = self._check_sign_in(username, password, address, now)
        token = secrets.token_urlsafe(32)
        expires_at = now + self.session_max_s
        with self.session.begin() as s:
            s.add(
                AuthSession(
                    user_id=user.id,
                    access_sha256=_session_sha(token),
                    # Never handed out: a session cannot be "refreshed" into bearer tokens.
                    refresh_sha256=_sha(secrets.token_urlsafe(32)),
                    access_expires_at=min(now + self.session_idle_s, expires_at),
                    refresh_expires_at=expires_at,
                    address=address[:64],
                    created_at=now,
                )
            )
        return BrowserSession(token, _principal(user), expires_at)

    def session_principal(self, token: str, *, touch: bool = True) -> Principal | None:
        """The user of a session cookie, or None: unknown, idle too long, past its absolute
        end, revoked, or a disabled user. ``touch`` moves the idle deadline on (a request)."""
        now = self.clock()
        with self.read() as s:
            row = s.execute(
                select(AuthSession, User)
                .join(User, User.id == AuthSession.user_id)
                .where(AuthSession.access_sha256 == _session_sha(token))
            ).first()
        if row is None:
            return None
        session, user = row
        if (
            session.revoked_at is not None
            or session.access_expires_at <= now
            or session.refresh_expires_at <= now
            or not user.active
        ):
            return None
        idle_until = min(now + self.session_idle_s, session.refresh_expires_at)
        if touch and idle_until - session.access_expires_at >= SESSION_TOUCH_S:
            with self.session.begin() as s:
                s.execute(
                    update(AuthSession)
                    .where(AuthSession.id == session.id, AuthSession.revoked_at.is_(None))
                    .values(access_expires_at=idle_until)
                )
        return _principal(user)

    def end_session(self, token: str) -> None:
        with self.session.begin() as s:
            s.execute(
                update(AuthSession)
                .where(
                    AuthSession.access_sha256 == _session_sha(token),
                    AuthSession.revoked_at.is_(None),
                )
                .values(revoked_at=self.clock())
            )

    # -- who is calling --------------------------------------------------------------------

    def principal(self, access_token: str) -> Principal | None:
        """The caller of a request, or None: unknown, expired, revoked, or a disabled user."""
        now = self.clock()
        with self.read() as s:
            row = s.execute(
                select(AuthSession, User)
                .join(User, User.id == AuthSession.user_id)
                .where(AuthSession.access_sha256 == _sha(access_token))
            ).first()
        if row is None:
            return None
        session, user = row
        if session.revoked_at is not None or session.access_expires_at <= now or not user.active:
            return None
        return _principal(user)


def _principal(user: User) -> Principal:
    return Principal(user.id, user.username, user.role, user.radiologist, user.station)


def _check_password(password: str) -> None:
    if len(password) < 10:
        raise AccountError("a password needs at least 10 characters")
    if len(password) > 1024:
        raise AccountError("a password has at most 1,024 characters")
