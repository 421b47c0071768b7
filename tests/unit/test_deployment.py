"""docker-compose.yml describes a real deployment; no Docker engine runs here, so check that it
parses, that what it references exists, and that every command it runs is a real CLI command
with options our settings accept."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import yaml
from typer.testing import CliRunner

from dicom_gateway.station.settings import GatewaySettings
from reading_queue.settings import HubSettings
from telerad.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:  # type: ignore[type-arg]
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_has_the_whole_deployment() -> None:
    services = _compose()["services"]
    assert {"hub", "gateway", "postgres", "orthanc"} <= set(services)
    assert services["orthanc"]["environment"]["TCP_NODELAY"] == "1"
    hub_env = services["hub"]["environment"]
    assert hub_env["TELERAD_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert hub_env["TELERAD_ARCHIVE"] == "orthanc"
    named_volumes = set(_compose()["volumes"])
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in named_volumes, f"{name} uses undeclared volume {source}"
        if "build" in svc:
            assert (ROOT / svc["build"] / "Dockerfile").exists()


def test_dockerfile_copies_what_exists() -> None:
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"


def test_compose_commands_are_real_cli_commands() -> None:
    runner = CliRunner()
    for name in ("hub", "gateway"):
        command = _compose()["services"][name]["command"]
        role, verb = command[0], command[1]
        result = runner.invoke(app, [role, verb, "--help"])
        assert result.exit_code == 0, f"{name}: telerad {role} {verb} is not a command"
        for flag in (c for c in command[2:] if c.startswith("--")):
            assert flag in result.output, f"{name}: {flag} is not an option of {role} {verb}"


def test_site_config_is_valid_for_both_roles() -> None:
    cfg = ROOT / "deploy" / "telerad.toml"
    data = tomllib.loads(cfg.read_text())
    old = os.environ.get("TELERAD_CONFIG")
    os.environ["TELERAD_CONFIG"] = str(cfg)
    try:
        gw = GatewaySettings()
        hub = HubSettings()
    finally:
        if old is None:
            del os.environ["TELERAD_CONFIG"]
        else:
            os.environ["TELERAD_CONFIG"] = old
    assert gw.dicom_port == data["gateway"]["dicom_port"]
    assert len(gw.priority_rules) == len(data["gateway"]["priority_rules"])
    assert hub.dicom_port == data["hub"]["dicom_port"]
