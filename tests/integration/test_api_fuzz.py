"""schemathesis against the hub's own OpenAPI schema, over real HTTP, signed in as each role
(and as nobody): whatever it sends, the hub answers with a 4xx and a message or a success,
never a server error, and every answer matches the schema the app publishes.

The schema is the app's (``app.openapi()``): serving it stays off by default. Left out:
the event stream (it never ends) and signing out (it would end the session the other
cases use)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance

from reading_queue.accounts import Accounts
from tests.integration.test_worklist_api import PASSWORD, ROSTER, _load
from tests.integration.test_worklist_api import Hub as SignedIn
from tests.support.telerad_procs import InProcessHub

ROLES = {"radiologist": "lan", "clinic": "nurse1", "admin": "boss", "station": "", "nobody": ""}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InProcessHub, dict[str, str]]]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    roster = tmp / "roster.yaml"
    roster.write_text(ROSTER)
    with InProcessHub(tmp / "hub", roster_file=roster, assignment_mode="pull") as h:
        accounts = Accounts(h.hub.ingest.engine)
        accounts.add_user("lan", "radiologist", PASSWORD, radiologist="dr.lan")
        accounts.add_user("sok", "radiologist", PASSWORD, radiologist="dr.sok")
        accounts.add_user("nurse1", "clinic", PASSWORD, station="tram-1")
        accounts.add_user("nurse2", "clinic", PASSWORD, station="tram-kh")
        accounts.add_user("boss", "admin", PASSWORD)
        signed = SignedIn(h)
        _load(signed)
        headers = {role: f"Bearer {signed.as_(user).headers['Authorization'][7:]}"
                   for role, user in ROLES.items() if user}  # fmt: skip
        headers["station"] = f"Bearer {h.hub.ingest.rotate_token('tram-1')}"
        yield h, headers


@pytest.fixture(scope="module")
def api_schema(hub: tuple[InProcessHub, dict[str, str]]) -> Any:
    schema = schemathesis.openapi.from_dict(hub[0].hub.app.openapi())
    return schema.exclude(path_regex=r"^/api/(worklist/events|auth/logout)$")


def test_no_server_errors_and_answers_match_the_schema(
    api_schema: Any, hub: tuple[InProcessHub, dict[str, str]]
) -> None:
    """Valid and invalid requests (schemathesis' positive and negative modes); each is sent
    as every role (stations only to the upload
    protocol, people only to the rest; nobody to everything). One operation's failure does
    not hide the others': every failing operation is reported.

    (schemathesis' own pytest plugin does not run under pytest 9 yet; this drives its
    strategies with hypothesis directly.)"""
    h, headers = hub
    failures: dict[str, str] = {}
    sent = 0
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20

    plans = [(op, mode) for op in operations for mode in GenerationMode]
    for op, mode in plans:
        try:
            strategy = op.as_strategy(generation_mode=mode)
        except Exception:  # nothing to make invalid in this operation
            continue

        @given(case=strategy)
        @settings(
            max_examples=12,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def run(case: Any) -> None:
            nonlocal sent
            for role in ROLES:
                if role != "nobody" and (role == "station") != case.path.startswith(
                    "/api/v1/ingest"
                ):
                    continue
                extra = {"Authorization": headers[role]} if role in headers else {}
                sent += 1
                case.call_and_validate(
                    base_url=h.url,
                    headers=extra,
                    checks=[not_a_server_error, response_schema_conformance],
                    timeout=30,
                )

        try:
            run()
        except Exception as exc:
            if "Unsatisfiable" in type(exc).__name__:
                continue  # no invalid request exists for this operation
            failures[f"{mode.value} {op.method.upper()} {op.path}"] = str(exc)[:2000]
    assert sent >= 8 * len(operations), sent  # the cases really ran
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())


def test_the_schema_covers_the_people_api(
    api_schema: Any, hub: tuple[InProcessHub, dict[str, str]]
) -> None:
    paths = set(api_schema.raw_schema["paths"])
    assert {"/api/worklist", "/api/studies/{uid}", "/api/auth/token", "/api/audit"} <= paths
    # and the hub does not serve it unless asked to (--api-docs)
    assert httpx.get(f"{hub[0].url}/openapi.json").status_code == 404
