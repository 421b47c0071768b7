"""The missing-peer policy (tests/conftest.py, ``tests.support.peers.require_peer``), proved by
running small suites with pytest's own ``pytester``: a test needing a peer that is not there
is skipped with the reason on a developer's machine, and fails when ``TELERAD_REQUIRE_PEERS=1``
(CI), so a green CI run cannot hide tests that never ran."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

from tests.support.peers import PEER_MARKERS, REQUIRE_PEERS_ENV

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
CONFTEST = ROOT / "tests" / "conftest.py"
NO_SUCH_TOOL = "telerad-no-such-dcmtk-tool"


def _ini_options() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        options: dict[str, object] = tomllib.load(f)["tool"]["pytest"]["ini_options"]
    return options


def _registered_markers() -> dict[str, str]:
    markers = _ini_options()["markers"]
    assert isinstance(markers, list)
    return {re.split(r"[:(]", line, maxsplit=1)[0].strip(): line for line in markers}


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """An inner suite with the project's real conftest and marker registrations."""
    monkeypatch.syspath_prepend(str(ROOT))  # the inner conftest imports tests.support.peers
    monkeypatch.delenv(REQUIRE_PEERS_ENV, raising=False)
    pytester.makeconftest(CONFTEST.read_text())
    markers = "\n".join(f"    {line}" for line in _registered_markers().values())
    pytester.makeini(f"[pytest]\naddopts = --strict-markers\nmarkers =\n{markers}\n")
    pytester.makepyfile(
        test_inner=f"""
        import pytest

        @pytest.mark.needs_dcmtk({NO_SUCH_TOOL!r})
        def test_needs_a_tool_that_cannot_exist():
            pass

        @pytest.mark.needs_dcmtk
        def test_needs_dcmtk():
            pass

        def test_needs_nothing():
            pass
        """
    )
    return pytester


def test_missing_peer_is_skipped_with_the_reason_without_the_variable(
    suite: pytest.Pytester,
) -> None:
    result = suite.runpytest("-rs", "-k", "cannot_exist or nothing")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [f"*SKIPPED*DCMTK unavailable: {NO_SUCH_TOOL} not on PATH*set {REQUIRE_PEERS_ENV}=1*"]
    )
    assert result.ret == pytest.ExitCode.OK


def test_missing_peer_fails_with_the_variable(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(REQUIRE_PEERS_ENV, "1")
    result = suite.runpytest("-k", "cannot_exist or nothing")
    # Failed in setup, before any fixture: reported as an error, and the run is not green.
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [f"*DCMTK unavailable: {NO_SUCH_TOOL} not on PATH*{REQUIRE_PEERS_ENV}=1*is an error*"]
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED


@pytest.mark.parametrize("required", ["", "1"])
def test_a_peer_missing_from_path_is_missing(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, required: str
) -> None:
    """The plain mark, with DCMTK taken off PATH (only an empty directory and the venv's bin,
    whose pynetdicom ``storescu``/``storescp``/``echoscu`` scripts must not count)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", f"{empty}:{Path(sys.prefix) / 'bin'}")
    monkeypatch.setenv(REQUIRE_PEERS_ENV, required)
    result = suite.runpytest("-rs", "-k", "test_needs_dcmtk")
    if required:
        result.assert_outcomes(errors=1)
    else:
        result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*DCMTK unavailable: storescp, storescu, echoscu not on PATH*"])


def test_a_present_peer_runs_the_test(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_bin = tmp_path / "fake-dcmtk"
    fake_bin.mkdir()
    for tool in ("storescp", "storescu", "echoscu"):
        (fake_bin / tool).write_text("#!/bin/sh\n")
        (fake_bin / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(fake_bin))
    monkeypatch.setenv(REQUIRE_PEERS_ENV, "1")
    result = suite.runpytest("-k", "test_needs_dcmtk")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("value", ["true", "yes", "2"])
def test_an_unclear_variable_is_refused(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(REQUIRE_PEERS_ENV, value)
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{REQUIRE_PEERS_ENV} must be 1*not {value!r}*"])


def test_unregistered_markers_are_refused(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_typo="""
        import pytest

        @pytest.mark.needs_dcmkt
        def test_typo():
            pass
        """
    )
    result = suite.runpytest("test_typo.py")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*'needs_dcmkt' not found in `markers` configuration option*"])


def test_every_peer_marker_is_registered_and_strict() -> None:
    """pyproject.toml registers exactly the needs_* marks the conftest acts on, and
    ``--strict-markers`` turns a misspelt one into a collection error instead of a test that
    runs (and fails obscurely) or is silently never gated."""
    registered = {name for name in _registered_markers() if name.startswith("needs_")}
    assert registered == set(PEER_MARKERS)
    addopts = _ini_options()["addopts"]
    assert isinstance(addopts, str) and "--strict-markers" in addopts.split()
