"""Gateway core without sockets: priority rules, settings, scheduling, retention, recovery."""

from __future__ import annotations

import hashlib
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from dicom_gateway.durable.forward import ForwardWorker, StudyWork
from dicom_gateway.durable.priority_rules import PriorityRule, default_priority_rules, evaluate
from dicom_gateway.durable.recovery import recover
from dicom_gateway.durable.scp import SUCCESS, Listener
from dicom_gateway.durable.spool import Spool
from dicom_gateway.durable.state import COMMITTED, PENDING, SCHEMA_VERSION, StateDB
from dicom_gateway.station.service import Janitor, gateway_status
from dicom_gateway.station.settings import GatewaySettings
from telerad.core.priority import Priority


def _ct(study_uid: str | None = None, **tags: str) -> bytes:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if study_uid:
        ds.StudyInstanceUID = study_uid
    for k, v in tags.items():
        setattr(ds, k, v)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


Env = tuple[GatewaySettings, Spool, StateDB, Listener]


class _Recorder:
    destination = "hub"

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.committed: list[str] = []

    def send(self, study: StudyWork, preempt: object) -> bool:
        self.sent.append(study.study_uid)
        return True

    def commit(self, study: StudyWork) -> None:
        self.committed.append(study.study_uid)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    settings = GatewaySettings(data_dir=tmp_path, disk_reserve_mb=1, quiet_period_s=60)
    spool = Spool(tmp_path)
    state = StateDB(tmp_path / "gateway.sqlite3")
    return settings, spool, state, Listener(settings, spool, state, ["hub"])


# -- priority rules ---------------------------------------------------------------------------


def test_priority_rules_most_urgent_match_wins() -> None:
    ds = Dataset()
    ds.Modality = "CT"
    ds.StudyDescription = "CT head TRAUMA protocol"
    ds.RequestedProcedurePriority = "MEDIUM"
    rules = default_priority_rules()
    assert evaluate(rules, ds, "CT01") == Priority.STAT  # *TRAUMA* beats MEDIUM (urgent)
    ds.StudyDescription = "CT abdomen"
    assert evaluate(rules, ds, "CT01") == Priority.URGENT
    del ds.RequestedProcedurePriority
    assert evaluate(rules, ds, "CT01") == Priority.ROUTINE


def test_priority_rule_needs_every_key_and_knows_calling_aet() -> None:
    rules = [PriorityRule(match={"calling_aet": "ER_*", "Modality": ["CT", "MR"]}, priority="stat")]
    ds = Dataset()
    ds.Modality = "CT"
    assert evaluate(rules, ds, "ER_CT1") == Priority.STAT
    assert evaluate(rules, ds, "WARD_CR") == Priority.ROUTINE
    ds.Modality = "CR"
    assert evaluate(rules, ds, "ER_CT1") == Priority.ROUTINE


def test_manual_priority_sticks_against_later_instances(env: Env) -> None:
    _, _, state, listener = env
    study = generate_uid()
    assert listener.store(_ct(study), calling_aet="CT01").status == SUCCESS
    state.set_priority(study, int(Priority.STAT))
    assert listener.store(_ct(study), calling_aet="CT01").status == SUCCESS
    assert state.scalar("SELECT priority FROM studies") == Priority.STAT
    state.set_priority(study, int(Priority.ROUTINE))
    listener.store(_ct(study, RequestedProcedurePriority="STAT"), calling_aet="CT01")
    assert state.scalar("SELECT priority FROM studies") == Priority.ROUTINE


# -- settings -----------------------------------------------------------------------------------


