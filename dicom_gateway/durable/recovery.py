"""Start-up recovery: files and state back into agreement after any crash.

Recovery makes ``kill -9`` at any moment safe: temporaries are removed (never acknowledged),
spool files without a row are re-indexed (their C-STORE was never answered, so the modality
re-sends and the re-send is idempotent), outbox bundles without a row are removed and bundle
rows without a file send their instances back to pending.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

from dicom_gateway.durable.priority_rules import evaluate as evaluate_priority
from dicom_gateway.durable.settings import ListenerSettings
from dicom_gateway.durable.spool import Spool
from dicom_gateway.durable.state import BUNDLED, PENDING, InstanceRecord, StateDB, StudyInfo
from telerad.core.identity import read_identity

logger = logging.getLogger(__name__)


def recover(
    spool: Spool, state: StateDB, settings: ListenerSettings, destinations: Sequence[str]
) -> dict[str, int]:
    """Bring files and state back into agreement after any crash; safe to run every start.

    Re-indexed instances are owed to ``destinations``: the same list the listener records.
    """
    report = {"temporaries": spool.clean_temporaries(), "reindexed": 0, "orphan_bundles": 0}
    known = state.known_paths()
    for path in spool.spooled_files():
        rel = spool.relative(path)
        if rel in known:
            continue
        data = path.read_bytes()
        try:
            ds, ident = read_identity(data)
            # The listener wrote the calling AE into the file meta: AE-based priority rules
            # apply again after a power cut.
            calling = str(ds.file_meta.get("SourceApplicationEntityTitle", "") or "").strip()
            rec = InstanceRecord(
                sop_instance_uid=ident.sop_instance_uid,
                sop_class_uid=ident.sop_class_uid,
                study_uid=ident.study_uid,
                series_uid=ident.series_uid,
                transfer_syntax=ident.transfer_syntax,
                path=rel,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                calling_aet=calling or "(recovered)",
                received_at=path.stat().st_mtime,
            )
        except Exception as exc:  # written by us, so this is disk corruption: keep it aside
            logger.error("spool file %s unreadable at recovery: %s", rel, exc)
            spool.quarantine(data, "unreadable spool file at recovery")
            path.unlink()
            continue
        prio = evaluate_priority(settings.priority_rules, ds, calling)
        info = StudyInfo(rec.study_uid, ident.modality, ident.body_part, calling, int(prio))
        if state.record_instance(rec, info, list(destinations)):
            report["reindexed"] += 1
    bundle_paths = {r[0] for r in state.query("SELECT path FROM bundles")}
    for path in spool.outbox_dir.iterdir():
        if spool.relative(path) not in bundle_paths:
            path.unlink(missing_ok=True)
            report["orphan_bundles"] += 1
    for bid, rel in state.query("SELECT id, path FROM bundles"):
        if not spool.absolute(rel).exists():
            with state.transaction() as db:
                db.execute(
                    "UPDATE deliveries SET state = ?, bundle_id = NULL WHERE bundle_id = ? "
                    "AND state = ?",
                    (PENDING, bid, BUNDLED),
                )
                db.execute("DELETE FROM bundles WHERE id = ?", (bid,))
    if any(report.values()):
        logger.warning("recovery: %s", report)
    return report
