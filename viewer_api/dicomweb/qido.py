"""QIDO-RS (PS3.18 §10.6): search the hub's committed studies, series and instances.

``GET /studies``, ``/studies/{study}/series``, ``/studies/{study}/series/{series}/instances``,
``/studies/{study}/instances``, ``/series``, ``/instances``; answers are
``application/dicom+json`` arrays, ``200 []`` when nothing matches (what OHIF and
dicomweb-client expect; PS3.18 no longer has the old 204).

* **What is searched**: the attribute index (reading_queue.intake.index), committed instances
  only: a study still arriving shows nothing until its commit. The matching rules are
  ``index.parse_query``'s.
* **Who sees what**: the one access rule (reading_queue.access) is a condition of the same
  SQL statement, so ``limit``/``offset`` page over what the caller may see. A query scoped to
  a study (or series) the caller may not see answers **404, exactly as for one that does not
  exist**. (Orthanc answers such a query ``200 []``; a 404 tells a viewer opening a study by
  UID that it is not there, and a missing study and a study that is not yours still look
  the same.)
* **Audit**: an answer is a read of each study it returns (one "Query" event per study); an
  answer with no match, a refused query (400) and a 404 are recorded too (outcome 4, or 8
  when the study exists but is not the caller's: only the audit trail tells them apart).
* **Refused**: an unknown parameter, a malformed value, an attribute below the query level,
  an attribute given twice: 400 with a message that names the parameter, never its value.
  ``fuzzymatching=true`` is accepted and ignored, with the standard's ``Warning: 299``.
* **Query strings** are decoded as HTML forms do: ``+`` is a space (dicomweb-client sends
  spaces so); a literal ``+`` must be sent as ``%2B``.
"""

from __future__ import annotations

import json
from typing import Any, Final

from fastapi import APIRouter, HTTPException, Request, Response

from reading_queue.access import Access
from reading_queue.accounts import Principal
from reading_queue.audit import QUERY, AuditTrail, Outcome
from reading_queue.intake import index
from reading_queue.intake.index import Level, Query, QueryError
from telerad.core.identity import uid_problem
from viewer_api import coding
from viewer_api.routes.auth import AuditDep, UserDep

router = APIRouter()

MEDIA_TYPE: Final = "application/dicom+json"
_ACCEPTABLE: Final = frozenset({MEDIA_TYPE, "application/json", "application/*", "*/*"})
EVENT: Final = "study.search"
_PN_GROUPS: Final = ("Alphabetic", "Ideographic", "Phonetic")
_MORE: Final = "There are additional results that can be requested"
_NAMES: Final = {Level.STUDY: "studies", Level.SERIES: "series", Level.INSTANCE: "instances"}


def _element(attribute: index.Attribute, value: Any) -> dict[str, Any]:
    """One attribute in the DICOM JSON model (PS3.18 F.2): strings split into values at
    backslashes, IS/US as numbers, PN as its component groups."""
    vr = attribute.vr
    if value is None or value == "":
        return {"vr": vr}
    if vr in ("IS", "US"):
        return {"vr": vr, "Value": [int(value)]}
    values = str(value).split("\\")
    if vr == "PN":
        names = []
        for v in values:
            groups = {k: g for k, g in zip(_PN_GROUPS, v.split("="), strict=False) if g}
            names.append(groups or None)
        return {"vr": vr, "Value": names}
    return {"vr": vr, "Value": values}


def _retrieve_url(base: str, row: dict[str, Any], level: Level) -> str:
    url = f"{base}/studies/{row['StudyInstanceUID']}"
    if level >= Level.SERIES:
        url += f"/series/{row['SeriesInstanceUID']}"
    if level is Level.INSTANCE:
        url += f"/instances/{row['SOPInstanceUID']}"
    return url


def to_dicom_json(rows: list[dict[str, Any]], q: Query, base: str) -> list[dict[str, Any]]:
    attributes = q.returned()
    out = []
    for row in rows:
        item: dict[str, Any] = {"00080005": {"vr": "CS", "Value": ["ISO_IR 192"]}}
        for a in attributes:
            item[a.tag] = _element(a, row[a.keyword])
        item["00081190"] = {"vr": "UR", "Value": [_retrieve_url(base, row, q.level)]}
        out.append(dict(sorted(item.items())))
    return out


def _warning(texts: list[str]) -> str:
    """RFC 7234 Warning values, as PS3.18 §8.3.4 uses them (code 299)."""
    return ", ".join('299 telerad "{}"'.format(t.replace('"', "'")) for t in texts)