def test_settings_precedence_flag_env_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "telerad.toml"
    cfg.write_text(
        '[gateway]\naet = "FROM_TOML"\ndicom_port = 1111\nquiet_period_s = 30\n'
        'allowed_callers = ["CT01@10.0.0.5"]\n'
        '[[gateway.destinations]]\nname = "pacs"\naet = "PACS"\nhost = "10.0.0.9"\nport = 104\n'
        "[hub]\nhttp_port = 9000\n"
    )
    monkeypatch.setenv("TELERAD_CONFIG", str(cfg))
    monkeypatch.setenv("TELERAD_DICOM_PORT", "2222")
    s = GatewaySettings(quiet_period_s=5)
    assert s.aet == "FROM_TOML"  # file
    assert s.dicom_port == 2222  # env beats file
    assert s.quiet_period_s == 5  # flag beats both
    assert s.allowed_callers == ["CT01@10.0.0.5"]
    assert s.destinations[0].aet == "PACS"
    with pytest.raises(ValueError, match="AE titles"):
        GatewaySettings(aet="A_TITLE_LONGER_THAN_16")


# -- scheduling -----------------------------------------------------------------------------------


def test_forward_order_is_priority_then_age_and_waits_for_quiet(env: Env) -> None:
    _, _, state, listener = env
    routine_old, routine_new, stat = generate_uid(), generate_uid(), generate_uid()
    for study in (routine_old, routine_new, stat):
        listener.store(_ct(study), calling_aet="CT01")
        time.sleep(0.01)
    state.set_priority(stat, int(Priority.STAT))
    recorder = _Recorder()
    worker = ForwardWorker(recorder, state, quiet_period_s=60)
    assert [w.study_uid for w in worker.candidates()] == [stat, routine_old, routine_new]
    assert worker.more_urgent_waiting(int(Priority.ROUTINE))
    assert not worker.more_urgent_waiting(int(Priority.STAT))
    work, _ = worker.next_work(time.time())
    assert work is not None and work.study_uid == stat
    # Everything uploaded but the study still receiving: no commit before the quiet period.
    with state.transaction() as db:
        db.execute("UPDATE deliveries SET state = 'uploaded'")
    work, wait = worker.next_work(time.time())
    assert work is None and 0 < wait <= 60
    work, _ = worker.next_work(time.time() + 61)
    assert work is not None and work.study_uid == stat and work.to_send == 0


# -- retention ------------------------------------------------------------------------------------


class _TightSpool(Spool):
    """A spool on a 'full' disk: free space is what the test says."""

    free = 10**12

    def free_bytes(self) -> int:
        return self.free


def test_retention_never_deletes_before_commit(tmp_path: Path) -> None:
    spool = _TightSpool(tmp_path)
    state = StateDB(tmp_path / "gateway.sqlite3")
    settings = GatewaySettings(data_dir=tmp_path, disk_reserve_mb=1)
    listener = Listener(settings, spool, state, ["hub", "pacs"])
    study = generate_uid()
    for _ in range(3):
        listener.store(_ct(study), calling_aet="CT01")
    paths = [spool.absolute(r[0]) for r in state.query("SELECT path FROM instances")]
    janitor = Janitor(spool, state, retention_s=7 * 86400, reserve_bytes=1024**2)
    later = time.time() + 8 * 86400
    assert janitor.sweep(later) == 0  # nothing committed anywhere
    with state.transaction() as db:
        db.execute("UPDATE deliveries SET state = ? WHERE destination = 'hub'", (COMMITTED,))
    spool.free = 0  # disk pressure: still nothing, the PACS has not committed
    assert janitor.sweep(time.time()) == 0
    with state.transaction() as db:
        db.execute("UPDATE deliveries SET state = ?", (COMMITTED,))
    spool.free = 10**12
    assert janitor.sweep(time.time()) == 0  # committed but within retention
    assert all(p.exists() for p in paths)
    spool.free = 0
    assert janitor.sweep(time.time()) == 3  # disk pressure: committed files may go early
    assert not any(p.exists() for p in paths)
    assert state.scalar("SELECT count(*) FROM instances WHERE deleted_at IS NULL") == 0


# -- recovery -------------------------------------------------------------------------------------


