"""``GET /api/audit``: the audit trail, for admins only (401 without a token, 403 otherwise).

Oldest first, paged by cursor: ``next`` is the ``after_id`` of the following page, null on
the last one. Reading the trail is itself audited ("Audit Log Used").
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from reading_queue.accounts import Principal
from reading_queue.audit import AUDIT_LOG_USED, MAX_LIMIT
from viewer_api.routes.auth import AuditDep, UserDep

router = APIRouter(prefix="/api/audit", tags=["audit"])


def admin(user: UserDep) -> Principal:
    if user.role != "admin":
        raise HTTPException(403, "the audit trail is for admins")
    return user


AdminDep = Annotated[Principal, Depends(admin)]


def _epoch(when: datetime | None) -> float | None:
    """A time without a zone is UTC (as every time the hub shows)."""
    if when is None:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


@router.get("")
def audit_events(
    request: Request,
    user: AdminDep,
    audit: AuditDep,
    username: str | None = None,
    study_uid: str | None = None,
    event_type: str | None = None,
    since: Annotated[datetime | None, Query(description="ISO 8601 or epoch seconds")] = None,
    until: Annotated[datetime | None, Query(description="ISO 8601 or epoch seconds")] = None,
    outcome: Annotated[int | None, Query(ge=0, le=12, description="0, 4, 8 or 12")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    after_id: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
) -> dict[str, Any]:
    rows = audit.query(
        username=username,
        study_uid=study_uid,
        event_type=event_type,
        since=_epoch(since),
        until=_epoch(until),
        outcome=outcome,
        limit=limit,
        after_id=after_id,
    )
    audit.record(
        user, "", "audit.read", AUDIT_LOG_USED,
        study_uid=study_uid, address=request.client.host if request.client else "",
    )  # fmt: skip
    return {
        "events": [r.as_dict() for r in rows],
        "next": rows[-1].id if len(rows) == limit else None,
    }
