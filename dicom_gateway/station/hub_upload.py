"""Destination type ``hub``: the telerad upload protocol over HTTP(S).

1. Manifest: the gateway announces the study's pending instances (UID, size, sha256); the hub
   answers which it lacks, so nothing is sent twice after a crash or a re-send.
2. Bundles: the missing instances are packed (losslessly compressed for the wire) into bundle
   files in ``outbox/`` and uploaded with tus 1.0.0: POST creates the upload, PATCH streams
   it, HEAD tells where to resume after a broken connection. Creation is idempotent per bundle
   sha256, so a crash between POST and recording the URL does not start over.
3. Commit: once the study has been quiet for the quiet period and everything is uploaded, the
   hub commits the study atomically; only then are the instances marked committed.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import socket
import ssl
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from dicom_gateway.durable.forward import StudyRefused, StudyWork, TransportError, mark_committed
from dicom_gateway.durable.spool import Spool
from dicom_gateway.durable.state import BUNDLED, FAILED, PENDING, UPLOADED, Bundle, StateDB
from telerad.core.fileio import fsync_dir
from telerad.core.wire import BundleEntry, write_bundle

logger = logging.getLogger(__name__)

TUS = {"Tus-Resumable": "1.0.0"}
#: The columns of ``state.Bundle``, in its field order.
_BUNDLE_COLUMNS = (
    "id, destination, study_uid, path, length, raw_bytes, count, sha256, upload_url, offset, "
    "bytes_sent"
)


#: Unsent bytes the kernel may queue on the hub connection. Without a bound the send buffer
#: autotunes to megabytes, and a STAT study waits for a routine bundle's queued bytes to
#: drain: 12.8 s late at 2 Mbit/s (benchmarks/wire.py); with it, pre-emption takes ~1 s.
NOTSENT_LOWAT = 128 * 1024


def _socket_options() -> list[tuple[int, int, int]]:
    options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    lowat = getattr(socket, "TCP_NOTSENT_LOWAT", 25 if sys.platform.startswith("linux") else None)
    if lowat is not None:
        options.append((socket.IPPROTO_TCP, lowat, NOTSENT_LOWAT))
    return options


class _HashingWriter:
    """Counts and hashes what ``write_bundle`` writes, so the file is read only once."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.length = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.length += len(data)
        return self.fh.write(data)


