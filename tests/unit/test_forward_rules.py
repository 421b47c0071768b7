"""The forwarder's rules: completeness from A-RELEASE, pre-emption by every kind of work, one
unit of work per step, and the refusal budget that keeps a poison study from blocking."""

from __future__ import annotations

import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE

from dicom_gateway.durable.forward import ForwardWorker, StudyRefused, StudyWork, complete_in
from dicom_gateway.durable.scp import Listener
from dicom_gateway.durable.spool import Spool
from dicom_gateway.durable.state import FAILED, PENDING, UPLOADED, StateDB
from dicom_gateway.station.service import gateway_status
from dicom_gateway.station.settings import GatewaySettings
from telerad.core.priority import Priority


def _ct(study_uid: str) -> bytes:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class _Recorder:
    """A destination that records what it was asked to do (the scheduling is under test)."""

    destination = "hub"

    def __init__(self, state: StateDB) -> None:
        self.state = state
        self.calls: list[tuple[str, str]] = []
        self.refuse: set[str] = set()

    def send(self, study: StudyWork, preempt: Any) -> bool:
        self.calls.append(("send", study.study_uid))
        if study.study_uid in self.refuse:
            raise StudyRefused("manifest refused: HTTP 422 bad UID")
        with self.state.transaction() as db:  # one instance per call: a 'bundle'
            db.execute(
                "UPDATE deliveries SET state = ? WHERE rowid = (SELECT rowid FROM deliveries "
                "WHERE study_uid = ? AND state = ? LIMIT 1)",
                (UPLOADED, study.study_uid, PENDING),
            )
        return True

    def commit(self, study: StudyWork) -> None:
        self.calls.append(("commit", study.study_uid))
        with self.state.transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = 'committed' WHERE study_uid = ?",
                (study.study_uid,),
            )


def _released_long_ago(state: StateDB, study_uid: str) -> None:
    """As if the last instance came 10 s ago and its association was released 9 s ago."""
    now = time.time()
    with state.transaction() as db:
        db.execute(
            "UPDATE studies SET last_received = ?, released_at = ? WHERE study_uid = ?",
            (now - 10, now - 9, study_uid),
        )


@pytest.fixture
def gw(tmp_path: Path) -> tuple[StateDB, Listener]:
    settings = GatewaySettings(data_dir=tmp_path, disk_reserve_mb=1)
    state = StateDB(tmp_path / "gateway.sqlite3")
    return state, Listener(settings, Spool(tmp_path), state, ["hub"])


def test_complete_after_release_settle_or_quiet_period() -> None:
    rule = {"quiet_period_s": 60.0, "release_settle_s": 5.0}
    assert complete_in(100.0, 100.0, None, **rule) == 60.0  # open association: quiet period
    assert complete_in(103.0, 100.0, 101.0, **rule) == 3.0  # released at 101: complete at 106
    # Released before its last instance arrived (another association added later): no.
    assert complete_in(103.0, 102.0, 101.0, **rule) == 59.0


def test_released_association_completes_its_study_in_seconds(
    gw: tuple[StateDB, Listener],
) -> None:
    """A real association over TCP: instances stored, A-RELEASE, and the study is complete
    after the settle time instead of the 60 s quiet period; one still open holds it."""
    state, listener = gw
    listener.settings.dicom_port = 0
    listener.settings.dicom_host = "127.0.0.1"
    listener.start()
    try:
        study, shared = generate_uid(), generate_uid()
        ae = AE(ae_title="CT01")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        first = ae.associate("127.0.0.1", listener.port)
        second = ae.associate("127.0.0.1", listener.port)
        assert first.is_established and second.is_established
        for data in (_ct(study), _ct(study), _ct(shared)):
            status = first.send_c_store(dcmread(BytesIO(data)))
            assert status.Status == 0
        assert second.send_c_store(dcmread(BytesIO(_ct(shared)))).Status == 0
        first.release()
        deadline = time.time() + 10
        while (
            time.time() < deadline
            and state.scalar("SELECT released_at FROM studies WHERE study_uid = ?", (study,))
            is None
        ):
            time.sleep(0.02)
        released = state.scalar("SELECT released_at FROM studies WHERE study_uid = ?", (study,))
        assert released is not None
        # The shared study is still being added to by the open association: not released.
        assert (
            state.scalar("SELECT released_at FROM studies WHERE study_uid = ?", (shared,)) is None
        )
        with state.transaction() as db:
            db.execute("UPDATE deliveries SET state = ?", (UPLOADED,))
        worker = ForwardWorker(_Recorder(state), state, quiet_period_s=60, release_settle_s=5)
        work, wait = worker.next_work(released + 1)
        assert work is None and wait == pytest.approx(4, abs=0.1)
        work, _ = worker.next_work(released + 5.1)
        assert work is not None and work.study_uid == study
        second.release()
        deadline = time.time() + 10
        while (
            time.time() < deadline
            and state.scalar("SELECT released_at FROM studies WHERE study_uid = ?", (shared,))
            is None
        ):
            time.sleep(0.02)
        assert state.scalar("SELECT released_at FROM studies WHERE study_uid = ?", (shared,))
    finally:
        listener.stop()


