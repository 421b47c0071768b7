"""The DICOM listener: C-STORE and C-ECHO SCP that answers Success only for durable instances.

The same listener runs at stations (spooling for the forwarders) and at the hub (spooling for
the hub's own ingest). Failures are mapped to DICOM statuses here, at the edge:

=======  ==============================================================================
0xA700   out of resources: free disk under the reserve, or the write failed (ENOSPC, EIO)
0xC210   cannot understand: the dataset does not parse
0xC211   cannot understand: Study/Series/SOP Instance UID or SOP Class UID missing
0xC212   cannot understand: SOP Instance UID in the dataset differs from the command's
0xC213   cannot understand: different content already stored under this SOP Instance UID
0xC214   cannot understand: a UID breaks the UID rules -- in the dataset, or in the
         C-STORE-RQ command (Affected SOP Class/Instance UID over 64 characters)
0xA701   out of resources: unexpected error (logged with the association id)
=======  ==============================================================================

Everything refused with a dataset in hand is kept in the quarantine with its reason.

Hostile and broken peers (pynetdicom 3.0, read in its source):

* pynetdicom starts an association thread for every accepted TCP connection and counts those
  threads against ``ae.maximum_associations`` (``acse.py``, ``_negotiate_as_acceptor``:
  ``len(active_acceptors) > maximum_associations``), so connections that never send an
  A-ASSOCIATE-RQ fill the slots. Its limit is therefore set out of reach and ours
  (``max_associations`` in total, ``max_associations_per_peer`` per address) counts only
  connections that sent an A-ASSOCIATE-RQ we accepted (``handle_requested``).
* The time a connection has for its A-ASSOCIATE-RQ is the DUL's ARTIM timer, whose timeout is
  ``acse_timeout`` (``Association.acse_timeout`` sets ``dul.artim_timer.timeout``); the
  acceptor thread also waits ``acse_timeout`` for the request (``association.py``,
  ``run_reactor``). Both are ``artim_s``. As an acceptor that never requests a release,
  nothing else uses ``acse_timeout``; DIMSE and network timeouts stay long.
* Random bytes: the DUL reads them six at a time as PDU headers, answers each unknown PDU
  type with an A-ABORT and keeps reading (Sta13, AA-7); the first header with a valid type
  (1 in 37) makes it block in ``recv(pdu_length)`` on a socket without timeout
  (``dul.py`` ``_read_pdu_data``), where its ARTIM check never runs again and the acceptor's
  ``kill()`` waits for it forever. ``_reap_overdue`` shuts such sockets down (which wakes the
  blocked ``recv``) once ``artim_s`` has passed without an established association, and again
  ``artim_s`` after a release or abort if the peer has not closed.
* A command UID longer than 64 characters fails pynetdicom's UID validation when the
  C-STORE-RQ message becomes a primitive (``dimse.py`` ``receive_primitive`` ->
  ``message_to_primitive`` -> ``set_uid`` raises ValueError -> Evt19 -> A-ABORT): the handler
  never runs. ``handle_dimse_recv`` (EVT_DIMSE_RECV fires just before that conversion) puts
  a placeholder UID in its place and remembers the original, ``handle_store`` refuses the
  instance with 0xC214 and quarantines it, and ``handle_dimse_sent`` (EVT_DIMSE_SENT fires
  before the response is encoded) leaves the placeholder out of the C-STORE-RSP, where the
  UID is optional. Any other invalid command element (a bad Priority, a Move Originator AE
  title over 16 characters) still ends in pynetdicom's A-ABORT, before our code runs.
* Two things killed pynetdicom's DUL thread mid-association, without an A-ABORT: a command
  set that does not decode, and our response queued after the peer ended the association
  (``_guard_dul``).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import socket
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from typing import Any, cast

from prometheus_client import Counter, Histogram
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pydicom.uid import JPEGLossless as JPEGLosslessP14
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    evt,
)
from pynetdicom import acse as _acse
from pynetdicom import association as _association_module
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext
from pynetdicom.presentation import negotiate_unrestricted as _pynetdicom_negotiate_unrestricted
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_gateway.durable.priority_rules import evaluate as evaluate_priority
from dicom_gateway.durable.settings import ListenerSettings
from dicom_gateway.durable.spool import Spool, dataset_sha256
from dicom_gateway.durable.state import InstanceRecord, StateDB, StudyInfo
from telerad.core.identity import IdentityError, UndecodableError, read_identity

logger = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
OUT_OF_RESOURCES_UNEXPECTED = 0xA701
CANNOT_UNDERSTAND = 0xC210
MISSING_UIDS = 0xC211
UID_MISMATCH = 0xC212
CONFLICT = 0xC213
INVALID_UID = 0xC214

INSTANCES = Counter("telerad_scp_instances_total", "C-STORE requests by outcome", ["outcome"])
BYTES = Counter("telerad_scp_bytes_total", "Bytes made durable by the listener")
STORE_SECONDS = Histogram(
    "telerad_scp_store_seconds",
    "Time from dataset in hand to status answered (write, fsync, record)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
ASSOCIATIONS = Counter("telerad_scp_associations_total", "Associations by outcome", ["outcome"])
DROPPED = Counter(
    "telerad_scp_connections_dropped_total",
    "Connections shut down because no association came within artim_s, or no close after one",
)

#: A-ASSOCIATE-RJ result, source, reason: rejected-transient, service provider (presentation),
#: local limit exceeded -- what pynetdicom answers at its own association limit.
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)
#: pynetdicom's ``maximum_associations`` counts every connection's thread from accept on; ours
#: counts associations (``Listener.handle_requested``). Its check is kept only as a backstop.
PYNETDICOM_THREAD_LIMIT = 4096
#: How often the reaper looks for connections past their ARTIM deadline.
REAPER_POLL_S = 0.25
#: The C-STORE-RQ command elements pynetdicom validates as UIDs.
_COMMAND_UIDS = ("AffectedSOPClassUID", "AffectedSOPInstanceUID")

# The SCP picks the transfer syntax from *its own* order among those proposed, so lossless
# compressed syntaxes come first and lossy last: each instance arrives as it was made
# (FIELD-NOTES: pynetdicom's default order would make senders decompress).
_PREFERRED = [
    JPEGLSLossless,
    JPEG2000Lossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEGLosslessSV1,
    JPEGLosslessP14,
    RLELossless,
    # Explicit before Deflated: an SCU offering both for an uncompressed image made it in
    # Explicit VR; deflating would cost the modality CPU and hide pixels from our JPEG-LS.
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
]
ACCEPTED_TRANSFER_SYNTAXES: list[str] = [str(ts) for ts in _PREFERRED] + [
    ts for ts in AllTransferSyntaxes if ts not in _PREFERRED
]

_LOCK_STRIPES = 64
_SYNTAX_RANK = {ts: i for i, ts in enumerate(ACCEPTED_TRANSFER_SYNTAXES)}
_NOT_STORAGE = {str(Verification)}


def negotiate_storage(
    rq_contexts: list[PresentationContext],
    ac_contexts: list[PresentationContext],
    roles: Any = None,
) -> tuple[list[PresentationContext], Any]:
    """pynetdicom's unrestricted storage negotiation, with *our* transfer syntax order.

    pynetdicom's version accepts every storage context (private and unknown SOP classes
    too, as ``storescp --promiscuous``) but takes the caller's first proposed syntax, even
    one nobody knows. We take the first of ``ACCEPTED_TRANSFER_SYNTAXES`` that the caller
    proposed -- lossless compressed first, so instances arrive as they were made -- and refuse
    a context offering none we know (result 0x04, transfer syntaxes not supported).
    """
    result, reply_roles = _pynetdicom_negotiate_unrestricted(rq_contexts, ac_contexts, roles)
    proposed = {cx.context_id: [str(ts) for ts in cx.transfer_syntax] for cx in rq_contexts}
    for cx in result:
        if cx.result != 0x00 or str(cx.abstract_syntax) in _NOT_STORAGE:
            continue
        known = [ts for ts in proposed.get(cx.context_id, []) if ts in _SYNTAX_RANK]
        if known:
            cx.transfer_syntax = [UID(min(known, key=_SYNTAX_RANK.__getitem__))]
        else:
            cx.result = 0x04
    return result, reply_roles


def _install_negotiation() -> None:
    """Process-wide, like the ``UNRESTRICTED_STORAGE_SERVICE`` switch it refines."""
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    _acse.negotiate_unrestricted = negotiate_storage
    _association_module.time = _ShortSleeps()  # type: ignore[assignment]


class _ShortSleeps:
    """``time`` as pynetdicom's association module sees it, with sleeps capped.

    Its reactor sleeps a hard-coded 1 ms before it looks for each decoded message, so every
    C-STORE waits ~0.5-1 ms for nothing; with storescu waiting for each answer that was ~15%
    of a 121-instance push (measured in-process: medians 0.58-0.64 s -> 0.45-0.57 s). The cost
    is more wake-ups while an association is open (ASSOCIATION_POLL_S); idle stations have
    no associations open.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, ASSOCIATION_POLL_S))


