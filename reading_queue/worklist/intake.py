"""Intake: committed studies from the ``study_events`` outbox become worklist entries."""

from __future__ import annotations

import json
import logging
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from reading_queue.models import (
    HubStudy,
    Station,
    Study,
    StudyEvent,
)
from reading_queue.worklist.store import S, WorklistStore, _hdr, patient_key
from telerad.core.priority import Priority

logger = logging.getLogger(__name__)


class IntakeMixin(WorklistStore):
    """Intake: committed studies from the ``study_events`` outbox become worklist entries."""

    def consume_events(self, limit: int = 500, now: float | None = None) -> int:
        """Turn ``study_received`` events of the ingest outbox into worklist studies."""
        with self.read() as s:
            pending = list(
                s.execute(
                    select(StudyEvent.id, StudyEvent.study_uid)
                    .where(StudyEvent.kind == "study_received", StudyEvent.consumed_at.is_(None))
                    .order_by(StudyEvent.id)
                    .limit(limit)
                )
            )
        if not pending:
            return 0
        # Read headers (archive I/O) before taking the write lock.
        headers: dict[str, Dataset | None] = {}
        if self.header_reader is not None:
            for _, uid in pending:
                if uid not in headers:
                    try:
                        headers[uid] = self.header_reader(uid)
                    except Exception:
                        logger.exception("cannot read a header of study %s", uid)
                        headers[uid] = None
        done = 0
        now = self.clock() if now is None else now
        with self.session.begin() as s:
            events = s.scalars(
                select(StudyEvent)
                .where(StudyEvent.id.in_([p[0] for p in pending]), StudyEvent.consumed_at.is_(None))
                .order_by(StudyEvent.id)
                .with_for_update(skip_locked=True)
            ).all()
            stations = {st.name: st for st in s.scalars(select(Station))}
            for ev in events:
                self._intake(s, ev, headers.get(ev.study_uid), stations, now)
                ev.consumed_at = now
                done += 1
        return done

    def _intake(
        self,
        s: Session,
        ev: StudyEvent,
        header: Dataset | None,
        stations: dict[str, Station],
        now: float,
    ) -> None:
        payload = json.loads(ev.payload or "{}")
        hub = s.get(HubStudy, ev.study_uid)
        existing = s.get(Study, ev.study_uid, with_for_update=True)
        count = int(payload.get("instance_count") or (hub.instance_count if hub else 0))
        if existing is not None:
            new = int(payload.get("new_instances") or 0)
            values: dict[str, Any] = {
                "instance_count": count,
                "missing_instances": int(payload.get("missing_instances") or 0),
                "updated_at": now,
            }
            late = existing.state not in (S.RECEIVED, S.READY)
            if late:
                values["late_instances"] = existing.late_instances + new
            s.execute(update(Study).where(Study.study_uid == ev.study_uid).values(**values))
            if late:
                self._event(
                    s,
                    ev.study_uid,
                    "late_series",
                    existing.state,
                    existing.state,
                    existing.assignee or "",
                    "ingest",
                    {
                        "new_instances": new,
                        "addendum_needed": existing.state in (S.PRELIMINARY, S.FINAL),
                    },
                    now,
                )
            return
        station_name = str(payload.get("station") or (hub.station if hub else ""))
        station = stations.get(station_name)
        modality = (hub.modality if hub else "") or _hdr(header, "Modality")
        body_part = (hub.body_part if hub else "") or _hdr(header, "BodyPartExamined")
        priority = int(payload.get("priority", hub.priority if hub else Priority.ROUTINE))
        subspecialty, rvu = self.policy.classify(modality, body_part)
        received = ev.created_at
        overrides = dict(station.sla_minutes or {}) if station else {}
        deadline = received + self.policy.sla_s(priority, overrides)
        s.add(
            Study(
                study_uid=ev.study_uid,
                accession=_hdr(header, "AccessionNumber")[:64],
                modality=modality.upper()[:16],
                body_part=body_part.upper()[:64],
                description=_hdr(header, "StudyDescription")[:128],
                subspecialty=subspecialty,
                rvu=rvu,
                station=station_name,
                institution=(station.institution if station else "")
                or _hdr(header, "InstitutionName")[:128],
                jurisdiction=station.jurisdiction if station else "",
                language=station.language if station else "",
                priority=priority,
                received_at=received,
                deadline=deadline,
                state=S.RECEIVED.value,
                instance_count=count,
                missing_instances=int(payload.get("missing_instances") or 0),
                patient_id=_hdr(header, "PatientID")[:64],
                patient_name=_hdr(header, "PatientName")[:192],
                patient_birth_date=_hdr(header, "PatientBirthDate")[:8],
                patient_key=patient_key(
                    _hdr(header, "PatientID"), _hdr(header, "IssuerOfPatientID")
                ),
                updated_at=now,
            )
        )
        s.flush()
        detail = {"station": station_name, "priority": Priority(priority).label}
        self._event(s, ev.study_uid, "received", "", S.RECEIVED, "", "ingest", detail, now)
        self._transition(
            s,
            ev.study_uid,
            [S.RECEIVED],
            S.READY,
            kind="ready",
            actor="ingest",
            now=now,
            detail={
                "deadline": deadline,
                "rvu": rvu,
                "subspecialty": subspecialty,
                "jurisdiction": station.jurisdiction if station else "",
            },
        )
        logger.info(
            "study %s from %s on the worklist: %s %s, %s",
            ev.study_uid,
            station_name,
            modality,
            Priority(priority).name,
            f"due in {(deadline - now) / 60:.0f} min",
        )
