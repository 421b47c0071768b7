"""Run our own hub and gateway for tests and benchmarks: in-process or as real processes.

In-process (``InProcessHub``, ``InProcessGateway``) is fast and lets a test look inside;
``HubProcess`` / ``GatewayProcess`` run ``telerad … serve`` as separate processes so a test
can ``kill -9`` them at any moment, as a power cut or the OOM killer would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from dicom_gateway.durable.state import StateDB
from dicom_gateway.station.service import Gateway
from dicom_gateway.station.settings import GatewaySettings
from reading_queue.intake.service import open_ingest
from reading_queue.settings import HubSettings
from telerad.hub import Hub
from tests.support.peers import free_port, wait_for_port


def wait_until(
    predicate: Callable[[], Any], deadline_s: float, message: str, poll_s: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``message`` on timeout."""
    end = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {deadline_s:.0f} s: {message}")
        time.sleep(poll_s)


# -- in-process -------------------------------------------------------------------------------


class InProcessHub:
    def __init__(self, data_dir: Path, **overrides: Any) -> None:
        settings = {
            "data_dir": data_dir,
            "http_port": 0,
            "http_host": "127.0.0.1",
            "dicom_port": 0,
            "dicom_host": "127.0.0.1",
            "quiet_period_s": 1.0,
            "disk_reserve_mb": 1,
        }
        settings.update(overrides)
        self.settings = HubSettings(**settings)
        self.hub = Hub(self.settings)

    def __enter__(self) -> Self:
        self.hub.start_dicom()
        self.hub.start_http()
        wait_until(lambda: self.hub.started, 30, "hub HTTP server start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.hub.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.hub.http_port}"

    @property
    def ingest(self) -> Any:
        return self.hub.ingest

    def add_station(self, name: str = "station-1") -> str:
        token: str = self.hub.ingest.add_station(name)
        return token

    def committed(self) -> dict[str, int]:
        """Committed studies and their instance counts."""
        return {
            s.study_uid: s.instance_count
            for s in self.hub.ingest.studies()
            if s.state == "committed"
        }


class InProcessGateway:
    def __init__(self, data_dir: Path, **overrides: Any) -> None:
        settings = {
            "data_dir": data_dir,
            "dicom_port": 0,
            "dicom_host": "127.0.0.1",
            "http_port": 0,
            "quiet_period_s": 1.0,
            "disk_reserve_mb": 1,
            "retry_max_s": 2.0,
        }
        settings.update(overrides)
        self.settings = GatewaySettings(**settings)
        self.gateway = Gateway(self.settings)

    def __enter__(self) -> Self:
        self.gateway.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gateway.stop()

    @property
    def port(self) -> int:
        return self.gateway.listener.port

    @property
    def aet(self) -> str:
        return self.settings.aet

    @property
    def state(self) -> StateDB:
        return self.gateway.state


# -- real processes ---------------------------------------------------------------------------


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TELERAD_CONFIG", None)
    env.update(extra or {})
    return env


class _Process:
    log_name = "process"

    def __init__(self, data_dir: Path, args: list[str], env: Mapping[str, str] | None) -> None:
        self.data_dir = data_dir
        self.args = args
        self.env = _env(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-{self.log_name}.log"
        self.starts = 0

    def start(self) -> Self:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "telerad.cli", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        self.starts += 1
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        raise NotImplementedError

    def kill9(self) -> None:
        """SIGKILL, as a power cut would: no cleanup code runs."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class HubProcess(_Process):
    log_name = "hub"

    def __init__(
        self,
        data_dir: Path,
        *,
        http_port: int | None = None,
        dicom_port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        base = {
            "TELERAD_QUIET_PERIOD_S": "1",
            "TELERAD_DISK_RESERVE_MB": "1",
            "TELERAD_HTTP_HOST": "127.0.0.1",
            "TELERAD_DICOM_HOST": "127.0.0.1",
        }
        base.update(env or {})
        super().__init__(
            data_dir,
            [
                "hub",
                "serve",
                "--data-dir",
                str(data_dir),
                "--http-port",
                str(self.http_port),
                "--dicom-port",
                str(self.dicom_port),
            ],
            base,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"hub exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 60, "hub /healthz")

    def settings(self) -> HubSettings:
        return HubSettings(data_dir=self.data_dir)

    def add_station(self, name: str = "station-1") -> str:
        token: str = open_ingest(self.settings()).add_station(name)
        return token

    def committed(self) -> dict[str, int]:
        return {
            s.study_uid: s.instance_count
            for s in open_ingest(self.settings()).studies()
            if s.state == "committed"
        }


class GatewayProcess(_Process):
    log_name = "gateway"

    def __init__(
        self,
        data_dir: Path,
        *,
        hub_url: str | None,
        token: str | None,
        aet: str = "TEST_GW",
        dicom_port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.dicom_port = dicom_port or free_port()
        self.aet = aet
        base = {
            "TELERAD_QUIET_PERIOD_S": "1",
            "TELERAD_DISK_RESERVE_MB": "1",
            "TELERAD_RETRY_MAX_S": "2",
            "TELERAD_HTTP_PORT": "-1",
            "TELERAD_DICOM_HOST": "127.0.0.1",
        }
        base.update(env or {})
        args = [
            "gateway",
            "serve",
            "--data-dir",
            str(data_dir),
            "--dicom-port",
            str(self.dicom_port),
            "--aet",
            aet,
        ]
        if hub_url:
            args += ["--hub-url", hub_url]
        if token:
            args += ["--token", token]
        super().__init__(data_dir, args, base)

    def _wait_ready(self) -> None:
        assert self.proc is not None
        wait_for_port("127.0.0.1", self.dicom_port, 60, process=self.proc)

    def state(self) -> StateDB:
        return StateDB(self.data_dir / "gateway.sqlite3")
