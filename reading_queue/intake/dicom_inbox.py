"""The hub's own DICOM port: hospital PACS and modalities sending straight to the hub.

The same durable listener as at the stations (``dicom_gateway.durable``) spools what arrives;
this in-process transport hands each instance to the intake service and commits the study
once it is complete, so DICOM arrivals follow the same receive-then-commit path as uploads.

Closed by default: only callers registered with ``telerad hub source add AET --station NAME
[--host H]`` associate; each one's studies belong to its station (jurisdiction, language,
SLA), exactly as if that station's gateway had uploaded them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dicom_gateway.durable.forward import (
    ForwardWorker,
    StudyRefused,
    StudyWork,
    TransportError,
    mark_committed,
)
from dicom_gateway.durable.recovery import recover
from dicom_gateway.durable.scp import Listener
from dicom_gateway.durable.spool import Spool
from dicom_gateway.durable.state import FAILED, PENDING, UPLOADED, StateDB
from reading_queue import QueueError
from reading_queue.intake.service import IngestService, InstanceRefused, StudyMeta
from reading_queue.settings import HubSettings


class _InboxListener(Listener):
    """The durable listener, admitting the callers of the hub's source registry."""

    def __init__(self, ingest: IngestService, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ingest = ingest

    def admits(self, calling_aet: str, host: str) -> bool:
        return self.ingest.source_station(calling_aet, host) is not None


class LocalTransport:
    """The hub's own listener hands instances to the in-process ingest service."""

    def __init__(self, *, destination: str, ingest: Any, state: StateDB, spool: Spool) -> None:
        self.destination = destination
        self.ingest = ingest
        self.state = state
        self.spool = spool

    def _station(self, calling_aet: str) -> str:
        station = self.ingest.source_station(calling_aet)
        if station is None:
            raise StudyRefused(
                f"DICOM source {calling_aet} is no longer registered "
                "(telerad hub source add AET --station NAME)"
            )
        return str(station)

    def send(self, study: StudyWork, preempt: Callable[[], bool]) -> bool:
        rows = self.state.query(
            "SELECT d.sop_instance_uid, i.path, i.calling_aet FROM deliveries d "
            "JOIN instances i ON i.sop_instance_uid = d.sop_instance_uid "
            "WHERE d.destination = ? AND d.study_uid = ? AND d.state = ? ORDER BY i.received_at",
            (self.destination, study.study_uid, PENDING),
        )
        for uid, rel, calling in rows:
            outcome, why = UPLOADED, ""
            try:
                self.ingest.store_instance(
                    self._station(calling), self.spool.absolute(rel).read_bytes()
                )
            except InstanceRefused as exc:
                # Different content under a held UID will be refused however often it is
                # tried: recorded as failed (the study is committed marked incomplete).
                outcome, why = FAILED, str(exc)[:300]
            except Exception as exc:
                raise TransportError(f"hub ingest failed for {uid}: {exc}") from exc
            with self.state.transaction() as db:
                db.execute(
                    "UPDATE deliveries SET state = ?, last_status = ?, updated_at = ? "
                    "WHERE destination = ? AND sop_instance_uid = ?",
                    (outcome, why, time.time(), self.destination, uid),
                )
            if preempt():
                return False
        return True

    def commit(self, study: StudyWork) -> None:
        rows = self.state.query(
            "SELECT d.sop_instance_uid, i.calling_aet FROM deliveries d JOIN instances i "
            "ON i.sop_instance_uid = d.sop_instance_uid "
            "WHERE d.destination = ? AND d.study_uid = ? AND d.state = ?",
            (self.destination, study.study_uid, UPLOADED),
        )
        uids = [r[0] for r in rows]
        if not rows:
            return
        station = self._station(rows[0][1])
        failed = self.state.failed_deliveries(self.destination, study.study_uid)
        try:
            res = self.ingest.commit(
                station,
                study.study_uid,
                uids,
                StudyMeta(
                    study.priority,
                    study.modality,
                    study.body_part,
                    max(0.0, time.time() - study.first_received),
                ),
                failed,
            )
        except QueueError as exc:  # the hub's own answer about this study, not a link
            raise StudyRefused(str(exc)) from exc
        if not res.committed:
            raise TransportError(f"hub commit of {study.study_uid} lacks {len(res.missing)}")
        mark_committed(self.state, self.destination, study.study_uid, uids)


class DicomInbox:
    """The hub's DICOM port: a durable listener spooling into ``data_dir/dicom-inbox`` and an
    in-process forwarder committing complete studies to the intake service."""

    DESTINATION = "archive"

    def __init__(self, settings: HubSettings, ingest: IngestService) -> None:
        self.settings = settings
        inbox = settings.data_dir / "dicom-inbox"
        self.spool = Spool(inbox)
        self.state = StateDB(inbox / "inbox.sqlite3")
        self.transport = LocalTransport(
            destination=self.DESTINATION, ingest=ingest, state=self.state, spool=self.spool
        )
        self.worker = ForwardWorker(
            self.transport,
            self.state,
            quiet_period_s=settings.quiet_period_s,
            release_settle_s=settings.release_settle_s,
            refusal_budget=settings.refusal_budget,
            retry_max_s=60,
        )
        self.listener = _InboxListener(
            ingest,
            settings,
            self.spool,
            self.state,
            [self.DESTINATION],
            on_stored=lambda _: self.worker.notify(),
        )

    def start(self) -> None:
        recover(self.spool, self.state, self.settings, [self.DESTINATION])
        self.state.ensure_deliveries([self.DESTINATION])
        if self.settings.dicom_port >= 0:
            self.listener.start()
        self.worker.start()

    def stop(self) -> None:
        self.listener.stop()
        self.worker.stop()
        self.worker.join(timeout=10)
        self.state.close()