class HubTransport:
    def __init__(
        self,
        *,
        destination: str,
        hub_url: str,
        token: str,
        state: StateDB,
        spool: Spool,
        bundle_max_bytes: int = 16 * 1024 * 1024,
        chunk_bytes: int = 256 * 1024,
        verify: bool | ssl.SSLContext = True,
        timeout_s: float = 60.0,
    ) -> None:
        self.destination = destination
        self.state = state
        self.spool = spool
        self.bundle_max_bytes = bundle_max_bytes
        self.chunk_bytes = chunk_bytes
        self.base = hub_url.rstrip("/") + "/api/v1/ingest"
        self.client = httpx.Client(
            headers={"Authorization": f"Bearer {token}", "User-Agent": "telerad-gateway"},
            timeout=httpx.Timeout(timeout_s, connect=15.0),
            transport=httpx.HTTPTransport(verify=verify, socket_options=_socket_options()),
        )

    def close(self) -> None:
        self.client.close()

    # -- HTTP with error mapping -----------------------------------------------------------

    def _request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        try:
            resp = self.client.request(method, url, **kw)
        except httpx.HTTPError as exc:
            raise TransportError(f"hub unreachable: {type(exc).__name__}: {exc}") from exc
        if resp.status_code == 401:
            raise TransportError("hub rejected the station token (401)")
        if resp.status_code == 507:
            raise TransportError(f"hub is short of disk (507): {resp.text[:200]}")
        if resp.status_code >= 500 or resp.status_code in (408, 423, 429):
            raise TransportError(f"hub busy or failing: HTTP {resp.status_code} {resp.text[:200]}")
        return resp

    @staticmethod
    def _refused(what: str, resp: httpx.Response) -> TransportError:
        """A 4xx is the hub's answer about this study: a refusal, counted against the study's
        budget; anything else unexpected is a transport failure (back off, retry)."""
        text = f"{what} refused: HTTP {resp.status_code} {resp.text[:300]}"
        return StudyRefused(text) if 400 <= resp.status_code < 500 else TransportError(text)

    # -- Transport -------------------------------------------------------------------------

    def send(self, study: StudyWork, preempt: Callable[[], bool]) -> bool:
        """One bundle per call: resume the study's open bundle, or announce the next slice
        of pending instances (up to ``bundle_max_bytes``), pack what the hub lacks into one
        bundle and upload it. The worker chooses again after every call, so a STAT never
        waits for the rest of a routine study."""
        for open_bundle in self._open_bundles(study.study_uid)[:1]:
            return self._upload(open_bundle, preempt)
        pending = self.state.query(
            "SELECT d.sop_instance_uid, i.size, i.sha256, i.path FROM deliveries d "
            "JOIN instances i ON i.sop_instance_uid = d.sop_instance_uid "
            "WHERE d.destination = ? AND d.study_uid = ? AND d.state = ? "
            "AND coalesce(d.next_attempt, 0) <= ? ORDER BY i.received_at",
            (self.destination, study.study_uid, PENDING, time.time()),
        )
        if not pending:
            return True
        # A slice of at most one bundle's worth; the rest of the study is announced when its
        # turn comes (a 5,000-instance manifest is not re-sent after every bundle).
        upto, size = 0, 0
        while upto < len(pending) and (
            upto == 0 or size + pending[upto][1] <= self.bundle_max_bytes
        ):
            size += pending[upto][1]
            upto += 1
        pending = pending[:upto]
        missing = set(self._announce(study, pending))
        held = [r[0] for r in pending if r[0] not in missing]
        if held:
            self._set_state(held, UPLOADED)
        todo = [r for r in pending if r[0] in missing]
        if not todo:
            return True
        bundle = self._pack(study.study_uid, todo)
        return bundle is None or self._upload(bundle, preempt)

    def commit(self, study: StudyWork) -> None:
        uids = [
            r[0]
            for r in self.state.query(
                "SELECT sop_instance_uid FROM deliveries WHERE destination = ? AND study_uid = ? "
                "AND state = ?",
                (self.destination, study.study_uid, UPLOADED),
            )
        ]
        # Instances this gateway could not forward for good: the hub is told, and the study
        # is marked incomplete on the worklist rather than committed as if whole.
        failed = [
            {"sop_instance_uid": uid, "reason": why[:300]}
            for uid, why in self.state.failed_deliveries(self.destination, study.study_uid)
        ]
        resp = self._request(
            "POST",
            f"{self.base}/studies/{study.study_uid}/commit",
            json={
                "priority": study.priority,
                "modality": study.modality,
                "body_part": study.body_part,
                "received_age_s": max(0.0, time.time() - study.first_received),
                "sop_instance_uids": uids,
                "failed": failed,
            },
        )
        if resp.status_code != 200:
            raise self._refused("commit", resp)
        body = resp.json()
        if not body["committed"]:
            missing = list(body["missing"])
            self._set_state(missing, PENDING)
            # Sent again at once; if the hub keeps lacking them, the study steps aside.
            raise StudyRefused(
                f"hub lacks {len(missing)} instances of the study at commit; sending them again"
            )
        mark_committed(self.state, self.destination, study.study_uid, uids)
        self.state.set_link(self.destination, "up", "committed", ok=True)
        logger.info(
            "study %s committed at hub (%d instances sent now, %d at hub)",
            study.study_uid,
            len(uids),
            body["instance_count"],
        )

    # -- manifest --------------------------------------------------------------------------

    def _announce(self, study: StudyWork, pending: list[Any]) -> list[str]:
        resp = self._request(
            "POST",
            f"{self.base}/studies/{study.study_uid}/manifest",
            json={
                "priority": study.priority,
                "modality": study.modality,
                "body_part": study.body_part,
                "received_age_s": max(0.0, time.time() - study.first_received),
                "instances": [
                    {"sop_instance_uid": r[0], "size": r[1], "sha256": r[2]} for r in pending
                ],
            },
        )
        if resp.status_code != 200:
            raise self._refused("manifest", resp)
        return list(resp.json()["missing"])

    def _set_state(self, uids: list[str], state: str) -> None:
        now = time.time()
        with self.state.transaction() as db:
            db.executemany(
                "UPDATE deliveries SET state = ?, bundle_id = NULL, updated_at = ? "
                "WHERE destination = ? AND sop_instance_uid = ?",
                [(state, now, self.destination, u) for u in uids],
            )

    # -- bundles ---------------------------------------------------------------------------

    def _open_bundles(self, study_uid: str) -> list[Bundle]:
        rows = self.state.query(
            f"SELECT {_BUNDLE_COLUMNS} FROM bundles WHERE destination = ? AND study_uid = ? "
            "ORDER BY id",
            (self.destination, study_uid),
        )
        return [Bundle(*r) for r in rows]

    def _pack(self, study_uid: str, rows: list[Any]) -> Bundle | None:
        bad: list[tuple[str, str]] = []
        good: list[str] = []

        def entries() -> Iterator[tuple[BundleEntry, bytes]]:
            for uid, size, sha, rel in rows:
                try:
                    data = self.spool.absolute(rel).read_bytes()
                except OSError as exc:
                    bad.append((uid, f"spool file unreadable: {exc}"))
                    continue
                if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
                    bad.append((uid, "spool file does not match its recorded sha256"))
                    continue
                good.append(uid)
                yield BundleEntry(uid, study_uid, sha, size), data

        name = f"bundle-{uuid.uuid4().hex}.tlb"
        tmp = self.spool.tmp_dir / name
        final = self.spool.outbox_dir / name
        with tmp.open("wb") as fh:
            writer = _HashingWriter(fh)
            stats = write_bundle(writer, entries())  # type: ignore[arg-type]
            fh.flush()
            os.fsync(fh.fileno())
        if bad:
            now = time.time()
            for uid, why in bad:
                logger.error("instance %s cannot be forwarded: %s", uid, why)
            with self.state.transaction() as db:
                db.executemany(
                    "UPDATE deliveries SET state = ?, last_status = ?, updated_at = ? "
                    "WHERE destination = ? AND sop_instance_uid = ?",
                    [(FAILED, why, now, self.destination, uid) for uid, why in bad],
                )
        if not good:
            tmp.unlink(missing_ok=True)
            return None
        os.replace(tmp, final)
        fsync_dir(final.parent)
        with self.state.transaction() as db:
            cur = db.execute(
                "INSERT INTO bundles (destination, study_uid, path, length, raw_bytes, count, "
                "sha256, created_at) VALUES (?,?,?,?,?,?,?,?)",
                (
                    self.destination,
                    study_uid,
                    self.spool.relative(final),
                    writer.length,
                    stats.raw_bytes,
                    stats.count,
                    writer.sha.hexdigest(),
                    time.time(),
                ),
            )
            bundle_id = cur.lastrowid
            db.executemany(
                "UPDATE deliveries SET state = ?, bundle_id = ?, updated_at = ? "
                "WHERE destination = ? AND sop_instance_uid = ?",
                [(BUNDLED, bundle_id, time.time(), self.destination, u) for u in good],
            )
        logger.info(
            "packed %d instances of %s: %d raw -> %d wire bytes",
            stats.count,
            study_uid,
            stats.raw_bytes,
            writer.length,
        )
        assert bundle_id is not None
        return self._open_bundle(bundle_id)

    def _open_bundle(self, bundle_id: int) -> Bundle:
        rows = self.state.query(
            f"SELECT {_BUNDLE_COLUMNS} FROM bundles WHERE id = ?",
            (bundle_id,),
        )
        return Bundle(*rows[0])

    def _create(self, bundle: Bundle) -> tuple[str, int, str]:
        meta = {"study_uid": bundle.study_uid, "bundle_sha256": bundle.sha256, "filetype": "tlb"}
        resp = self._request(
            "POST",
            f"{self.base}/uploads",
            headers={
                **TUS,
                "Upload-Length": str(bundle.length),
                "Upload-Metadata": ",".join(
                    f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in meta.items()
                ),
            },
        )
        if resp.status_code != 201:
            raise self._refused("upload creation", resp)
        location = resp.headers["Location"]
        url = str(httpx.URL(self.base).join(location))
        with self.state.transaction() as db:
            db.execute("UPDATE bundles SET upload_url = ? WHERE id = ?", (url, bundle.id))
        return url, int(resp.headers["Upload-Offset"]), resp.headers.get("Telerad-Upload-State", "")

    def _head(self, url: str) -> tuple[int, str] | None:
        resp = self._request("HEAD", url, headers=TUS)
        if resp.status_code in (404, 410):
            return None
        if resp.status_code != 200:
            raise TransportError(f"upload status refused: HTTP {resp.status_code}")
        return int(resp.headers["Upload-Offset"]), resp.headers.get("Telerad-Upload-State", "")

    def _upload(self, bundle: Bundle, preempt: Callable[[], bool]) -> bool:
        """Upload (or resume) a bundle; True when the hub holds its instances."""
        url = bundle.upload_url
        status = None if url is None else self._head(url)
        if url is None or status is None:
            url, offset, upstate = self._create(bundle)
        else:
            offset, upstate = status
        path = self.spool.absolute(bundle.path)
        while upstate != "processed":
            if upstate == "failed":
                return self._discard(bundle, "hub marked the upload failed")
            if upstate == "expired":
                with self.state.transaction() as db:
                    db.execute("UPDATE bundles SET upload_url = NULL WHERE id = ?", (bundle.id,))
                raise TransportError("upload expired at the hub; creating it again")
            started = time.monotonic()
            sent = 0

            def body(start: int = offset) -> Iterator[bytes]:
                nonlocal sent
                with path.open("rb") as fh:
                    fh.seek(start)
                    while True:
                        piece = fh.read(self.chunk_bytes)
                        if not piece:
                            return
                        sent += len(piece)
                        yield piece
                        if preempt():
                            return

            try:
                resp = self._request(
                    "PATCH",
                    url,
                    headers={
                        **TUS,
                        "Upload-Offset": str(offset),
                        "Content-Type": "application/offset+octet-stream",
                    },
                    content=body(),
                )
            except TransportError:
                # A link that drops connections every few seconds breaks long PATCHes, but
                # the hub keeps every byte that arrived. When this attempt moved the hub's
                # offset on, the link works: resume now. Raising would count as a failure,
                # and the worker's back-off, doubling with consecutive failures up to
                # retry_max_s, would throttle a working link to a crawl. No progress (or the
                # HEAD fails too): raise, and the worker backs off as before.
                head = self._head(url) if sent else None
                if head is None or head[0] <= offset:
                    raise
                logger.info(
                    "bundle %d of %s: connection broke at %d/%d; resuming",
                    bundle.id,
                    bundle.study_uid,
                    head[0],
                    bundle.length,
                )
                offset, upstate = head
                continue
            finally:
                self._record_sent(bundle, sent, time.monotonic() - started)
            if resp.status_code == 460:
                return self._discard(bundle, resp.text[:500])
            if resp.status_code == 409:
                head = self._head(url)
                if head is None:
                    raise TransportError("upload vanished at the hub; recreating")
                offset, upstate = head
                continue
            if resp.status_code == 404:
                with self.state.transaction() as db:
                    db.execute("UPDATE bundles SET upload_url = NULL WHERE id = ?", (bundle.id,))
                raise TransportError("upload unknown at the hub; recreating")
            if resp.status_code != 204:
                raise self._refused("PATCH", resp)
            offset = int(resp.headers["Upload-Offset"])
            upstate = resp.headers.get("Telerad-Upload-State", "")
            with self.state.transaction() as db:
                db.execute("UPDATE bundles SET offset = ? WHERE id = ?", (offset, bundle.id))
            if upstate != "processed" and offset < bundle.length and preempt():
                logger.info(
                    "bundle %d of %s pre-empted at %d/%d",
                    bundle.id,
                    bundle.study_uid,
                    offset,
                    bundle.length,
                )
                return False
        self._finish(bundle)
        return True

    def _record_sent(self, bundle: Bundle, sent: int, seconds: float) -> None:
        rate = sent * 8 / seconds if seconds > 0.5 and sent > 64 * 1024 else None
        with self.state.transaction() as db:
            db.execute(
                "UPDATE bundles SET bytes_sent = bytes_sent + ? WHERE id = ?", (sent, bundle.id)
            )
        self.state.set_link(self.destination, "up", "sending", sent=sent, rate_bps=rate, ok=True)

    def _finish(self, bundle: Bundle) -> None:
        now = time.time()
        with self.state.transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = ?, updated_at = ? WHERE bundle_id = ? "
                "AND destination = ?",
                (UPLOADED, now, bundle.id, self.destination),
            )
            db.execute("DELETE FROM bundles WHERE id = ?", (bundle.id,))
        Path(self.spool.absolute(bundle.path)).unlink(missing_ok=True)
        logger.info(
            "bundle %d of %s held by the hub (%d instances)",
            bundle.id,
            bundle.study_uid,
            bundle.count,
        )

    def _discard(self, bundle: Bundle, why: str) -> bool:
        """The hub rejected the bundle's content: re-pack its instances from the spool."""
        logger.error("bundle %d of %s rejected by the hub: %s", bundle.id, bundle.study_uid, why)
        now = time.time()
        with self.state.transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = ?, bundle_id = NULL, attempts = attempts + 1, "
                "last_status = ?, updated_at = ? WHERE bundle_id = ? AND destination = ?",
                (PENDING, why[:200], now, bundle.id, self.destination),
            )
            db.execute(
                "UPDATE deliveries SET state = ? WHERE destination = ? AND state = ? "
                "AND attempts >= 5",
                (FAILED, self.destination, PENDING),
            )
            db.execute("DELETE FROM bundles WHERE id = ?", (bundle.id,))
        self.spool.absolute(bundle.path).unlink(missing_ok=True)
        raise StudyRefused(f"bundle rejected by the hub: {why}")
