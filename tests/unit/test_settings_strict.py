"""Closed-by-default settings: TOML typos are errors, tokens come from files or the
environment, plain http:// to another machine is refused, TLS destination options are
checked. No sockets: the CLI cases fail before anything listens."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_gateway.station.dicom_send import destination_tls_args
from dicom_gateway.station.settings import DicomDestination, GatewaySettings, is_loopback
from reading_queue.settings import HubSettings
from telerad.core.settings import SettingsError

SITE = """\
[gateway]
aet = "GW_SITE"
quiet_period_s = 30
[[gateway.destinations]]
name = "pacs"
aet = "PACS"
host = "10.0.0.9"
port = 104

[hub]
http_port = 9000
[hub.queue]
max_backlog_minutes = 45
[[hub.queue.procedures]]
modality = "CT"
rvu = 1.1
"""


def _config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    cfg = tmp_path / "site.toml"
    cfg.write_text(text)
    monkeypatch.setenv("TELERAD_CONFIG", str(cfg))
    return cfg


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("TELERAD_")}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "telerad.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=full,
    )


# -- unknown keys -------------------------------------------------------------------------------


def test_a_valid_site_file_loads_for_both_roles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _config(tmp_path, monkeypatch, SITE)
    gw = GatewaySettings()
    hub = HubSettings()
    assert gw.aet == "GW_SITE" and gw.quiet_period_s == 30
    assert gw.destinations[0].host == "10.0.0.9"
    assert hub.http_port == 9000
    assert hub.queue_policy.max_backlog_minutes == 45
    assert hub.queue_policy.procedures[0].rvu == 1.1


@pytest.mark.parametrize(
    ("role", "before", "typo", "table"),
    [
        (GatewaySettings, "quiet_period_s = 30", "quiet_perod_s = 30", "[gateway]"),
        (GatewaySettings, 'host = "10.0.0.9"', 'hots = "10.0.0.9"', "[[gateway.destinations]] #1"),
        (HubSettings, "http_port = 9000", "http_prot = 9000", "[hub]"),
        (HubSettings, "max_backlog_minutes = 45", "max_backlog_minute = 45", "[hub.queue]"),
        (HubSettings, "rvu = 1.1", "rvu = 1.1\nbody_part = 'HEAD'", "[[hub.queue.procedures]] #1"),
    ],
)
def test_a_typo_in_a_table_is_an_error_naming_key_table_and_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    role: type[GatewaySettings] | type[HubSettings],
    before: str,
    typo: str,
    table: str,
) -> None:
    assert before in SITE
    cfg = _config(tmp_path, monkeypatch, SITE.replace(before, typo))
    key = typo.split("\n")[-1].split(" =")[0]
    with pytest.raises(SettingsError) as err:
        role()
    assert f"unknown key '{key}' in {table} of {cfg}" in str(err.value)


def test_the_message_suggests_the_key_that_was_meant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _config(tmp_path, monkeypatch, "[gateway]\nquiet_perod_s = 5\nfoo_bar_baz = 1\n")
    with pytest.raises(SettingsError) as err:
        GatewaySettings()
    text = str(err.value)
    assert "unknown key 'quiet_perod_s' in [gateway]" in text
    assert "(did you mean 'quiet_period_s'?)" in text
    assert "unknown key 'foo_bar_baz' in [gateway]" in text  # every key, not just the first


def test_each_role_checks_only_its_own_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # hub-only keys in [hub] are no concern of the gateway, and a typo in [hub] does not
    # stop the gateway from starting (the hub refuses it when it starts).
    cfg = _config(tmp_path, monkeypatch, SITE.replace("http_port = 9000", "http_prot = 9000"))
    assert GatewaySettings().aet == "GW_SITE"
    with pytest.raises(SettingsError, match=re.escape(f"'http_prot' in [hub] of {cfg}")):
        HubSettings()
    # a hub key in [gateway] is unknown there
    _config(tmp_path, monkeypatch, '[gateway]\narchive = "orthanc"\n')
    with pytest.raises(SettingsError, match="unknown key 'archive' in \\[gateway\\]"):
        GatewaySettings()


def test_unknown_environment_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TELERAD_CONFIG", raising=False)
    monkeypatch.setenv("TELERAD_QUIET_PEROD_S", "5")  # other tools share the prefix
    monkeypatch.setenv("TELERAD_SOMETHING_ELSE", "x")
    monkeypatch.setenv("TELERAD_QUIET_PERIOD_S", "7")
    assert GatewaySettings().quiet_period_s == 7
    assert HubSettings().quiet_period_s == 7


def test_unreadable_or_broken_config_files_are_clear_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(tmp_path, monkeypatch, "[gateway\naet = 1\n")
    with pytest.raises(SettingsError, match=re.escape(f"{cfg} is not valid TOML")):
        GatewaySettings()
    monkeypatch.setenv("TELERAD_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(SettingsError, match=r"cannot read .*nope.toml"):
        GatewaySettings()


def test_cli_prints_the_unknown_key_and_exits_2_without_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text(SITE.replace("quiet_period_s = 30", "quiet_perod_s = 30"))
    res = _cli("gateway", "status", "--config", str(cfg), "--data-dir", str(tmp_path / "gw"))
    assert res.returncode == 2, res.stderr
    flat = " ".join(res.stderr.split())
    assert f"configuration error: unknown key 'quiet_perod_s' in [gateway] of {cfg}" in flat
    assert "Traceback" not in res.stderr
    cfg.write_text(SITE.replace("max_backlog_minutes", "max_backlog_mins"))
    res = _cli("hub", "studies", "--config", str(cfg), "--data-dir", str(tmp_path / "hub"))
    assert res.returncode == 2, res.stderr
    assert "unknown key 'max_backlog_mins' in [hub.queue]" in " ".join(res.stderr.split())
    assert "Traceback" not in res.stderr


def test_the_shipped_site_file_has_no_unknown_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("TELERAD_CONFIG", str(root / "deploy" / "telerad.toml"))
    GatewaySettings()
    HubSettings()


# -- hub defaults -------------------------------------------------------------------------------


def test_hub_http_surface_is_closed_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TELERAD_CONFIG", raising=False)
    hub = HubSettings()
    assert hub.api_docs is False
    assert hub.metrics_port == -1 and hub.metrics_host == "127.0.0.1"
    assert hub.max_json_body_kb == 8 * 1024


# -- station token ------------------------------------------------------------------------------


def test_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TELERAD_CONFIG", raising=False)
    monkeypatch.setenv("TELERAD_TOKEN", "tok-from-env")
    assert GatewaySettings().token == "tok-from-env"


def test_token_file_is_read_and_stripped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("TELERAD_CONFIG", raising=False)
    monkeypatch.delenv("TELERAD_TOKEN", raising=False)
    path = tmp_path / "token"
    path.write_text("  tok-from-file\n\n")
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        assert GatewaySettings(token_file=path).token == "tok-from-file"
    assert "readable by other users" not in caplog.text
    # from the TOML file too
    _config(tmp_path, monkeypatch, f'[gateway]\ntoken_file = "{path}"\n')
    assert GatewaySettings().token == "tok-from-file"


def test_a_token_file_others_can_read_is_used_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("TELERAD_CONFIG", raising=False)
    path = tmp_path / "token"
    path.write_text("tok\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert GatewaySettings(token_file=path).token == "tok"
    assert f"token_file {path} is readable by other users (mode 644)" in caplog.text
    assert "tok\n" not in caplog.text


def test_token_file_problems_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TELERAD_CONFIG", raising=False)
    monkeypatch.delenv("TELERAD_TOKEN", raising=False)
    with pytest.raises(ValueError, match=r"token_file .*missing: No such file"):
        GatewaySettings(token_file=tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    with pytest.raises(ValueError, match=r"token_file .*empty is empty"):
        GatewaySettings(token_file=empty)
    full = tmp_path / "full"
    full.write_text("tok")
    with pytest.raises(ValueError, match="both token and token_file are set"):
        GatewaySettings(token="other", token_file=full)


def test_cli_warns_that_token_on_the_command_line_is_visible(tmp_path: Path) -> None:
    # The hub URL is refused, so nothing starts; the warning comes first.
    res = _cli(
        "gateway",
        "serve",
        "--data-dir",
        str(tmp_path / "gw"),
        "--hub-url",
        "http://hub.example.org",
        "--token",
        "secret-token-value",
    )
    assert res.returncode == 2
    flat = " ".join(res.stderr.split())
    assert "warning: --token is visible to every user" in flat
    assert "--token-file" in flat
    assert "secret-token-value" not in res.stderr + res.stdout


# -- hub URL ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8100",
        "http://127.5.6.7",
        "http://localhost:8100",
        "http://[::1]:8100",
        "https://hub.example.org",
        "https://10.0.0.5:8443",
    ],
)
def test_https_anywhere_and_http_on_loopback_are_accepted(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TELERAD_CONFIG", raising=False)
    assert GatewaySettings(hub_url=url, token="t").hub_url == url


@pytest.mark.parametrize(
    "url", ["http://hub.example.org", "http://10.0.0.5:8100", "http://[fe80::1]"]
)
def test_plain_http_to_another_machine_is_refused_unless_insecure_http(
    url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("TELERAD_CONFIG", raising=False)
    with pytest.raises(ValueError, match=r"plain http:// to another machine.*--insecure-http"):
        GatewaySettings(hub_url=url, token="t")
    with caplog.at_level(logging.WARNING):
        assert GatewaySettings(hub_url=url, token="t", insecure_http=True).hub_url == url
    assert "plain http:// (insecure_http)" in caplog.text


def test_a_hub_url_that_is_not_http_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TELERAD_CONFIG", raising=False)
    for url in ("ftp://hub", "hub.example.org", "https://"):
        with pytest.raises(ValueError, match="use https://HOST"):
            GatewaySettings(hub_url=url, token="t")


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("LOCALHOST")
    assert not is_loopback("10.0.0.1") and not is_loopback("localhost.example.org")
    assert not is_loopback("hub.example.org")


def test_cli_refuses_plain_http_hub_with_exit_2(tmp_path: Path) -> None:
    res = _cli(
        "gateway",
        "serve",
        "--data-dir",
        str(tmp_path / "gw"),
        "--hub-url",
        "http://10.1.2.3:8100",
        env={"TELERAD_TOKEN": "t"},
    )
    assert res.returncode == 2
    flat = " ".join(res.stderr.split())
    assert "configuration error: hub_url 'http://10.1.2.3:8100' is plain http://" in flat
    assert "Traceback" not in res.stderr


# -- DICOM destinations -------------------------------------------------------------------------


def test_destination_tls_options_need_tls_and_unknown_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="ca given but tls = false"):
        DicomDestination(name="p", aet="P", host="h", port=1, ca=Path("/ca.pem"))
    with pytest.raises(ValueError, match="give both tls_cert and tls_key"):
        DicomDestination(name="p", aet="P", host="h", port=1, tls=True, tls_cert=Path("/c"))
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        DicomDestination.model_validate(
            {"name": "p", "aet": "P", "host": "h", "port": 1, "tsl": True}
        )


def test_destination_tls_args_verify_the_peer(tmp_path: Path) -> None:
    plain = DicomDestination(name="p", aet="P", host="pacs.local", port=104)
    assert destination_tls_args(plain) is None
    tls = DicomDestination(name="p", aet="P", host="pacs.local", port=2762, tls=True)
    args = destination_tls_args(tls)
    assert args is not None
    context, server_name = args
    assert server_name == "pacs.local"
    assert context.check_hostname and context.verify_mode.name == "CERT_REQUIRED"
    bad = DicomDestination(
        name="p", aet="P", host="h", port=1, tls=True, ca=tmp_path / "no-such-ca.pem"
    )
    with pytest.raises(ValueError, match="destination 'p': TLS files unusable"):
        destination_tls_args(bad)
