"""Assembles a running station gateway: recovery at start, listener, forwarders, retention,
status and health (recovery itself: ``dicom_gateway.durable.recovery``)."""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dicom_gateway.durable.forward import ForwardWorker, Transport, complete_in
from dicom_gateway.durable.recovery import recover
from dicom_gateway.durable.scp import Listener
from dicom_gateway.durable.spool import Spool
from dicom_gateway.durable.state import (
    COMMITTED,
    FAILED,
    UPLOADED,
    StateDB,
)
from dicom_gateway.station.dicom_send import DicomTransport, destination_tls_args
from dicom_gateway.station.hub_upload import HubTransport
from dicom_gateway.station.settings import GatewaySettings
from telerad.core.priority import Priority

logger = logging.getLogger(__name__)

HUB_DESTINATION = "hub"


class Janitor(threading.Thread):
    """Deletes spool files after every destination committed them and the retention period
    passed; earlier under disk pressure, but never before the commit."""

    def __init__(self, spool: Spool, state: StateDB, retention_s: float, reserve_bytes: int):
        super().__init__(name="janitor", daemon=True)
        self.spool, self.state = spool, state
        self.retention_s = retention_s
        self.reserve_bytes = reserve_bytes
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        while not self.stopping.wait(30.0):
            try:
                self.sweep(time.time())
            except Exception:
                logger.exception("retention sweep failed")

    def deletable(self, older_than: float | None) -> list[tuple[str, str]]:
        rows = self.state.query(
            "SELECT i.sop_instance_uid, i.path, max(d.updated_at) AS done FROM instances i "
            "JOIN deliveries d ON d.sop_instance_uid = i.sop_instance_uid "
            "WHERE i.deleted_at IS NULL GROUP BY i.sop_instance_uid "
            "HAVING sum(d.state != ?) = 0 ORDER BY done",
            (COMMITTED,),
        )
        return [(r[0], r[1]) for r in rows if older_than is None or r[2] < older_than]

    def _mark_deleted(self, uids: list[str], now: float) -> None:
        """Files first, then rows, durably: a row rolled back by a power cut would only
        claim a file that is gone (harmless), never leave an unlisted file behind."""
        if uids:
            with self.state.transaction(durable=True) as db:
                db.executemany(
                    "UPDATE instances SET deleted_at = ? WHERE sop_instance_uid = ?",
                    [(now, uid) for uid in uids],
                )
            uids.clear()

    def sweep(self, now: float) -> int:
        victims = self.deletable(now - self.retention_s)
        pressure = self.spool.free_bytes() < 2 * self.reserve_bytes
        if pressure:
            victims = self.deletable(None)
        removed = 0
        gone: list[str] = []
        for uid, rel in victims:
            if pressure and self.spool.free_bytes() >= 3 * self.reserve_bytes:
                break
            self.spool.absolute(rel).unlink(missing_ok=True)
            gone.append(uid)
            removed += 1
            if len(gone) >= 500:
                self._mark_deleted(gone, now)
        self._mark_deleted(gone, now)
        if removed:
            logger.info(
                "retention removed %d committed spool files%s",
                removed,
                " (disk pressure)" if pressure else "",
            )
        return removed


def gateway_status(
    state: StateDB,
    quiet_period_s: float,
    now: float | None = None,
    *,
    release_settle_s: float = 5.0,
) -> dict[str, Any]:
    """What ``telerad gateway status`` shows: per-study state, links, backlog and an ETA,
    the studies that need attention (with the destination's reason) and the quarantine."""
    now = time.time() if now is None else now
    attention = state.attention_list()
    held = {a["study_uid"]: a for a in attention if a["held_at"] is not None}
    studies = []
    for row in state.query(
        "SELECT s.study_uid, s.priority, s.modality, s.calling_aet, s.first_received, "
        "s.last_received, s.released_at, s.instance_count, s.bytes, "
        "sum(d.state = ?), sum(d.state = ?), count(d.sop_instance_uid), "
        "sum(CASE WHEN d.state != ? AND d.state != ? THEN i.size ELSE 0 END), "
        "sum(d.state = ?) "
        "FROM studies s LEFT JOIN deliveries d ON d.study_uid = s.study_uid "
        "LEFT JOIN instances i ON i.sop_instance_uid = d.sop_instance_uid "
        "GROUP BY s.study_uid ORDER BY s.priority, s.first_received",
        (COMMITTED, FAILED, COMMITTED, FAILED, UPLOADED),
    ):
        (
            uid,
            prio,
            modality,
            aet,
            first,
            last,
            released,
            count,
            size,
            committed,
            failed,
            deliveries,
            backlog,
            uploaded,
        ) = row
        committed, failed, deliveries = committed or 0, failed or 0, deliveries or 0
        sent = committed + (uploaded or 0)
        ready_in = complete_in(
            now,
            last,
            released,
            quiet_period_s=quiet_period_s,
            release_settle_s=release_settle_s,
        )
        if deliveries and committed + failed == deliveries:
            st = "committed" if not failed else "committed-with-failures"
        elif uid in held:
            st = "needs attention"  # the destination keeps refusing it: see "attention"
        elif ready_in > 0:
            st = "receiving"  # forwarding may already be under way
        elif sent:
            st = "sending"  # complete, partly at its destinations
        else:
            st = "queued"  # complete, waiting behind more urgent or older studies
        studies.append(
            {
                "study_uid": uid,
                "priority": Priority(prio).label,
                "modality": modality,
                "calling_aet": aet,
                "instances": count,
                "bytes": size,
                "state": st,
                "sent_percent": round(100.0 * sent / deliveries, 1) if deliveries else 0.0,
                "failed": failed,
                "attention": held[uid]["reason"] if uid in held else "",
                "backlog_bytes": backlog or 0,
                "first_received": first,
                "last_received": last,
            }
        )
    links = []
    for dest, st, detail, last_ok, next_attempt, sent, rate in state.query(
        "SELECT destination, state, detail, last_ok, next_attempt, bytes_sent, rate_bps FROM links"
    ):
        links.append(
            {
                "destination": dest,
                "state": st,
                "detail": detail,
                "last_ok": last_ok,
                "next_attempt": next_attempt,
                "bytes_sent": sent,
                "rate_bps": rate,
            }
        )
    backlog = sum(s["backlog_bytes"] for s in studies)
    rate = max((lk["rate_bps"] or 0 for lk in links), default=0)
    quarantined = state.scalar("SELECT count(*) FROM quarantine") or 0
    return {
        "studies": studies,
        "links": links,
        "backlog_bytes": backlog,
        # Wire bytes are ~0.3-0.5 of raw for uncompressed CT/CR; 0.5 keeps the ETA honest.
        "eta_s": round(backlog * 0.5 * 8 / rate, 1) if rate and backlog else None,
        "quarantined": quarantined,
        "attention": attention,
    }


