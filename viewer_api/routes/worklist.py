"""The radiologist's worklist: ``GET /api/worklist`` (the caller's view), ``POST
/api/worklist/next`` (pull: the engine's next study for me), ``GET /api/worklist/events``
(server-sent events: a STAT handed to me, now).

The view is ``reading_queue.access``'s worklist rule: a radiologist sees their own studies
and the ready pool they are eligible for, a clinic its station's, an admin everything. A
listing shows patient names, so each study it returns is audited as read (a Query).
Pages follow a cursor (keyset on the sort key and the UID): stable while studies arrive.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, Final

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import ColumnElement, and_, func, or_, select, union
from sqlalchemy.orm import InstrumentedAttribute
from starlette.concurrency import run_in_threadpool

from reading_queue.audit import QUERY
from reading_queue.models import Study, WorklistEvent
from reading_queue.worklist.engine import OPEN, StudyState
from reading_queue.worklist.service import Worklist
from telerad.core.priority import Priority
from viewer_api.routes.auth import AuditDep, UserDep
from viewer_api.routes.common import AccessDep, WorklistDep, address

router = APIRouter(prefix="/api/worklist", tags=["worklist"])

MAX_PAGE: Final = 200
#: what the worklist shows unless asked for other states
DEFAULT_STATES: Final = (*[s.value for s in OPEN], StudyState.PRELIMINARY.value)
#: sort name -> key columns (the UID always last: a total order for the cursor)
SORTS: Final[dict[str, tuple[InstrumentedAttribute[Any], ...]]] = {
    "deadline": (Study.deadline, Study.study_uid),
    "received": (Study.received_at, Study.study_uid),
    "priority": (Study.priority, Study.deadline, Study.study_uid),
}


def study_item(st: Study, now: float) -> dict[str, Any]:
    """One worklist entry as the API shows it."""
    return {
        "study_uid": st.study_uid,
        "accession": st.accession,
        "patient_name": st.patient_name,
        "patient_birth_date": st.patient_birth_date,
        "modality": st.modality,
        "body_part": st.body_part,
        "description": st.description,
        "subspecialty": st.subspecialty,
        "station": st.station,
        "institution": st.institution,
        "language": st.language,
        "priority": Priority(st.priority).label,
        "state": st.state,
        "assignee": st.assignee,
        "received_at": st.received_at,
        "deadline": st.deadline,
        "sla_minutes_left": round((st.deadline - now) / 60.0, 1),
        "overdue": st.deadline < now and st.state in DEFAULT_STATES,
        "lease_expires_at": st.lease_expires_at,
        "instance_count": st.instance_count,
        "missing_instances": st.missing_instances,
        "late_instances": st.late_instances,
    }


def _values(raw: Sequence[str], name: str) -> list[str]:
    """Repeated parameters and comma lists alike: ``?state=ready&state=assigned`` or
    ``?state=ready,assigned``."""
    out = [v.strip() for item in raw for v in item.split(",") if v.strip()]
    if any(len(v) > 64 for v in out):
        raise HTTPException(400, f"{name}: values are at most 64 characters")
    return out


def _priorities(raw: Sequence[str]) -> list[int]:
    try:
        return [int(Priority.parse(int(v) if v.isdigit() else v)) for v in _values(raw, "priority")]
    except ValueError as exc:
        raise HTTPException(400, f"priority: {exc}") from None


def _states(raw: Sequence[str]) -> list[str]:
    states = _values(raw, "state")
    known = {s.value for s in StudyState}
    bad = [s for s in states if s not in known]
    if bad:
        raise HTTPException(400, f"state: unknown {bad}; use one of {sorted(known)}")
    return states


def _encode_cursor(values: Sequence[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(values)).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, n: int) -> list[Any]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, binascii.Error):
        raise HTTPException(400, "cursor: not one this API gave out") from None
    if (
        not isinstance(values, list)
        or len(values) != n
        or not all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in values)
        or not isinstance(values[-1], str)
    ):
        raise HTTPException(400, "cursor: not one this API gave out (or another sort's)")
    return values


def _after(
    columns: Sequence[InstrumentedAttribute[Any]], values: Sequence[Any], desc: bool
) -> ColumnElement[bool]:
    """Rows strictly after ``values`` in (columns) order, as nested ORs (portable, and
    each branch can use the index)."""
    clauses: list[ColumnElement[bool]] = []
    for i, col in enumerate(columns):
        eq = [c == v for c, v in zip(columns[:i], values[:i], strict=True)]
        clauses.append(and_(*eq, col < values[i] if desc else col > values[i]))
    return or_(*clauses)


@router.get("")
def worklist(
    request: Request,
    user: UserDep,
    access: AccessDep,
    audit: AuditDep,
    wl: WorklistDep,
    priority: Annotated[list[str], Query()] = [],  # noqa: B006 (FastAPI's list default)
    modality: Annotated[list[str], Query()] = [],  # noqa: B006
    station: Annotated[list[str], Query()] = [],  # noqa: B006
    state: Annotated[list[str], Query()] = [],  # noqa: B006
    mine: bool = False,
    sort: Annotated[str, Query(pattern=r"^-?(deadline|received|priority)$")] = "deadline",
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> dict[str, Any]:
    """The caller's worklist, most urgent first by default (``sort=-received``: newest
    first). ``next`` is the cursor of the following page, null on the last one."""
    desc = sort.startswith("-")
    columns = SORTS[sort.lstrip("-")]
    branches = access.worklist_branches(user)
    conds: list[ColumnElement[bool]] = [Study.state.in_(_states(state) or list(DEFAULT_STATES))]
    if priority:
        conds.append(Study.priority.in_(_priorities(priority)))
    if modality:
        conds.append(Study.modality.in_([m.upper() for m in _values(modality, "modality")]))
    if station:
        conds.append(Study.station.in_(_values(station, "station")))
    if mine:
        conds.append(Study.assignee == (user.radiologist or ""))
    if cursor:
        conds.append(_after(columns, _decode_cursor(cursor, len(columns)), desc))
    order = [c.desc() if desc else c.asc() for c in columns]
    if len(branches) == 1:
        stmt = select(Study).where(branches[0], *conds)
    else:
        # A page of each branch (own studies, the pool), each read in index order, then
        # the page of their union: the database never sorts the whole pool.
        pages = [
            select(Study.study_uid).where(b, *conds).order_by(*order).limit(limit + 1).subquery()
            for b in branches
        ]
        stmt = select(Study).where(Study.study_uid.in_(union(*(select(p.c[0]) for p in pages))))
    with wl.read() as s:
        rows = list(s.scalars(stmt.order_by(*order).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    now = wl.clock()
    audit.record_reads(
        user, [r.study_uid for r in rows], event_type="worklist.list", action=QUERY,
        address=address(request),
    )  # fmt: skip
    last = rows[-1] if rows else None
    return {
        "studies": [study_item(r, now) for r in rows],
        "next": _encode_cursor([getattr(last, c.key) for c in columns]) if more and last else None,
    }


def radiologist_key(user: Any) -> str:
    if user.role != "radiologist" or not user.radiologist:
        raise HTTPException(403, "only a radiologist reads studies")
    return str(user.radiologist)


@router.post("/next")
def next_study(request: Request, user: UserDep, audit: AuditDep, wl: WorklistDep) -> dict[str, Any]:
    """Pull: the engine's most urgent study this radiologist may read now, assigned to them;
    ``{"study": null, "reason": ...}`` when there is none (off shift, full, or nothing)."""
    key = radiologist_key(user)
    decision = wl.claim_next(key)
    if decision is None:
        audit.record(user, "", "worklist.next", QUERY, address=address(request), detail="none")
        return {"study": None, "reason": "no study you may read now (shift, capacity or none)"}
    st = wl.study(decision.study_uid)
    audit.record(
        user, "", "worklist.next", QUERY, action_code="U",
        study_uid=st.study_uid, address=address(request),
    )  # fmt: skip
    return {"study": study_item(st, wl.clock()), "reasons": list(decision.reasons)}


# -- STAT pages: server-sent events ---------------------------------------------------------

#: how often the stream looks for new assignments, and sends a comment to keep proxies open
POLL_S: Final = 1.0
KEEPALIVE_S: Final = 15.0


def _stat_assignments(wl: Worklist, key: str, after_id: int) -> list[dict[str, Any]]:
    with wl.read() as s:
        rows = s.execute(
            select(WorklistEvent, Study)
            .join(Study, Study.study_uid == WorklistEvent.study_uid)
            .where(
                WorklistEvent.id > after_id,
                WorklistEvent.radiologist == key,
                WorklistEvent.kind.in_(("assigned", "reassigned")),
                Study.priority == int(Priority.STAT),
            )
            .order_by(WorklistEvent.id)
            .limit(50)
        ).all()
    now = wl.clock()
    return [
        {
            "id": ev.id,
            "event": "stat_assigned",
            "study": study_item(st, now),
            "by": ev.actor,
            "at": ev.at,
            "set_aside": bool((ev.detail or {}).get("set_aside", False)),
        }
        for ev, st in rows
    ]


def _last_event_id(wl: Worklist) -> int:
    with wl.read() as s:
        return int(s.scalar(select(func.max(WorklistEvent.id))) or 0)


@router.get("/events")
async def events(
    request: Request, user: UserDep, audit: AuditDep, wl: WorklistDep
) -> StreamingResponse:
    """``text/event-stream``: a ``stat_assigned`` event as soon as a STAT is handed to the
    signed-in radiologist (by a round, an admin or their own claim). Reconnecting with
    ``Last-Event-ID`` resumes after that event; a new stream starts from now."""
    key = radiologist_key(user)
    resume = request.headers.get("last-event-id", "")
    after = int(resume) if resume.isdigit() else await run_in_threadpool(_last_event_id, wl)
    who = address(request)

    async def stream() -> AsyncIterator[bytes]:
        nonlocal after
        yield b"retry: 3000\n\n"
        quiet_since = time.monotonic()
        while not await request.is_disconnected():
            found = await run_in_threadpool(_stat_assignments, wl, key, after)
            for item in found:
                after = item["id"]
                audit.record(
                    user, "", "worklist.stat_event", QUERY,
                    study_uid=item["study"]["study_uid"], address=who,
                )  # fmt: skip
                data = json.dumps(item, separators=(",", ":"))
                yield f"id: {item['id']}\nevent: stat_assigned\ndata: {data}\n\n".encode()
                quiet_since = time.monotonic()
            if time.monotonic() - quiet_since >= KEEPALIVE_S:
                yield b": keep-alive\n\n"
                quiet_since = time.monotonic()
            await asyncio.sleep(POLL_S)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
