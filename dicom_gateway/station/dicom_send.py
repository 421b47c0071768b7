"""Destination type ``dicom``: C-STORE SCU to any PACS (a hospital PACS, the station's own).

The SCU proposes, for every (SOP class, transfer syntax) actually present, that exact pair
first and uncompressed fallbacks after it, so the peer can take instances as they are and
pynetdicom never re-encodes behind our back (FIELD-NOTES). Only instances that failed are
retried; warnings are recorded with the instance.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.presentation import PresentationContext

from dicom_gateway.durable.forward import StudyWork, TransportError, mark_committed
from dicom_gateway.durable.spool import Spool
from dicom_gateway.durable.state import COMMITTED, FAILED, PENDING, UPLOADED, StateDB
from dicom_gateway.station.settings import DicomDestination
from telerad.core.backoff import backoff_delay

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 128
#: Permanent refusals: retrying the same bytes cannot help after a few attempts.
MAX_ATTEMPTS = 5


def _is_warning(status: int) -> bool:
    return status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF


def _retry_forever(status: int) -> bool:
    """Out of resources (0xA7xx) and processing failures (0x0110) are the peer's trouble:
    it will recover, so keep retrying; other failures count towards MAX_ATTEMPTS."""
    return 0xA700 <= status <= 0xA7FF or status == 0x0110


def planned_syntaxes(pairs: set[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """The (SOP class, transfer syntaxes) of each context to propose for ``pairs``.

    Each (SOP class, transfer syntax) present gets a context of its own proposing only that
    syntax, so the peer accepts or refuses it by itself. Offering fallbacks inside the same
    context does not work: an SCP picks from *its own* list order (FIELD-NOTES), so Orthanc
    took Explicit VR Little Endian for every compressed instance, which pynetdicom then cannot
    send, and Deflated or Big Endian instances got re-encoded. Per SOP class one more context
    offers the uncompressed syntaxes, used only when the exact one was refused.
    """
    planned: list[tuple[str, list[str]]] = [(sop, [ts]) for sop, ts in sorted(pairs)]
    for sop_class in sorted({sop for sop, _ in pairs}):
        if not {(sop_class, ExplicitVRLittleEndian), (sop_class, ImplicitVRLittleEndian)} <= pairs:
            planned.append((sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    return planned


def plan_contexts(pairs: set[tuple[str, str]]) -> list[PresentationContext]:
    """The presentation contexts to request for ``pairs`` (see ``planned_syntaxes``)."""
    planned = planned_syntaxes(pairs)
    if len(planned) > MAX_CONTEXTS:
        raise TransportError(f"study needs {len(planned)} presentation contexts (max 128)")
    return [build_context(sop, syntaxes) for sop, syntaxes in planned]


def fit_to_association(assoc: Any, ds: Dataset) -> None:
    """Make ``ds`` sendable on ``assoc``: when the peer refused the instance's compressed
    syntax but takes an uncompressed one, decode it (pydicom, lossless codecs), keeping its
    SOP Instance UID. Raises ValueError with the reason when the peer cannot take it."""
    sop_class = str(ds.SOPClassUID)
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    accepted = {
        str(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if str(cx.abstract_syntax) == sop_class
    }
    if ts in accepted or not ts.is_compressed:
        return  # exact, or pynetdicom converts between uncompressed syntaxes itself
    if not accepted & {ExplicitVRLittleEndian, ImplicitVRLittleEndian}:
        return  # send_c_store raises the "no presentation context" error
    try:
        ds.decompress(generate_instance_uid=False)
    except Exception as exc:
        raise ValueError(
            f"peer refused {ts.name} and the pixel data could not be decoded: {exc}"
        ) from exc


def refused_everything(assoc: Any) -> bool:
    """The peer accepted the association but none of its presentation contexts (pynetdicom
    then aborts it), as opposed to a peer that did not answer or rejected the association."""
    return (
        bool(not assoc.is_established and assoc.is_aborted and assoc.rejected_contexts)
        and not assoc.accepted_contexts
    )


def destination_tls_args(dest: DicomDestination) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for ``dest``: a client context that verifies the peer's
    certificate (against ``dest.ca``, else the system's CAs) and its name, or None when the
    destination is plain DICOM. Unreadable files fail here, at start, with the setting named.
    """
    if not dest.tls:
        return None
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(dest.ca) if dest.ca else None
        )
        if dest.tls_cert and dest.tls_key:
            context.load_cert_chain(str(dest.tls_cert), str(dest.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"destination {dest.name!r}: TLS files unusable: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context, dest.tls_server_name or dest.host


class DicomTransport:
    def __init__(
        self,
        *,
        destination: str,
        aet: str,
        host: str,
        port: int,
        calling_aet: str,
        state: StateDB,
        spool: Spool,
        tls_args: Any = None,
        retry_max_s: float = 300.0,
    ) -> None:
        self.retry_max_s = retry_max_s
        self.destination = destination
        self.aet, self.host, self.port = aet, host, port
        self.calling_aet = calling_aet
        self.state = state
        self.spool = spool
        self.tls_args = tls_args

    def send(self, study: StudyWork, preempt: Callable[[], bool]) -> bool:
        rows = self.state.query(
            "SELECT d.sop_instance_uid, i.sop_class_uid, i.transfer_syntax, i.path, d.attempts "
            "FROM deliveries d JOIN instances i ON i.sop_instance_uid = d.sop_instance_uid "
            "WHERE d.destination = ? AND d.study_uid = ? AND d.state = ? "
            "AND coalesce(d.next_attempt, 0) <= ? ORDER BY i.received_at",
            (self.destination, study.study_uid, PENDING, time.time()),
        )
        if not rows:
            return True
        ae = AE(ae_title=self.calling_aet)
        ae.maximum_pdu_size = 0
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        for cx in plan_contexts({(r[1], r[2]) for r in rows}):
            ae.add_requested_context(cx.abstract_syntax, cx.transfer_syntax)  # type: ignore[arg-type]
        assoc = ae.associate(self.host, self.port, ae_title=self.aet, tls_args=self.tls_args)
        if refused_everything(assoc):
            # The peer answered but takes none of this study's SOP classes: as final as a
            # per-instance "no presentation context", not a broken link to retry forever.
            for uid, sop_class, ts, _rel, attempts in rows:
                why = f"no presentation context for {UID(sop_class).name!r} with {UID(ts).name!r}"
                self._mark(uid, FAILED, f"not accepted by peer: {why}", attempts + 1)
            self.state.set_link(self.destination, "up", "refused every SOP class", ok=True)
            return True
        if not assoc.is_established:
            raise TransportError(
                f"association with {self.aet}@{self.host}:{self.port} failed "
                f"({'rejected' if assoc.is_rejected else 'no answer or aborted'}"
                f"{'; over TLS: check the peer certificate against ca' if self.tls_args else ''})"
            )
        refused: list[str] = []
        preempted = False
        try:
            for uid, _sop_class, _ts, rel, attempts in rows:
                if not assoc.is_established:
                    raise TransportError(f"association with {self.aet} dropped")
                retry = self._store_one(assoc, uid, rel, attempts)
                if retry:
                    refused.append(retry)
                if preempt():
                    preempted = True
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        if preempted:
            return False
        if refused:
            # Each refused instance waits out its own back-off (``next_attempt``): the peer
            # is not hammered, and the rest of the queue -- other studies -- goes on.
            self.state.set_link(
                self.destination,
                "up",
                f"{self.aet} refused {len(refused)} instance(s) for now "
                f"(status {', '.join(sorted(set(refused)))})",
                ok=True,
            )
            return True
        self.state.set_link(self.destination, "up", "stored", ok=True)
        return True

    def _store_one(self, assoc: Any, uid: str, rel: str, attempts: int) -> str | None:
        """Store one instance and record the outcome; returns the failure status when the
        instance stays pending for a later attempt."""
        try:
            ds = dcmread(self.spool.absolute(rel))
        except Exception as exc:
            self._mark(uid, FAILED, f"spool file unreadable: {exc}", attempts + 1)
            return None
        try:
            fit_to_association(assoc, ds)
            rsp = assoc.send_c_store(ds)
        except ValueError as exc:
            # No accepted context for this SOP class / syntax: the peer will never take it.
            self._mark(uid, FAILED, f"not accepted by peer: {exc}", attempts + 1)
            return None
        status = int(getattr(rsp, "Status", -1)) if rsp else -1
        if status == -1:
            raise TransportError(f"no C-STORE response from {self.aet} for {uid}")
        if status == 0x0000:
            self._mark(uid, COMMITTED, "", attempts)
        elif _is_warning(status):
            logger.warning("%s stored %s with warning 0x%04X", self.aet, uid, status)
            self._mark(uid, COMMITTED, f"warning 0x{status:04X}", attempts)
        else:
            attempts += 1
            give_up = not _retry_forever(status) and attempts >= MAX_ATTEMPTS
            logger.warning(
                "%s refused %s: 0x%04X (attempt %d%s)",
                self.aet,
                uid,
                status,
                attempts,
                ", giving up" if give_up else "",
            )
            delay = backoff_delay(attempts, base_s=1.0, cap_s=self.retry_max_s)
            self._mark(
                uid,
                FAILED if give_up else PENDING,
                f"failure 0x{status:04X}",
                attempts,
                next_attempt=None if give_up else time.time() + delay,
            )
            if not give_up:
                return f"0x{status:04X}"
        return None

    def _mark(
        self, uid: str, state: str, status: str, attempts: int, next_attempt: float | None = None
    ) -> None:
        with self.state.transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = ?, last_status = ?, attempts = ?, "
                "next_attempt = ?, updated_at = ? WHERE destination = ? AND sop_instance_uid = ?",
                (state, status, attempts, next_attempt, time.time(), self.destination, uid),
            )

    def commit(self, study: StudyWork) -> None:
        """C-STORE has no commit step: each stored instance is already committed."""
        uids = [
            r[0]
            for r in self.state.query(
                "SELECT sop_instance_uid FROM deliveries WHERE destination = ? AND study_uid = ? "
                "AND state = ?",
                (self.destination, study.study_uid, UPLOADED),
            )
        ]
        mark_committed(self.state, self.destination, study.study_uid, uids)
