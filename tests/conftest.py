"""Suite-wide policy for tests that need a real peer (DCMTK, Orthanc, PostgreSQL, FUSE,
Chromium): mark them ``@pytest.mark.needs_<peer>`` (registered in pyproject.toml, which also
sets ``--strict-markers``). The peers are looked for once, at collection; a test whose peer is
missing is skipped with the reason, or, when ``TELERAD_REQUIRE_PEERS=1`` (set by .ci/run),
fails in setup before any of its fixtures run. Where availability is only known at run time
(a fixture, a mount that fails) call ``tests.support.peers.require_peer``: same policy.

Marker arguments ask for more than the default: ``needs_dcmtk("dcmsend")`` also needs that
tool, ``needs_orthanc("dicomweb")`` that plugin.
"""

from __future__ import annotations

import pytest

from tests.support.peers import (
    PEER_MARKERS,
    REQUIRE_PEERS_ENV,
    missing_peer,
    peers_required,
    require_peer,
)

_MISSING = pytest.StashKey[tuple[str, str]]()  # (peer name, why it is missing)


def pytest_configure(config: pytest.Config) -> None:
    try:
        peers_required()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_report_header(config: pytest.Config) -> str:
    if peers_required():
        return f"{REQUIRE_PEERS_ENV}=1: a test whose peer is missing fails"
    return f"{REQUIRE_PEERS_ENV} unset: a test whose peer is missing is skipped"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    required = peers_required()
    checked: dict[tuple[str, tuple[object, ...]], str | None] = {}
    for item in items:
        for marker, (name, _check) in PEER_MARKERS.items():
            for mark in item.iter_markers(marker):
                key = (marker, mark.args)
                if key not in checked:
                    checked[key] = missing_peer(marker, *mark.args)
                reason = checked[key]
                if reason is None or _MISSING in item.stash:
                    continue
                if required:  # fails in setup, below
                    item.stash[_MISSING] = (name, reason)
                else:  # a skip mark: reported at the test, like skipif
                    item.add_marker(
                        pytest.mark.skip(
                            reason=f"{name} unavailable: {reason}"
                            f" [set {REQUIRE_PEERS_ENV}=1 to fail instead]"
                        )
                    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if _MISSING in item.stash:
        name, reason = item.stash[_MISSING]
        require_peer(name, False, reason)  # TELERAD_REQUIRE_PEERS=1: fails