#: pynetdicom's DUL polls its socket every 1 ms when idle; 0.2 ms cuts ~0.1 s off a 121-instance
#: push (benchmarks/ingest.py) for ~3% of a core per idle association.
DUL_POLL_S = 0.0002
#: The same for pynetdicom's association reactor (see ``_ShortSleeps``).
ASSOCIATION_POLL_S = 0.0002


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_aet: str = ""
) -> bytes:
    """Preamble, ``DICM`` and the file meta pynetdicom would write (``create_file_meta`` +
    ``write_file_meta_info``), encoded directly: a third of the handler's Python time went
    into building and encoding a pydicom dataset for these six elements.

    ``source_aet`` (the calling AE) goes into Source Application Entity Title (0002,0016):
    the spool file then carries what AE-based priority rules need, and recovery after a
    power cut re-applies them from the file alone."""

    def element(elem: int, vr: bytes, value: bytes, pad: bytes = b"\x00") -> bytes:
        if len(value) % 2:
            value += pad
        if vr == b"OB":
            return struct.pack("<HH2sHI", 2, elem, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value

    def uid(value: str) -> bytes:
        return value.encode("ascii", "replace")

    body = b"".join(
        (
            element(0x0001, b"OB", b"\x00\x01"),
            element(0x0002, b"UI", uid(sop_class_uid)),
            element(0x0003, b"UI", uid(sop_instance_uid)),
            element(0x0010, b"UI", uid(transfer_syntax)),
            element(0x0012, b"UI", uid(PYNETDICOM_IMPLEMENTATION_UID)),
            element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" "),
            element(0x0016, b"AE", source_aet.strip()[:16].encode("ascii", "replace"), b" ")
            if source_aet.strip()
            else b"",
        )
    )
    group_length = struct.pack("<HH2sHI", 2, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


def _sha256(prefix: bytes, body: bytes | memoryview) -> str:
    digest = hashlib.sha256(prefix)
    digest.update(body)  # hashlib releases the GIL: this runs beside the write and fsync
    return digest.hexdigest()


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    sop_instance_uid: str = ""
    reason: str = ""
    study_uid: str = ""


def caller_allowed(allowed: Sequence[str], calling_aet: str, host: str) -> bool:
    """``allowed`` holds ``AET`` or ``AET@HOST`` entries; an empty list admits everybody."""
    if not allowed:
        return True
    aet = calling_aet.strip()
    for entry in allowed:
        name, _, want_host = entry.partition("@")
        if name.strip() == aet and (not want_host or want_host.strip() == host):
            return True
    return False


#: Events from our side of the association (a primitive queued for the DUL to send).
_LOCAL_EVENTS = frozenset({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})


def _guard_dul(assoc: Any) -> None:
    """Keep two things a hostile peer can provoke from killing the DUL thread mid-association
    (no A-ABORT, no EVT_CONN_CLOSE; the bounded fuzz found both). Wrapped per association,
    not process-wide, before its DUL starts; ``test_listener_hostile`` checks the internals.

    * A P-DATA whose command set does not decode (no CommandField, a wrong-length value):
      pynetdicom's DT-2 calls ``dimse.receive_primitive`` without a guard around
      ``DIMSEMessage.decode_msg``, and ``StateMachine.do_action`` re-raises. It now aborts the
      association as pynetdicom does when a decoded message does not convert (Evt19).
    * Our answer to a request, queued after the peer's A-ABORT or garbage ended the
      association (Sta13): P-DATA in Sta13 is not in pynetdicom's transition table and
      ``do_action`` raises InvalidEventError. There is nobody to answer: it is dropped.
    """
    dimse, dul = assoc.dimse, assoc.dul
    receive = dimse.receive_primitive
    machine = dul.state_machine
    do_action = machine.do_action

    def receive_primitive(primitive: Any) -> None:
        try:
            receive(primitive)
        except Exception as exc:
            logger.warning(
                "undecodable DIMSE message from %s, aborting: %s", assoc.requestor.address, exc
            )
            dimse.message = None
            dul.event_queue.put("Evt19")  # invalid PDU: A-ABORT (AA-8)

    def guarded_action(event: str) -> None:
        if event in _LOCAL_EVENTS and machine.current_state == "Sta13":
            try:
                primitive = dul.to_provider_queue.get(False)  # else it is offered again
            except queue.Empty:
                primitive = None
            logger.info(
                "association with %s already ended: dropped %s",
                assoc.requestor.address,
                type(primitive).__name__,
            )
            return
        do_action(event)

    dimse.receive_primitive = receive_primitive
    machine.do_action = guarded_action


class Listener:
    """Owns the AE and the handlers; inject the spool and state, no globals."""

    def __init__(
        self,
        settings: ListenerSettings,
        spool: Spool,
        state: StateDB,
        destinations: Sequence[str],
        on_stored: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.state = state
        self.destinations = list(destinations)
        self.on_stored = on_stored
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._server: ThreadedAssociationServer | None = None
        self._hasher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sha256")
        self.reserve_bytes = settings.disk_reserve_mb * 1024 * 1024
        # Which studies each open association has added to: a study is complete soon after
        # the last association adding to it is released (see ``handle_released``).
        self._adding: dict[int, set[str]] = {}
        self._adding_lock = threading.Lock()
        # Connections that must become an association (or close) by a deadline: id(assoc) ->
        # (assoc, time.monotonic() deadline); see ``_reap_overdue``.
        self._deadlines: dict[int, tuple[Any, float]] = {}
        # Associations holding a slot: id(assoc) -> (assoc, peer address).
        self._slots: dict[int, tuple[Any, str]] = {}
        # C-STORE-RQ command UIDs pynetdicom would have aborted on: id(assoc) -> MessageID ->
        # {keyword: (value as sent, why invalid)}; see ``handle_dimse_recv``.
        self._bad_command_uids: dict[int, dict[int, dict[str, tuple[str, str]]]] = {}
        self._peer_lock = threading.Lock()
        self._reaper_stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._tls: ssl.SSLContext | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def build_ae(self) -> AE:
        # Private and retired storage SOP classes arrive too: accept any abstract syntax
        # as storage (DCMTK storescp --promiscuous does the same), with our syntax order.
        _install_negotiation()
        ae = AE(ae_title=self.settings.aet)
        ae.maximum_pdu_size = 0  # no limit: ~30% faster receive (FIELD-NOTES)
        # pynetdicom counts connections, not associations (module docstring): our limits are
        # enforced in ``handle_requested``; its own stays as a backstop far above them.
        ae.maximum_associations = max(PYNETDICOM_THREAD_LIMIT, self.settings.max_associations)
        # Long for slow modalities on slow links: an established association may be quiet.
        ae.network_timeout = 120
        ae.dimse_timeout = 120
        # The ARTIM timer (and the acceptor's wait for the A-ASSOCIATE-RQ): short.
        ae.acse_timeout = self.settings.artim_s
        ae.add_supported_context(Verification)
        return ae

    def ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if not (s.tls_cert and s.tls_key):
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(s.tls_cert), str(s.tls_key))
        if s.tls_ca:
            ctx.load_verify_locations(str(s.tls_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def start(self) -> ThreadedAssociationServer:
        ae = self.build_ae()
        self._tls = self.ssl_context()
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_CONN_OPEN, self.handle_conn_open),
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_ESTABLISHED, self.handle_established),
            (evt.EVT_ABORTED, self.handle_aborted),
            (evt.EVT_RELEASED, self.handle_released),
            (evt.EVT_CONN_CLOSE, self.handle_closed),
            (evt.EVT_DIMSE_RECV, self.handle_dimse_recv),
            (evt.EVT_DIMSE_SENT, self.handle_dimse_sent),
        ]
        server = ae.start_server(
            (self.settings.dicom_host, self.settings.dicom_port),
            block=False,
            evt_handlers=handlers,
            # Not pynetdicom's ssl_context: it handshakes in the accept loop, where one silent
            # connection stops every other (handle_conn_open does it per connection instead).
            ssl_context=None,
        )
        assert server is not None
        self._server = server
        self._reaper_stop.clear()
        self._reaper = threading.Thread(
            target=self._reap_loop, name="telerad-artim-reaper", daemon=True
        )
        self._reaper.start()
        host, port = server.server_address[:2]
        logger.info("DICOM listener %s on %s:%d", self.settings.aet, host, port)
        return server

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._reaper_stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
            self._reaper = None
        self._hasher.shutdown(wait=True)

    def handle_established(self, event: evt.Event) -> None:
        ASSOCIATIONS.labels("established").inc()
        with self._peer_lock:
            self._deadlines.pop(id(event.assoc), None)  # established: DIMSE timeouts apply
        dul = event.assoc.dul
        if hasattr(dul, "_run_loop_delay"):  # private in pynetdicom 3.0; checked by a test
            dul._run_loop_delay = DUL_POLL_S

    # -- hostile peers: ARTIM deadline and association slots ---------------------------------

    def _arm(self, assoc: Any) -> None:
        """Give ``assoc`` ``artim_s`` from now to become an association, or to close."""
        with self._peer_lock:
            self._deadlines[id(assoc)] = (assoc, time.monotonic() + self.settings.artim_s)

    def _free_slot(self, assoc: Any) -> None:
        with self._peer_lock:
            self._slots.pop(id(assoc), None)

    def handle_conn_open(self, event: evt.Event) -> None:
        """Arm the ARTIM deadline; with TLS, handshake here, in this connection's thread.

        pynetdicom's ``AssociationServer.get_request`` wraps each accepted socket in the
        server's accept loop (``ssl_context.wrap_socket(..., server_side=True)`` handshakes
        at once): a peer that connects and says nothing stopped every new connection, for
        good (measured: a C-ECHO behind one silent connection timed out). Here the handshake
        runs in the thread socketserver started for this connection, before pynetdicom's
        association thread starts, with ``artim_s`` per socket operation and the reaper's
        deadline over all of it."""
        assoc = event.assoc
        self._arm(assoc)
        _guard_dul(assoc)
        if self._tls is None:
            return
        holder = cast(Any, assoc.dul.socket)  # AssociationSocket, set before EVT_CONN_OPEN
        raw = holder.socket
        try:
            raw.settimeout(self.settings.artim_s)
            tls = self._tls.wrap_socket(raw, server_side=True)
            tls.settimeout(None)  # pynetdicom reads a blocking socket, as it would have
        except (OSError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
            logger.warning("TLS handshake with %s failed: %s", assoc.requestor.address, exc)
            DROPPED.inc()
            try:
                raw.close()
            except OSError:
                pass
            return  # the DUL finds the socket closed (Evt17) and ends the connection
        holder.socket = tls

    def _reap_loop(self) -> None:
        while not self._reaper_stop.wait(REAPER_POLL_S):
            try:
                self._reap_overdue(time.monotonic())
            except Exception:  # the reaper must outlive any one connection
                logger.exception("ARTIM reaper failed; continuing")

    def _reap_overdue(self, now: float) -> int:
        """Shut down the sockets of connections past their deadline that are not established.

        pynetdicom's own ARTIM check runs in the DUL loop, which a peer stops by sending a PDU
        header and less data than it announced (``recv`` without timeout); ``shutdown`` wakes
        that ``recv`` (it returns EOF), so the DUL closes the connection the normal way
        (Evt17) and the acceptor thread's ``kill()`` returns."""
        with self._peer_lock:
            due = [assoc for assoc, deadline in self._deadlines.values() if deadline <= now]
            for assoc in due:
                del self._deadlines[id(assoc)]
        dropped = 0
        for assoc in due:
            if assoc.is_established:
                continue
            sock = getattr(assoc.dul.socket, "socket", None)
            if sock is None:
                continue  # closed already
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                continue  # closed meanwhile
            dropped += 1
            DROPPED.inc()
            logger.warning(
                "dropped connection from %s: no association within %.1f s (or no close after)",
                assoc.requestor.address,
                self.settings.artim_s,
            )
        return dropped

    def _over_limit(self, assoc: Any, host: str) -> str:
        """Take a slot for ``assoc``, or say why not. Dead threads free theirs (a DUL that
        died without EVT_CONN_CLOSE, e.g. pynetdicom's 'Exception in DUL.run()' path)."""
        s = self.settings
        with self._peer_lock:
            self._slots = {k: v for k, v in self._slots.items() if v[0].is_alive()}
            total = len(self._slots)
            mine = sum(1 for _, peer in self._slots.values() if peer == host)
            if total >= s.max_associations:
                return f"{total} associations open (max_associations {s.max_associations})"
            if mine >= s.max_associations_per_peer:
                return (
                    f"{mine} associations open from {host} "
                    f"(max_associations_per_peer {s.max_associations_per_peer})"
                )
            self._slots[id(assoc)] = (assoc, host)
            return ""

    def handle_aborted(self, event: evt.Event) -> None:
        ASSOCIATIONS.labels("aborted").inc()
        self._free_slot(event.assoc)
        self._arm(event.assoc)  # the peer has artim_s to close

    # -- handlers --------------------------------------------------------------------------

    def handle_requested(self, event: evt.Event) -> None:
        """Reject unknown callers at association time (A-ASSOCIATE-RJ, calling AE unknown),
        and callers over the association limits (A-ASSOCIATE-RJ, local limit exceeded)."""
        assoc = event.assoc
        self._arm(assoc)  # from here, artim_s to be accepted (or rejected) and close
        primitive = assoc.requestor.primitive
        calling = primitive.calling_ae_title if primitive is not None else ""
        host = assoc.requestor.address
        if not self.admits(calling, host):
            logger.warning("rejected association from %s@%s: not allowed", calling, host)
            ASSOCIATIONS.labels("rejected").inc()
            # As pynetdicom's own require_calling_aet path does: reject, then stop the DUL
            # (it flushes the A-ASSOCIATE-RJ before the socket is closed).
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            assoc.kill()
            return
        why = self._over_limit(assoc, host)
        if why:
            logger.warning("rejected association from %s@%s: %s", calling, host, why)
            ASSOCIATIONS.labels("over_limit").inc()
            assoc.acse.send_reject(*LOCAL_LIMIT_EXCEEDED)
            assoc.kill()

    def admits(self, calling_aet: str, host: str) -> bool:
        """Whether this caller may associate; the hub's inbox asks its source registry."""
        return caller_allowed(self.settings.allowed_callers, calling_aet, host)

    def handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _adding_to(self, assoc: Any, study_uid: str) -> None:
        with self._adding_lock:
            self._adding.setdefault(id(assoc), set()).add(study_uid)

    def handle_released(self, event: evt.Event) -> None:
        """A-RELEASE: the modality says it has sent what it meant to send. Each study it
        added to, and that no other open association is adding to, is complete after
        ``release_settle_s`` (the forwarder's rule). An aborted association proves nothing:
        its studies wait out the quiet period."""
        self._free_slot(event.assoc)
        self._arm(event.assoc)  # the peer has artim_s to close after our A-RELEASE-RP
        with self._adding_lock:
            studies = self._adding.pop(id(event.assoc), set())
            still_open = set().union(*self._adding.values()) if self._adding else set()
        done = sorted(studies - still_open)
        if done:
            self.state.mark_released(done)
            if self.on_stored is not None:
                self.on_stored(done[0])  # wake the forwarder: its wait changed

    def handle_closed(self, event: evt.Event) -> None:
        with self._adding_lock:
            self._adding.pop(id(event.assoc), None)
        with self._peer_lock:
            self._slots.pop(id(event.assoc), None)
            self._deadlines.pop(id(event.assoc), None)
            self._bad_command_uids.pop(id(event.assoc), None)

    def handle_dimse_recv(self, event: evt.Event) -> None:
        """Keep a C-STORE-RQ whose command UID pynetdicom rejects from aborting the association.

        Runs in the DUL thread just before pynetdicom turns the message into a primitive,
        where such a UID raises ValueError and the association is aborted (module docstring).
        The UID is replaced by a placeholder and the value as sent is remembered by message
        ID; ``handle_store`` refuses the instance (0xC214) and quarantines it."""
        message = event.message
        if not isinstance(message, C_STORE_RQ):
            return
        command = message.command_set
        message_id = command.get("MessageID")
        if not isinstance(message_id, int):
            return  # pynetdicom will abort on that: nothing to answer to
        validate = _config.VALIDATORS["UI"]
        replaced: dict[str, tuple[str, str]] = {}
        for keyword in _COMMAND_UIDS:
            if keyword not in command:
                continue
            elem = command[keyword]
            value = elem.value
            if elem.VM > 1:  # pynetdicom takes the first value too
                value = value[0]
            if not value:
                continue
            ok, why = validate(UID(str(value)))
            if not ok:
                replaced[keyword] = (str(value), why)
                elem.value = UID(f"2.25.{uuid.uuid4().int}")
        if replaced:
            with self._peer_lock:
                self._bad_command_uids.setdefault(id(event.assoc), {})[message_id] = replaced

    def _bad_uids_of(self, assoc: Any, message_id: Any) -> dict[str, tuple[str, str]]:
        with self._peer_lock:
            return dict(self._bad_command_uids.get(id(assoc), {}).get(message_id, {}))

    def handle_dimse_sent(self, event: evt.Event) -> None:
        """Leave our placeholder UIDs out of the C-STORE-RSP (PS3.7: they are optional there,
        and if present must equal the request's, which no valid UID can). Runs after
        pynetdicom built the response message and before it is encoded."""
        message = event.message
        if not isinstance(message, C_STORE_RSP):
            return
        command = message.command_set
        with self._peer_lock:
            per_assoc = self._bad_command_uids.get(id(event.assoc), {})
            replaced = per_assoc.pop(command.get("MessageIDBeingRespondedTo"), None)
        if not replaced:
            return
        for keyword in replaced:
            if keyword in command:
                delattr(command, keyword)
        message._set_command_group_length()  # private in pynetdicom 3.0; checked by a test

    def handle_store(self, event: evt.Event) -> int:
        started = time.perf_counter()
        calling = event.assoc.requestor.ae_title
        assoc_id = event.assoc.native_id
        stream: memoryview | None = None
        try:
            # The dataset as sent, never decoded on this path, and not even copied: a view
            # of pynetdicom's receive buffer (peak memory stays ~1x the largest instance).
            req = cast(C_STORE, event.request)
            stream = cast(BytesIO, req.DataSet).getbuffer()
            bad_uids = self._bad_uids_of(event.assoc, req.MessageID)
            if bad_uids:
                return self._refuse_command_uids(
                    bad_uids, req, str(event.context.transfer_syntax), stream, calling
                )
            prefix = encode_file_meta(
                str(req.AffectedSOPClassUID or ""),
                str(req.AffectedSOPInstanceUID or ""),
                str(event.context.transfer_syntax),
                calling,
            )
            outcome = self.store_parts(
                prefix,
                stream,
                calling_aet=calling,
                command_sop_uid=str(req.AffectedSOPInstanceUID or ""),
                command_sop_class=str(req.AffectedSOPClassUID or ""),
            )
        except Exception:
            logger.exception("assoc %s from %s: unexpected C-STORE failure", assoc_id, calling)
            INSTANCES.labels("error").inc()
            return OUT_OF_RESOURCES_UNEXPECTED
        finally:
            if stream is not None:
                stream.release()  # pynetdicom may close its buffer once we return
        if outcome.status == SUCCESS and outcome.study_uid:
            self._adding_to(event.assoc, outcome.study_uid)
        if outcome.status != SUCCESS:
            logger.warning(
                "assoc %s from %s: C-STORE %s refused 0x%04X: %s",
                assoc_id,
                calling,
                outcome.sop_instance_uid or "?",
                outcome.status,
                outcome.reason,
            )
        STORE_SECONDS.observe(time.perf_counter() - started)
        return outcome.status

    def _refuse_command_uids(
        self,
        bad_uids: dict[str, tuple[str, str]],
        req: C_STORE,
        transfer_syntax: str,
        body: memoryview,
        calling: str,
    ) -> int:
        """0xC214 for a C-STORE-RQ whose command UID pynetdicom could not take: the file
        quarantined carries the UIDs as sent in its meta."""
        sent = {
            kw: bad_uids[kw][0] if kw in bad_uids else str(getattr(req, kw) or "")
            for kw in _COMMAND_UIDS
        }
        prefix = encode_file_meta(
            sent["AffectedSOPClassUID"], sent["AffectedSOPInstanceUID"], transfer_syntax, calling
        )
        study_uid = ""
        try:
            study_uid = read_identity(body, prefix)[1].study_uid
        except IdentityError as exc:
            study_uid = exc.study_uid or ""
        except Exception:
            pass  # undecodable as well: the command UID is reason enough
        reason = "; ".join(
            f"command {kw} {value[:80]!r} ({len(value)} characters): {why}"
            for kw, (value, why) in bad_uids.items()
        )
        outcome = self._refuse(
            bytes(prefix) + bytes(body),
            calling,
            INVALID_UID,
            reason,
            sent["AffectedSOPInstanceUID"],
            study_uid,
        )
        logger.warning("C-STORE from %s refused 0x%04X: %s", calling, outcome.status, reason)
        return outcome.status

    # -- the durable store, usable without a network (the hub ingest and tests call it) ---

    def store(
        self,
        data: bytes,
        *,
        calling_aet: str,
        command_sop_uid: str | None = None,
        command_sop_class: str | None = None,
    ) -> StoreOutcome:
        """Store a whole Part-10 file."""
        return self.store_parts(
            data,
            b"",
            calling_aet=calling_aet,
            command_sop_uid=command_sop_uid,
            command_sop_class=command_sop_class,
        )

    def store_parts(
        self,
        prefix: bytes,
        body: bytes | memoryview,
        *,
        calling_aet: str,
        command_sop_uid: str | None = None,
        command_sop_class: str | None = None,
    ) -> StoreOutcome:
        """Store the Part-10 file ``prefix + body`` without ever joining the two: the
        listener passes preamble + file meta and the dataset as received (~0.5 MB per CT
        slice not copied again)."""
        size = len(prefix) + len(body)
        if self.spool.free_bytes() - size < self.reserve_bytes:
            INSTANCES.labels("disk_reserve").inc()
            return StoreOutcome(OUT_OF_RESOURCES, command_sop_uid or "", "disk reserve reached")
        try:
            ds, ident = read_identity(body, prefix)
        except UndecodableError as exc:
            return self._refuse(
                prefix + body, calling_aet, CANNOT_UNDERSTAND, f"undecodable dataset: {exc}"
            )
        except IdentityError as exc:
            # The hub files by these UIDs and refuses what breaks the UID rules: refusing
            # here, with the reason in `gateway status`, keeps a study the hub would refuse
            # forever out of the forward queue (telerad.core.identity has the rule).
            return self._refuse(
                prefix + body,
                calling_aet,
                MISSING_UIDS if exc.missing else INVALID_UID,
                exc.reason,
                exc.sop_instance_uid,
                exc.study_uid,
            )
        sop_uid, study_uid, series_uid = ident.sop_instance_uid, ident.study_uid, ident.series_uid
        sop_class, tsyntax = ident.sop_class_uid, ident.transfer_syntax
        if command_sop_uid is not None and command_sop_uid.strip() != sop_uid:
            return self._refuse(
                prefix + body,
                calling_aet,
                UID_MISMATCH,
                f"dataset SOP Instance UID differs from command ({command_sop_uid[:80]!r})",
                sop_uid,
                study_uid,
            )
        if command_sop_class is not None and command_sop_class.strip() != sop_class:
            return self._refuse(
                prefix + body,
                calling_aet,
                UID_MISMATCH,
                f"dataset SOP Class UID {sop_class} differs from command "
                f"({command_sop_class[:80]!r})",
                sop_uid,
                study_uid,
            )
        with self._locks[hash(sop_uid) % _LOCK_STRIPES]:
            existing = self.state.get_instance(sop_uid)
            if existing is not None:
                sha = _sha256(prefix, body)
                if existing.sha256 == sha or self._same_dataset(existing, prefix + body):
                    INSTANCES.labels("duplicate").inc()
                    return StoreOutcome(SUCCESS, sop_uid, "identical re-send", study_uid)
                return self._refuse(
                    prefix + body,
                    calling_aet,
                    CONFLICT,
                    "different content under an existing SOP Instance UID",
                    sop_uid,
                    study_uid,
                )
            hashing = self._hasher.submit(_sha256, prefix, body)
            try:
                path = self.spool.store(study_uid, sop_uid, (prefix, body))
            except OSError as exc:
                INSTANCES.labels("write_error").inc()
                return StoreOutcome(OUT_OF_RESOURCES, sop_uid, f"write failed: {exc}")
            finally:
                sha = hashing.result()
            priority = evaluate_priority(self.settings.priority_rules, ds, calling_aet)
            rec = InstanceRecord(
                sop_instance_uid=sop_uid,
                sop_class_uid=sop_class,
                study_uid=study_uid,
                series_uid=series_uid,
                transfer_syntax=tsyntax,
                path=self.spool.relative(path),
                size=size,
                sha256=sha,
                calling_aet=calling_aet,
                received_at=time.time(),
            )
            info = StudyInfo(
                study_uid=study_uid,
                modality=ident.modality,
                body_part=ident.body_part,
                calling_aet=calling_aet,
                priority=int(priority),
            )
            if not self.state.record_instance(rec, info, self.destinations):
                # Under this UID's lock nobody else can have recorded it: never answer
                # Success for an instance whose row we cannot vouch for.
                held = self.state.get_instance(sop_uid)
                if held is None or held.sha256 != sha:
                    logger.error("instance %s was not recorded; refusing", sop_uid)
                    return StoreOutcome(OUT_OF_RESOURCES_UNEXPECTED, sop_uid, "not recorded")
        INSTANCES.labels("stored").inc()
        BYTES.inc(size)
        if self.on_stored is not None:
            self.on_stored(study_uid)
        return StoreOutcome(SUCCESS, sop_uid, study_uid=study_uid)

    def _same_dataset(self, existing: InstanceRecord, data: bytes) -> bool:
        """Rare path: the file differs, but maybe only in its file meta (another sender's
        transfer of the same dataset, a pynetdicom upgrade): compare the datasets."""
        try:
            held = self.spool.absolute(existing.path).read_bytes()
        except OSError:
            return False  # removed after commit and retention: cannot prove it is the same
        return dataset_sha256(held) == dataset_sha256(data)

    def _refuse(
        self,
        data: bytes,
        calling_aet: str,
        status: int,
        reason: str,
        sop_uid: str = "",
        study_uid: str = "",
    ) -> StoreOutcome:
        INSTANCES.labels(f"refused_{status:04x}").inc()
        try:
            path = self.spool.quarantine(data, reason)
            self.state.record_quarantine(
                path=self.spool.relative(path),
                reason=reason,
                status=status,
                calling_aet=calling_aet,
                sop_instance_uid=sop_uid,
                study_uid=study_uid,
            )
        except OSError as exc:
            logger.error("could not quarantine a refused instance: %s", exc)
            return StoreOutcome(OUT_OF_RESOURCES, sop_uid, f"{reason}; quarantine failed")
        return StoreOutcome(status, sop_uid, reason)
