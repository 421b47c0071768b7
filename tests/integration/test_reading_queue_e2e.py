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