def test_recovery_reindexes_unrecorded_files_and_removes_partials(env: Env) -> None:
    settings, spool, state, listener = env
    study = generate_uid()
    listener.store(_ct(study), calling_aet="CT01")
    # A crash after the rename but before the database commit leaves an unrecorded file ...
    orphan = _ct(study)
    orphan_uid = str(dcmread(BytesIO(orphan)).SOPInstanceUID)
    spool.store(study, orphan_uid, orphan)
    # ... a crash mid-write leaves a temporary, and one mid-pack an unrecorded bundle.
    (spool.tmp_dir / "abc.part").write_bytes(b"half a file")
    (spool.outbox_dir / "bundle-x.tlb").write_bytes(b"half a bundle")
    report = recover(spool, state, settings, ["hub"])
    assert report == {"temporaries": 1, "reindexed": 1, "orphan_bundles": 1}
    rec = state.get_instance(orphan_uid)
    assert rec is not None and rec.sha256 == hashlib.sha256(orphan).hexdigest()
    assert (
        state.scalar(
            "SELECT count(*) FROM deliveries WHERE sop_instance_uid = ? AND state = ?",
            (orphan_uid, PENDING),
        )
        == 1
    )
    assert not list(spool.tmp_dir.iterdir()) and not list(spool.outbox_dir.iterdir())
    # The modality re-sends the unacknowledged instance: idempotent, not a conflict.
    assert listener.store(orphan, calling_aet="CT01").status == SUCCESS
    assert state.scalar("SELECT instance_count FROM studies WHERE study_uid = ?", (study,)) == 2
    assert recover(spool, state, settings, ["hub"]) == {
        "temporaries": 0,
        "reindexed": 0,
        "orphan_bundles": 0,
    }


def test_status_reports_receiving_then_queued(env: Env) -> None:
    _, _, state, listener = env
    study = generate_uid()
    listener.store(_ct(study), calling_aet="CT01")
    now = time.time()
    assert gateway_status(state, 60, now)["studies"][0]["state"] == "receiving"
    status = gateway_status(state, 60, now + 61)
    assert status["studies"][0]["state"] == "queued"
    assert status["backlog_bytes"] > 0
    listener.store(_ct(study), calling_aet="CT01")
    with state.transaction() as db:
        db.execute("UPDATE deliveries SET state = 'uploaded' WHERE rowid = 1")
    status = gateway_status(state, 60, time.time() + 61)
    assert status["studies"][0]["state"] == "sending"
    assert status["studies"][0]["sent_percent"] == 50.0
    with state.transaction() as db:
        db.execute("UPDATE deliveries SET state = ?", (COMMITTED,))
    status = gateway_status(state, 60, now + 61)
    assert status["studies"][0]["state"] == "committed"
    assert status["studies"][0]["sent_percent"] == 100.0 and status["backlog_bytes"] == 0


# -- the C-STORE fast path ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),
        ("1.2.840.10008.5.1.4.1.1.1", "1.2.826.0.1.3680043.8.498.12345", "1.2.840.10008.1.2"),
        ("1.3.6.1.4.1.9590.100.1.2.999", "2.25.1234567890123456789", "1.2.840.10008.1.2.4.80"),
    ],
)
def test_hand_encoded_file_meta_equals_pydicom(
    sop_class: str, sop_instance: str, syntax: str
) -> None:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    from dicom_gateway.durable.scp import encode_file_meta

    meta = DicomBytesIO()
    write_file_meta_info(
        meta,
        create_file_meta(
            sop_class_uid=UID(sop_class),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(syntax),
        ),
        enforce_standard=True,
    )
    expected = b"\x00" * 128 + b"DICM" + meta.getvalue()
    assert encode_file_meta(sop_class, sop_instance, syntax) == expected


def test_pynetdicom_still_has_the_poll_delay_we_tune() -> None:
    """``Listener.handle_established`` shortens a private pynetdicom attribute; if a new
    pynetdicom renames it the tuning silently stops, so fail here instead."""
    from pynetdicom.dul import DULServiceProvider

    dul = DULServiceProvider.__new__(DULServiceProvider)
    DULServiceProvider.__init__(dul, None)  # type: ignore[arg-type]
    assert dul._run_loop_delay == 0.001


