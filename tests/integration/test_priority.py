"""STAT before routine: a STAT study arriving during a routine backlog is sent next,
pre-empting the routine upload between chunks; ``telerad gateway priority`` re-orders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sample_studies.generate import make_cr, make_ct_series
from tests.support.faultproxy import FaultProxy
from tests.support.peers import storescu
from tests.support.telerad_procs import InProcessGateway, InProcessHub, wait_until


def _held(hub: InProcessHub) -> dict[str, int]:
    """Instances the hub holds per study, committed or not."""
    return {
        s.study_uid: len(hub.ingest.study_instances(s.study_uid, committed_only=False))
        for s in hub.ingest.studies()
    }


@pytest.mark.needs_dcmtk
def test_stat_preempts_routine_backlog(tmp_path: Path) -> None:
    routine = make_ct_series(tmp_path / "routine", 40, seed=11)  # ~21 MB raw
    stat_cr = make_cr(tmp_path / "stat", seed=12, priority="STAT")
    routine_uid = _study_uid(routine[0])
    stat_uid = _study_uid(stat_cr)
    with InProcessHub(tmp_path / "hub") as hub:
        token = hub.add_station("tram-prio")
        with FaultProxy("127.0.0.1", hub.hub.http_port) as proxy:
            proxy.bandwidth_bps = 8_000_000  # the routine CT needs ~8 s on this link
            with InProcessGateway(
                tmp_path / "gw",
                hub_url=f"http://127.0.0.1:{proxy.port}",
                token=token,
                chunk_kb=64,
            ) as gw:
                res = storescu([tmp_path / "routine"], "127.0.0.1", gw.port, gw.aet, "CT01")
                assert res.returncode == 0, res.stderr
                wait_until(lambda: proxy.bytes_up > 500_000, 60, "routine upload under way")
                res = storescu([stat_cr], "127.0.0.1", gw.port, gw.aet, "CR01")
                assert res.returncode == 0, res.stderr
                assert (
                    gw.state.scalar("SELECT priority FROM studies WHERE study_uid = ?", (stat_uid,))
                    == 0
                )
                wait_until(lambda: hub.committed().get(stat_uid) == 1, 120, "STAT committed")
                held_routine = _held(hub).get(routine_uid, 0)
                assert held_routine < len(routine), "routine finished first: no pre-emption"
                # Proof of pre-emption between chunks: a routine bundle paused part-way while
                # the STAT study went through (without it, the bundle would have completed).
                paused = [
                    (u.offset, u.length)
                    for u in _uploads(hub)
                    if u.study_uid == routine_uid and u.state == "receiving"
                ]
                assert any(0 < off < length for off, length in paused), paused
                wait_until(
                    lambda: hub.committed().get(routine_uid) == len(routine),
                    180,
                    "routine committed after the STAT study",
                )


@pytest.mark.needs_dcmtk
def test_priority_command_reorders_the_queue(tmp_path: Path) -> None:
    first = make_ct_series(tmp_path / "a", 3, seed=21, matrix=128)
    second = make_ct_series(tmp_path / "b", 3, seed=22, matrix=128)
    # No hub URL reachable: the studies wait in the queue, in arrival order.
    with InProcessGateway(
        tmp_path / "gw", hub_url="http://127.0.0.1:9", token="unused", retry_max_s=60
    ) as gw:
        for folder in ("a", "b"):
            res = storescu([tmp_path / folder], "127.0.0.1", gw.port, gw.aet, "CT01")
            assert res.returncode == 0, res.stderr
        worker = gw.gateway.workers[0]
        later_uid = _study_uid(second[0])
        assert worker.candidates()[0].study_uid == _study_uid(first[0])
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "telerad.cli",
                "gateway",
                "priority",
                later_uid,
                "stat",
                "--data-dir",
                str(gw.settings.data_dir),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert worker.candidates()[0].study_uid == later_uid
        bad = subprocess.run(
            [
                sys.executable,
                "-m",
                "telerad.cli",
                "gateway",
                "priority",
                "1.2.3",
                "stat",
                "--data-dir",
                str(gw.settings.data_dir),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 1 and "no study 1.2.3" in bad.stderr


def _uploads(hub: InProcessHub) -> list:  # type: ignore[type-arg]
    from sqlalchemy import select

    from reading_queue.models import Upload

    with hub.ingest.session() as s:
        return list(s.scalars(select(Upload)))


def _study_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
