"""The house's layout, enforced: data flows ``viewer_api -> reading_queue <- dicom_gateway``, all
on ``telerad.core``; see docs/architecture.md for the map.

Every import of our own packages in every module (also imports inside functions) is checked
against the rooms it may use. A new module falls under its package's rule; a new dependency
between rooms is a decision to make here, visibly, not by accident.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = ("telerad", "dicom_gateway", "reading_queue", "viewer_api", "sample_studies")

# (module prefix, what it may import); the longest matching module prefix wins. An entry is a
# package and everything under it; ``name!`` is that module alone (a package's ``__init__``:
# ``reading_queue!`` is QueueError, ``dicom_gateway!`` GatewayError, ``telerad!`` the version).
CORE = "telerad.core"
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("telerad.core", (CORE,)),
    ("dicom_gateway.durable", (CORE, "dicom_gateway!", "dicom_gateway.durable")),
    (
        "dicom_gateway.station",
        (CORE, "dicom_gateway!", "dicom_gateway.durable", "dicom_gateway.station"),
    ),
    ("dicom_gateway", (CORE, "dicom_gateway!")),
    # The hub: the durable listener library is shared with the stations, their app is not.
    (
        "reading_queue.settings",
        (CORE, "dicom_gateway.durable.settings", "reading_queue.worklist.policy"),
    ),
    (
        "reading_queue.models",
        (CORE, "reading_queue!", "reading_queue.models", "reading_queue.migrations"),
    ),
    ("reading_queue.migrations", (CORE, "reading_queue.models", "reading_queue.migrations")),
    # Intake and worklist meet only in the database: the study_events outbox (models).
    (
        "reading_queue.intake",
        (
            CORE,
            "reading_queue!",
            "reading_queue.intake",
            "reading_queue.models",
            "reading_queue.settings",
        ),
    ),
    (
        "reading_queue.intake.dicom_inbox",
        (
            CORE,
            "reading_queue!",
            "reading_queue.intake",
            "reading_queue.settings",
            "dicom_gateway.durable",
        ),
    ),
    (
        "reading_queue.worklist",
        (
            CORE,
            "reading_queue!",
            "reading_queue.worklist",
            "reading_queue.models",
            "reading_queue.settings",
        ),
    ),
    ("reading_queue.simulator", (CORE, "reading_queue!", "reading_queue.worklist")),
    # People who sign in: their own room, on the shared database models.
    ("reading_queue.accounts", (CORE, "reading_queue!", "reading_queue.models")),
    ("reading_queue.audit", (CORE, "reading_queue!", "reading_queue.models")),
    ("reading_queue.access", (CORE, "reading_queue!", "reading_queue.models")),
    ("reading_queue", (CORE, "reading_queue!")),
    ("viewer_api", (CORE, "telerad!", "reading_queue", "viewer_api")),
    ("sample_studies", ("sample_studies",)),
    # The top: the CLI, the hub's assembly and the demo put the rooms together.
    ("telerad", OURS),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> list[Path]:
    paths: list[Path] = []
    for pkg in OURS:
        paths.extend(p for p in sorted((ROOT / pkg).rglob("*.py")) if "migrations" not in p.parts)
    return paths


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return [(line, m) for line, m in found if m.split(".")[0] in OURS]


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _allowed(target: str, entry: str) -> bool:
    return target == entry[:-1] if entry.endswith("!") else _under(target, entry)


def _rule(module: str) -> tuple[str, tuple[str, ...]]:
    matches = [r for r in RULES if _under(module, r[0])]
    assert matches, f"{module}: no layering rule; add one to tests/unit/test_layering.py"
    return max(matches, key=lambda r: len(r[0]))


def test_every_module_has_a_rule() -> None:
    for path in _modules():
        _rule(_module_name(path))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layout(path: Path) -> None:
    module = _module_name(path)
    prefix, allowed = _rule(module)
    bad = [
        f"line {line}: {target}"
        for line, target in _imports(path)
        if not any(_allowed(target, entry) for entry in allowed)
    ]
    assert not bad, f"{module} (rule {prefix!r}) imports outside its rooms: {bad}"


def test_the_core_imports_nothing_of_ours_not_even_the_top_package() -> None:
    for path in (ROOT / "telerad" / "core").rglob("*.py"):
        for line, target in _imports(path):
            assert _under(target, "telerad.core"), f"{path}:{line} imports {target}"


@pytest.mark.parametrize(
    ("module", "target"),
    [
        ("dicom_gateway.durable.scp", "dicom_gateway.station.service"),
        ("dicom_gateway.station.service", "reading_queue.intake.service"),
        ("reading_queue.intake.dicom_inbox", "dicom_gateway.station.service"),
        ("reading_queue.intake.service", "reading_queue.worklist.service"),
        ("reading_queue.worklist.rounds", "reading_queue.intake.service"),
        ("viewer_api.app", "dicom_gateway.durable.scp"),
        ("reading_queue.worklist.service", "viewer_api.app"),
        ("telerad.core.wire", "telerad"),
        ("telerad.core.wire", "dicom_gateway.durable.state"),
    ],
)
def test_the_rules_refuse_what_the_layout_forbids(module: str, target: str) -> None:
    _, allowed = _rule(module)
    assert not any(_allowed(target, entry) for entry in allowed)
