"""The hub registry on a real PostgreSQL cluster started by the test (production setup)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sample_studies.generate import make_ct_series
from tests.support.peers import PostgresCluster, storescu
from tests.support.telerad_procs import InProcessGateway, InProcessHub, wait_until


@pytest.mark.needs_postgres
@pytest.mark.needs_dcmtk
def test_gateway_to_hub_on_postgresql(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "ct", 6, seed=7, matrix=128)
    with PostgresCluster() as pg:
        url = pg.create_database("telerad_hub")
        with InProcessHub(tmp_path / "hub", database_url=url) as hub:
            token = hub.add_station("tram-pg")
            with InProcessGateway(tmp_path / "gw", hub_url=hub.url, token=token) as gw:
                res = storescu([tmp_path / "ct"], "127.0.0.1", gw.port, gw.aet, "CT01")
                assert res.returncode == 0, res.stderr
                committed = wait_until(hub.committed, 60, "study committed on PostgreSQL")
                assert list(committed.values()) == [len(files)]
                # Re-sending the same files is idempotent all the way to the hub.
                res = storescu([tmp_path / "ct"], "127.0.0.1", gw.port, gw.aet, "CT01")
                assert res.returncode == 0, res.stderr
            rows = pg.psql(
                "SELECT count(*), count(DISTINCT sop_instance_uid) FROM hub_instances",
                database="telerad_hub",
            )
            assert rows.stdout.strip() == f"{len(files)}|{len(files)}"
