"""One study: ``GET /api/studies/{uid}`` (header, series, journey, priors) and the actions on
it, all through the worklist service and its state checks.

Radiologist: ``claim`` (take it from the pool), ``open``, ``heartbeat`` (renew the lease
while reading), ``release`` (hand it back). Admin: ``assign``, ``priority``, ``cancel``,
``merge``. A study the caller may not see is 404 exactly like a missing one; an action the
study's state does not allow is 409 with the study's current ``state``; every read and
every action is audited.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from reading_queue import QueueError
from reading_queue.accounts import Principal
from reading_queue.audit import PATIENT_RECORD, Outcome
from reading_queue.models import HubInstance, HubStudy, Study
from reading_queue.worklist.service import (
    NotEligible,
    StaleState,
    UnknownRadiologist,
    UnknownStudy,
    Worklist,
)
from telerad.core.priority import Priority
from viewer_api.routes.auth import AuditDep, UserDep
from viewer_api.routes.common import AccessDep, WorklistDep, address, no_such_study
from viewer_api.routes.worklist import radiologist_key, study_item

router = APIRouter(prefix="/api/studies", tags=["studies"])

Uid = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9.]+$")]
#: what each action does to the study, in the audit vocabulary
_UPDATE = "U"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReleaseIn(_Body):
    reason: str = Field(default="", max_length=500)


class AssignIn(_Body):
    radiologist: str = Field(min_length=1, max_length=64)
    #: assign although the engine says they may not read it (the reason is recorded)
    force: bool = False


class PriorityIn(_Body):
    priority: str = Field(pattern=r"^(?i:stat|urgent|routine|[012])$")


class CancelIn(_Body):
    reason: str = Field(min_length=1, max_length=500)


class MergeIn(_Body):
    into: str = Field(min_length=1, max_length=64, pattern=r"^[0-9.]+$")


def _admin(user: Principal) -> None:
    if user.role != "admin":
        raise HTTPException(403, "only an admin does this")


def _visible(access: Any, user: Principal, uid: str) -> None:
    if not access.can_see(user, uid):
        raise no_such_study(uid)


def _conflict(wl: Worklist, uid: str, exc: Exception) -> JSONResponse:
    try:
        state: str | None = wl.study(uid).state
    except UnknownStudy:
        state = None
    return JSONResponse({"detail": str(exc), "state": state}, status_code=409)


def _act(
    request: Request,
    user: Principal,
    audit: Any,
    wl: Worklist,
    uid: str,
    event_type: str,
    do: Any,
) -> Any:
    """Run one worklist action and answer it: the study as it is now, or 409 / 404 / 400,
    each audited with its outcome."""
    where = address(request)
    try:
        result = do()
    except (StaleState, NotEligible) as exc:
        audit.record(
            user, "", event_type, PATIENT_RECORD, action_code=_UPDATE, study_uid=uid,
            address=where, outcome=Outcome.MINOR_FAILURE, detail=str(exc)[:255],
        )  # fmt: skip
        return _conflict(wl, uid, exc)
    except UnknownStudy:
        # visible but not on the worklist (a clinic's study still arriving)
        raise no_such_study(uid) from None
    except UnknownRadiologist as exc:
        raise HTTPException(400, str(exc)) from None
    except QueueError as exc:
        raise HTTPException(400, str(exc)) from None
    audit.record(
        user, "", event_type, PATIENT_RECORD, action_code=_UPDATE, study_uid=uid, address=where
    )
    out: dict[str, Any] = {"study": study_item(wl.study(uid), wl.clock())}
    if isinstance(result, float):
        out["until"] = result
    return out


# -- reading -------------------------------------------------------------------------------


@router.get("/{uid}")
def study(
    request: Request, uid: Uid, user: UserDep, access: AccessDep, audit: AuditDep, wl: WorklistDep
) -> dict[str, Any]:
    """Header, series and instance counts, journey, and the priors the caller may see."""
    if not access.can_see(user, uid):
        audit.record(
            user, "", "study.read", PATIENT_RECORD, address=address(request),
            outcome=Outcome.MINOR_FAILURE, detail=f"not found or not theirs: {uid}"[:255],
        )  # fmt: skip
        raise no_such_study(uid)
    with wl.read() as s:
        entry = s.get(Study, uid)
        hub = s.get(HubStudy, uid)
        series = s.execute(
            select(HubInstance.series_uid, func.count())
            .where(HubInstance.study_uid == uid, HubInstance.state == "committed")
            .group_by(HubInstance.series_uid)
            .order_by(HubInstance.series_uid)
        ).all()
        priors: list[Study] = []
        if entry is not None and entry.patient_key:
            priors = list(
                s.scalars(
                    select(Study)
                    .where(
                        Study.patient_key == entry.patient_key,
                        Study.institution == entry.institution,
                        Study.study_uid != uid,
                    )
                    .order_by(Study.received_at.desc(), Study.study_uid)
                    .limit(50)
                )
            )
    # after the session: a second pooled connection while one is held starves the pool
    events = [] if entry is None else wl_history(wl, uid)
    seen = access.filter(user, [p.study_uid for p in priors])
    priors = [p for p in priors if p.study_uid in seen]
    now = wl.clock()
    audit.record(user, "", "study.read", PATIENT_RECORD, study_uid=uid, address=address(request))
    journey: list[dict[str, Any]] = []
    if hub is not None:
        if hub.station_received_at is not None:
            journey.append({"step": "at_station", "at": hub.station_received_at})
        journey.append({"step": "at_hub", "at": hub.first_received})
        if hub.committed_at is not None:
            journey.append({"step": "complete_at_hub", "at": hub.committed_at})
    for ev in events:
        journey.append(
            {
                "step": ev.kind,
                "at": ev.at,
                "state": ev.to_state,
                "radiologist": ev.radiologist or None,
                "by": ev.actor,
            }
        )
    header: dict[str, Any]
    if entry is not None:
        header = study_item(entry, now)
    else:
        assert hub is not None  # can_see: it exists somewhere
        header = {
            "study_uid": uid,
            "modality": hub.modality,
            "body_part": hub.body_part,
            "station": hub.station,
            "priority": Priority(hub.priority).label,
            "state": "receiving" if hub.state != "committed" else "received",
            "instance_count": hub.instance_count,
        }
    return {
        **header,
        "incomplete": bool(hub.missing_instances) if hub is not None else False,
        "missing_reason": hub.missing_reason if hub is not None else "",
        "series": [{"series_uid": se, "instance_count": int(n)} for se, n in series],
        "series_count": len(series),
        "journey": journey,
        "priors": [
            {
                "study_uid": p.study_uid,
                "accession": p.accession,
                "modality": p.modality,
                "body_part": p.body_part,
                "description": p.description,
                "received_at": p.received_at,
                "state": p.state,
            }
            for p in priors
        ],
    }


def wl_history(wl: Worklist, uid: str) -> list[Any]:
    try:
        return wl.history(uid)
    except UnknownStudy:
        return []


@router.post("/{uid}/claim")
def claim(
    request: Request, uid: Uid, user: UserDep, access: AccessDep, audit: AuditDep, wl: WorklistDep
) -> Any:
    key = radiologist_key(user)
    _visible(access, user, uid)
    return _act(request, user, audit, wl, uid, "study.claim", lambda: wl.claim(uid, key))


@router.post("/{uid}/open")
def open_study(
    request: Request, uid: Uid, user: UserDep, access: AccessDep, audit: AuditDep, wl: WorklistDep
) -> Any:
    key = radiologist_key(user)
    _visible(access, user, uid)
    return _act(request, user, audit, wl, uid, "study.open", lambda: wl.open_study(uid, key))


@router.post("/{uid}/heartbeat")
def heartbeat(
    request: Request, uid: Uid, user: UserDep, access: AccessDep, audit: AuditDep, wl: WorklistDep
) -> Any:
    """Renew the lease while reading; answers ``until`` (epoch seconds)."""
    key = radiologist_key(user)
    _visible(access, user, uid)
    return _act(request, user, audit, wl, uid, "study.heartbeat", lambda: wl.heartbeat(uid, key))


@router.post("/{uid}/release")
def release(
    request: Request,
    uid: Uid,
    user: UserDep,
    access: AccessDep,
    audit: AuditDep,
    wl: WorklistDep,
    body: ReleaseIn | None = None,
) -> Any:
    key = radiologist_key(user)
    _visible(access, user, uid)
    reason = body.reason if body else ""
    return _act(
        request, user, audit, wl, uid, "study.release", lambda: wl.release(uid, key, reason)
    )


# -- admin ----------------------------------------------------------------------------------


@router.post("/{uid}/assign")
def assign(
    request: Request,
    uid: Uid,
    body: AssignIn,
    user: UserDep,
    access: AccessDep,
    audit: AuditDep,
    wl: WorklistDep,
) -> Any:
    _admin(user)
    _visible(access, user, uid)
    return _act(
        request, user, audit, wl, uid, "study.assign",
        lambda: wl.reassign(uid, body.radiologist, actor=user.username, force=body.force),
    )  # fmt: skip


@router.post("/{uid}/priority")
def priority(
    request: Request,
    uid: Uid,
    body: PriorityIn,
    user: UserDep,
    access: AccessDep,
    audit: AuditDep,
    wl: WorklistDep,
) -> Any:
    _admin(user)
    _visible(access, user, uid)
    value = body.priority
    prio = Priority.parse(int(value) if value.isdigit() else value)
    return _act(
        request, user, audit, wl, uid, "study.priority",
        lambda: wl.set_priority(uid, prio, actor=user.username),
    )  # fmt: skip


@router.post("/{uid}/cancel")
def cancel(
    request: Request,
    uid: Uid,
    body: CancelIn,
    user: UserDep,
    access: AccessDep,
    audit: AuditDep,
    wl: WorklistDep,
) -> Any:
    _admin(user)
    _visible(access, user, uid)
    return _act(
        request, user, audit, wl, uid, "study.cancel",
        lambda: wl.cancel(uid, actor=user.username, reason=body.reason),
    )  # fmt: skip


@router.post("/{uid}/merge")
def merge(
    request: Request,
    uid: Uid,
    body: MergeIn,
    user: UserDep,
    access: AccessDep,
    audit: AuditDep,
    wl: WorklistDep,
) -> Any:
    """Read this study's instances with study ``into`` (late series under a new UID)."""
    _admin(user)
    _visible(access, user, uid)
    _visible(access, user, body.into)
    return _act(
        request, user, audit, wl, uid, "study.merge",
        lambda: wl.merge(uid, body.into, actor=user.username),
    )  # fmt: skip
