"""Modality to worklist: a STAT CT pushed with DCMTK's storescu into a station gateway reaches
the hub, is assigned by the running hub's queue worker to the one radiologist who may read
it, is escalated to a webhook, and shows in the hub's metrics -- all real processes/servers."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from pydicom import dcmread

from sample_studies.generate import make_ct_series
from tests.support.peers import storescu
from tests.support.telerad_procs import InProcessGateway, InProcessHub, wait_until

ROSTER = """
radiologists:
  - key: dr.cr
    modalities: [CR]
    licences: [VN]
    languages: [vi]
    shifts: ["daily 00:00-24:00"]
  - key: dr.ct
    modalities: [CT, CR]
    licences: [VN-HN]
    languages: [vi]
    shifts: ["daily 00:00-24:00"]
  - key: dr.kh
    modalities: [CT, CR]
    licences: [KH]
    languages: [km]
    shifts: ["daily 00:00-24:00"]
stations:
  - name: tram-hn
    jurisdiction: VN-HN
    language: vi
"""


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        _Hook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    _Hook.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


@pytest.mark.needs_dcmtk
def test_stat_ct_from_modality_to_assigned_and_escalated(tmp_path: Path, webhook: str) -> None:
    files = make_ct_series(tmp_path / "ct", 4, seed=5, matrix=64, priority="STAT")
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    roster = tmp_path / "roster.yaml"
    roster.write_text(ROSTER)
    hub_settings = {
        "roster_file": roster,
        "escalation_webhooks": [webhook],
        "queue_interval_s": 0.5,
        # escalate STAT at once, so the test need not wait 20 minutes
        "queue": {"escalate_minutes": {"stat": 30, "urgent": 60, "routine": 240}},
    }
    with InProcessHub(tmp_path / "hub", **hub_settings) as hub:
        token = hub.hub.ingest.rotate_token("tram-hn")  # the roster created the station
        with InProcessGateway(tmp_path / "gw", hub_url=hub.url, token=token) as gw:
            res = storescu([tmp_path / "ct"], "127.0.0.1", gw.port, gw.aet, "CT01")
            assert res.returncode == 0, res.stderr

            def assigned() -> Any:
                for st in hub.hub.worklist.studies():
                    if st.study_uid == study_uid and st.assignee:
                        return st
                return None

            st = wait_until(assigned, 90, "the STAT CT assigned")
        assert (st.priority, st.assignee, st.state) == (0, "dr.ct", "assigned")
        assert st.jurisdiction == "VN-HN" and st.instance_count == len(files)
        assert st.deadline == pytest.approx(st.received_at + 30 * 60)
        events = [e.kind for e in hub.hub.worklist.history(study_uid)]
        assert events[:3] == ["received", "ready", "assigned"] or events[:3] == [
            "received",
            "ready",
            "escalated",
        ]
        wait_until(lambda: _Hook.received, 30, "escalation webhook delivered")
        (payload,) = _Hook.received
        assert payload["study_uid"] == study_uid and payload["priority"] == "stat"
        ds = dcmread(files[0], stop_before_pixels=True)
        assert str(ds.PatientID) not in json.dumps(payload)
        metrics = httpx.get(f"{hub.url}/metrics").text
        assert 'telerad_worklist_open_studies{priority="stat",state="assigned"} 1.0' in metrics
        assert 'telerad_worklist_decisions_total{kind="escalate"}' in metrics


def _pages(hub: InProcessHub) -> list[tuple[int, float | None]]:
    from sqlalchemy import select

    from reading_queue.models import WebhookDelivery

    with hub.ingest.session() as s:
        rows = s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id))
        return [(d.attempts, d.delivered_at) for d in rows]


class _HungPager:
    """A webhook receiver that accepts connections and never answers."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.connections: list[Any] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/page"

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections.append(conn)  # read nothing, answer nothing

    def close(self) -> None:
        self._stop.set()
        for conn in self.connections:
            conn.close()
        self.sock.close()


@pytest.mark.needs_dcmtk
def test_a_pager_that_never_answers_never_delays_the_next_stat(tmp_path: Path) -> None:
    """STAT pages go to a receiver that hangs: the STATs are still assigned, one after the
    other, by rounds that go on while the page's request is still waiting."""
    pager = _HungPager()
    roster = tmp_path / "roster.yaml"
    roster.write_text(ROSTER)
    settings = {"roster_file": roster, "stat_webhooks": [pager.url], "queue_interval_s": 0.5}
    try:
        with InProcessHub(tmp_path / "hub", **settings) as hub:
            # Pages wait up to 5 s by default; here longer than the whole test, so that the
            # first page is provably still in flight when the second STAT is assigned.
            hub.hub.queue.webhooks.timeout_s = 600
            token = hub.hub.ingest.rotate_token("tram-hn")
            with InProcessGateway(tmp_path / "gw", hub_url=hub.url, token=token) as gw:

                def assigned(uid: str) -> Any:
                    for st in hub.hub.worklist.studies():
                        if st.study_uid == uid and st.assignee:
                            return st
                    return None

                firsts = make_ct_series(tmp_path / "a", 2, seed=6, matrix=64, priority="STAT")
                assert storescu(firsts, "127.0.0.1", gw.port, gw.aet, "CT01").returncode == 0
                first = str(dcmread(firsts[0], stop_before_pixels=True).StudyInstanceUID)
                wait_until(lambda: assigned(first), 90, "the first STAT assigned")
                wait_until(lambda: pager.connections, 30, "the page sent to the hung pager")
                rounds = hub.hub.queue.rounds
                seconds = make_ct_series(tmp_path / "b", 2, seed=7, matrix=64, priority="STAT")
                assert storescu(seconds, "127.0.0.1", gw.port, gw.aet, "CT01").returncode == 0
                second = str(dcmread(seconds[0], stop_before_pixels=True).StudyInstanceUID)
                st = wait_until(lambda: assigned(second), 90, "the second STAT assigned")
                assert st.priority == 0
                # Rounds went on while the pager still held the first page's request: it has
                # neither been delivered nor failed (a round delivering it would still wait).
                assert hub.hub.queue.rounds > rounds
                assert _pages(hub)[0] == (0, None)
                assert hub.hub.queue.webhooks.is_alive()
    finally:
        pager.close()