def _accepts_json(request: Request) -> bool:
    header = request.headers.get("accept", "")
    if not header.strip():
        return True
    types = {part.split(";")[0].strip().lower() for part in header.split(",")}
    return bool(types & _ACCEPTABLE)


def _search(
    request: Request,
    user: Principal,
    audit: AuditTrail,
    level: Level,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    returns_from: Level | None = None,
) -> Response:
    address = request.client.host if request.client else ""
    what = f"QIDO-RS {_NAMES[level]}"
    scope_uid = study_uid if study_uid and uid_problem(study_uid) is None else None

    def refuse(code: int, message: str, outcome: int, detail: str) -> HTTPException:
        audit.record(
            user, "", EVENT, QUERY,
            study_uid=scope_uid, address=address, outcome=outcome, detail=f"{what}: {detail}",
        )  # fmt: skip
        return HTTPException(code, message)

    if not _accepts_json(request):
        raise refuse(
            406,
            f"QIDO-RS answers {MEDIA_TYPE} (or application/json) only",
            Outcome.MINOR_FAILURE,
            "refused: not acceptable",
        )
    try:
        q = index.parse_query(
            level,
            list(request.query_params.multi_items()),
            study_uid=study_uid,
            series_uid=series_uid,
            returns_from=returns_from,
        )
    except QueryError as exc:
        raise refuse(400, str(exc), Outcome.MINOR_FAILURE, f"refused: {exc}") from None
    access: Access = request.app.state.access
    engine = request.app.state.ingest.engine

    # the caller's roster row is read now, before the connection: see Access.visibility
    visible = access.visibility(user)

    with engine.execution_options(read_only=True).connect() as conn:
        result = index.search(conn, q, visible)
        missing = (
            not result.rows
            and study_uid is not None
            and not index.scope_exists(conn, study_uid, series_uid, visible)
        )
        if missing:
            # The caller gets one answer; the audit trail tells the cases apart.
            assert study_uid is not None
            outcome, why = Outcome.MINOR_FAILURE, "no such study"
            if series_uid is not None and index.scope_exists(conn, study_uid, None, visible):
                why = "no such series"
            elif index.study_held(conn, study_uid):
                outcome = Outcome.SERIOUS_FAILURE
                why = "refused: not visible to the caller (or nothing committed yet)"
            raise refuse(
                404, "series not found" if series_uid is not None else "study not found",
                outcome, why,
            )  # fmt: skip
    uids = result.study_uids()
    if uids:
        audit.record_reads(user, uids, event_type=EVENT, address=address, detail=what)
    else:
        audit.record(user, "", EVENT, QUERY, study_uid=scope_uid, address=address,
                     detail=f"{what}: no match")  # fmt: skip
    base = str(request.base_url).rstrip("/") + "/dicom-web"
    body = json.dumps(to_dicom_json(result.rows, q, base), ensure_ascii=False)
    warnings = list(q.warnings) + ([_MORE] if result.more else [])
    # Search answers change as studies arrive and as access changes (a study handed to
    # someone else): never kept, not even by the browser.
    headers = {"Cache-Control": "no-store", "Vary": "Accept, Accept-Encoding"}
    if warnings:
        headers["Warning"] = _warning(warnings)
    data = coding.encode(body.encode("utf-8"), headers, coding.wants_gzip(request.headers))
    return Response(data, media_type=MEDIA_TYPE, headers=headers)


@router.get("/studies")
def search_for_studies(request: Request, user: UserDep, audit: AuditDep) -> Response:
    return _search(request, user, audit, Level.STUDY)


@router.get("/studies/{study}/series")
def search_for_study_series(
    study: str, request: Request, user: UserDep, audit: AuditDep
) -> Response:
    return _search(request, user, audit, Level.SERIES, study_uid=study)


@router.get("/studies/{study}/series/{series}/instances")
def search_for_series_instances(
    study: str, series: str, request: Request, user: UserDep, audit: AuditDep
) -> Response:
    return _search(request, user, audit, Level.INSTANCE, study_uid=study, series_uid=series)


@router.get("/studies/{study}/instances")
def search_for_study_instances(
    study: str, request: Request, user: UserDep, audit: AuditDep
) -> Response:
    return _search(request, user, audit, Level.INSTANCE, study_uid=study, returns_from=Level.SERIES)


@router.get("/series")
def search_for_series(request: Request, user: UserDep, audit: AuditDep) -> Response:
    return _search(request, user, audit, Level.SERIES, returns_from=Level.STUDY)


@router.get("/instances")
def search_for_instances(request: Request, user: UserDep, audit: AuditDep) -> Response:
    return _search(request, user, audit, Level.INSTANCE, returns_from=Level.STUDY)