def test_spool_recreates_a_study_folder_removed_by_hand(tmp_path: Path) -> None:
    import shutil

    spool = Spool(tmp_path)
    first = spool.store("1.2.3", "1.2.3.1", b"first")
    shutil.rmtree(first.parent)
    second = spool.store("1.2.3", "1.2.3.2", [b"sec", memoryview(b"ond")])
    assert second.read_bytes() == b"second"
    assert not list(spool.tmp_dir.iterdir())


def test_state_database_from_the_first_schema_is_migrated(tmp_path: Path) -> None:
    """A station upgraded with unsent studies in its spool keeps them, and new instances are
    recorded (the first schema had a NOT NULL column the code no longer fills)."""
    import sqlite3

    db_path = tmp_path / "gateway.sqlite3"
    old = sqlite3.connect(db_path)
    old.executescript(
        """
        CREATE TABLE instances (sop_instance_uid TEXT PRIMARY KEY, sop_class_uid TEXT NOT NULL,
            study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, transfer_syntax TEXT NOT NULL,
            path TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
            dataset_sha256 TEXT NOT NULL, calling_aet TEXT NOT NULL, received_at REAL NOT NULL,
            deleted_at REAL);
        CREATE TABLE deliveries (destination TEXT NOT NULL, sop_instance_uid TEXT NOT NULL,
            study_uid TEXT NOT NULL, state TEXT NOT NULL, bundle_id INTEGER,
            attempts INTEGER NOT NULL DEFAULT 0, last_status TEXT NOT NULL DEFAULT '',
            updated_at REAL NOT NULL, PRIMARY KEY (destination, sop_instance_uid));
        INSERT INTO instances VALUES ('1.2.3.1', '1.2.840.10008.5.1.4.1.1.2', '1.2.3', '1.2.3.0',
            '1.2.840.10008.1.2.1', 'spool/1.2.3/1.2.3.1.dcm', 10, 'aa', 'bb', 'CT01', 1.0, NULL);
        INSERT INTO deliveries VALUES ('hub', '1.2.3.1', '1.2.3', 'pending', NULL, 0, '', 1.0);
        """
    )
    old.commit()
    old.close()
    state = StateDB(db_path)
    assert state.scalar("PRAGMA user_version") == SCHEMA_VERSION
    assert state.scalar("SELECT released_at FROM studies") is None  # v2 column, no rows
    assert state.get_instance("1.2.3.1") is not None
    assert state.scalar("SELECT next_attempt FROM deliveries") is None
    settings = GatewaySettings(data_dir=tmp_path, disk_reserve_mb=1)
    listener = Listener(settings, Spool(tmp_path), state, ["hub"])
    assert listener.store(_ct(), calling_aet="CT01").status == SUCCESS
    assert state.scalar("SELECT count(*) FROM instances") == 2
    assert state.scalar("SELECT count(*) FROM deliveries WHERE state = 'pending'") == 2
    state.close()
    assert StateDB(db_path).scalar("SELECT count(*) FROM instances") == 2  # idempotent


def test_pynetdicom_reactor_still_sleeps_through_its_time_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``_ShortSleeps`` caps the association reactor's hard-coded ``time.sleep(0.001)`` by
    replacing the ``time`` its module sees; if pynetdicom changes how it waits, the tuning
    silently stops: fail here instead."""
    import inspect

    import pynetdicom.association as association

    from dicom_gateway.durable.scp import ASSOCIATION_POLL_S, _install_negotiation

    assert "time.sleep(0.001)" in inspect.getsource(association.Association._run_reactor)
    _install_negotiation()
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    association.time.sleep(0.001)
    association.time.sleep(0.0001)
    assert slept == [ASSOCIATION_POLL_S, 0.0001] and ASSOCIATION_POLL_S < 0.001
    assert association.time.monotonic() > 0  # everything else passes through