def quarantine_list(state: StateDB) -> list[dict[str, Any]]:
    return [
        dict(r)
        for r in state.query(
            "SELECT id, created_at, status, reason, calling_aet, sop_instance_uid, study_uid, path "
            "FROM quarantine ORDER BY id"
        )
    ]


class _HealthHandler(BaseHTTPRequestHandler):
    gateway: Gateway

    def do_GET(self) -> None:
        if self.path == "/metrics":
            body, ctype, code = generate_latest(), CONTENT_TYPE_LATEST, 200
        elif self.path == "/healthz":
            ok, detail = self.gateway.health()
            body = json.dumps(detail).encode()
            ctype, code = "application/json", 200 if ok else 503
        else:
            body, ctype, code = b"not found\n", "text/plain", 404
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.spool = Spool(settings.data_dir)
        self.state = StateDB(settings.data_dir / "gateway.sqlite3")
        self.transports: list[Transport] = []
        if settings.hub_url:
            if not settings.token:
                raise ValueError("a hub URL needs a station token (telerad hub station add)")
            verify: bool | ssl.SSLContext = (
                ssl.create_default_context(cafile=str(settings.hub_ca)) if settings.hub_ca else True
            )
            self.transports.append(
                HubTransport(
                    destination=HUB_DESTINATION,
                    hub_url=settings.hub_url,
                    token=settings.token,
                    state=self.state,
                    spool=self.spool,
                    bundle_max_bytes=settings.bundle_max_mb * 1024 * 1024,
                    chunk_bytes=settings.chunk_kb * 1024,
                    verify=verify,
                )
            )
        for dest in settings.destinations:
            self.transports.append(
                DicomTransport(
                    destination=dest.name,
                    aet=dest.aet,
                    host=dest.host,
                    port=dest.port,
                    calling_aet=dest.calling_aet or settings.aet,
                    state=self.state,
                    spool=self.spool,
                    tls_args=destination_tls_args(dest),
                    retry_max_s=settings.retry_max_s,
                )
            )
        names = [t.destination for t in self.transports]
        self.workers = [
            ForwardWorker(
                t,
                self.state,
                quiet_period_s=settings.quiet_period_s,
                release_settle_s=settings.release_settle_s,
                refusal_budget=settings.refusal_budget,
                retry_max_s=settings.retry_max_s,
            )
            for t in self.transports
        ]
        self.listener = Listener(settings, self.spool, self.state, names, on_stored=self._stored)
        self.janitor = Janitor(
            self.spool,
            self.state,
            settings.retention_days * 86400,
            settings.disk_reserve_mb * 1024 * 1024,
        )
        self._http: ThreadingHTTPServer | None = None

    def _stored(self, study_uid: str) -> None:
        for w in self.workers:
            w.notify()

    def start(self) -> None:
        names = [t.destination for t in self.transports]
        recover(self.spool, self.state, self.settings, names)
        self.state.ensure_deliveries(names)
        self.listener.start()
        for w in self.workers:
            w.start()
        self.janitor.start()
        if self.settings.http_port >= 0:
            handler = type("Handler", (_HealthHandler,), {"gateway": self})
            self._http = ThreadingHTTPServer(
                (self.settings.http_host, self.settings.http_port), handler
            )
            threading.Thread(target=self._http.serve_forever, daemon=True, name="http").start()

    @property
    def http_port(self) -> int | None:
        return int(self._http.server_address[1]) if self._http else None

    def health(self) -> tuple[bool, dict[str, Any]]:
        free = self.spool.free_bytes()
        reserve = self.settings.disk_reserve_mb * 1024 * 1024
        status = gateway_status(self.state, self.settings.quiet_period_s)
        ok = free > reserve and all(w.is_alive() for w in self.workers)
        return ok, {
            "status": "ok" if ok else "degraded",
            "free_bytes": free,
            "disk_reserve_bytes": reserve,
            "backlog_bytes": status["backlog_bytes"],
            "links": status["links"],
            "quarantined": status["quarantined"],
        }

    def stop(self) -> None:
        self.listener.stop()
        for w in self.workers:
            w.stop()
        for w in self.workers:
            w.join(timeout=10)
        self.janitor.stop()
        if self._http:
            self._http.shutdown()
        for t in self.transports:
            close = getattr(t, "close", None)
            if close:
                close()
        self.state.close()