def test_stat_ready_to_commit_preempts_a_routine_send(gw: tuple[StateDB, Listener]) -> None:
    """Pre-emption covers a more urgent study that only needs its commit, not only one with
    bytes to send (the 113 s STAT waited behind every CT bundle for its commit)."""
    state, listener = gw
    routine, stat = generate_uid(), generate_uid()
    for _ in range(3):
        listener.store(_ct(routine), calling_aet="CT01")
    listener.store(_ct(stat), calling_aet="CR01")
    state.set_priority(stat, int(Priority.STAT))
    with state.transaction() as db:
        db.execute("UPDATE deliveries SET state = ? WHERE study_uid = ?", (UPLOADED, stat))
    worker = ForwardWorker(_Recorder(state), state, quiet_period_s=60, release_settle_s=5)
    assert not worker.more_urgent_waiting(int(Priority.ROUTINE))  # STAT still receiving
    _released_long_ago(state, stat)
    worker._preempt_checked = (0.0, -1, False)
    assert worker.more_urgent_waiting(int(Priority.ROUTINE))
    work, _ = worker.next_work(time.time())
    assert work is not None and work.study_uid == stat and work.to_send == 0


def test_one_unit_per_step_and_the_stat_goes_between_routine_bundles(
    gw: tuple[StateDB, Listener],
) -> None:
    state, listener = gw
    routine, stat = generate_uid(), generate_uid()
    for _ in range(3):
        listener.store(_ct(routine), calling_aet="CT01")
    recorder = _Recorder(state)
    worker = ForwardWorker(recorder, state, quiet_period_s=60, release_settle_s=5)
    worker.step()
    listener.store(_ct(stat), calling_aet="CR01")  # arrives while the CT is crossing
    state.set_priority(stat, int(Priority.STAT))
    state.mark_released([stat], at=time.time() + 0.001)
    worker.step()  # the STAT's bundle, before the CT's next one
    _released_long_ago(state, stat)
    worker.step()  # the STAT's commit, still before the CT's next bundle
    worker.step()
    assert recorder.calls == [
        ("send", routine),
        ("send", stat),
        ("commit", stat),
        ("send", routine),
    ]


def test_a_refused_study_steps_aside_and_the_others_flow(gw: tuple[StateDB, Listener]) -> None:
    state, listener = gw
    poison, good = generate_uid(), generate_uid()
    listener.store(_ct(poison), calling_aet="CT01")
    time.sleep(0.01)
    listener.store(_ct(good), calling_aet="CT01")
    recorder = _Recorder(state)
    recorder.refuse.add(poison)
    worker = ForwardWorker(
        recorder, state, quiet_period_s=60, refusal_budget=3, retry_base_s=0.001, retry_max_s=0.01
    )
    for _ in range(3):
        with pytest.raises(StudyRefused):
            worker.step()
        worker._refused(StudyRefused("manifest refused: HTTP 422 bad UID"))
        time.sleep(0.02)  # past the study's own back-off
    held = state.attention_list()
    assert [(a["study_uid"], a["refusals"]) for a in held] == [(poison, 3)]
    assert held[0]["held_at"] is not None and "HTTP 422" in held[0]["reason"]
    # Held aside: the next study goes, the poison one is not tried again.
    recorder.calls.clear()
    worker.step()
    assert recorder.calls == [("send", good)]
    status = gateway_status(state, 60)
    by_uid = {s["study_uid"]: s for s in status["studies"]}
    assert by_uid[poison]["state"] == "needs attention"
    assert "HTTP 422" in by_uid[poison]["attention"]
    assert _attention_metric() == 1
    # `telerad gateway retry` after a fix: it is sent again.
    assert state.retry_study(poison) == 1
    recorder.refuse.clear()
    assert poison in [w.study_uid for w in worker.candidates()]
    worker.next_work(time.time())
    assert _attention_metric() == 0


def _attention_metric() -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("telerad_forward_attention_studies", {"destination": "hub"})


def test_retry_also_resends_instances_refused_for_good(gw: tuple[StateDB, Listener]) -> None:
    state, listener = gw
    study = generate_uid()
    listener.store(_ct(study), calling_aet="CT01")
    with state.transaction() as db:
        db.execute("UPDATE deliveries SET state = ?, last_status = 'conflict'", (FAILED,))
    assert state.retry_study(study) == 1
    assert state.scalar("SELECT state FROM deliveries") == PENDING
    with pytest.raises(Exception, match="no study"):
        state.retry_study("1.2.3")
