"""Priority rules: which studies jump the forward queue (STAT / URGENT / ROUTINE)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel
from pydicom import Dataset

from telerad.core.priority import Priority


class PriorityRule(BaseModel):
    """A study gets the most urgent priority among the rules that match any of its instances.

    ``match`` maps a DICOM keyword (``Modality``, ``BodyPartExamined``,
    ``RequestedProcedurePriority``, any keyword) or ``calling_aet`` to a value or a list of
    values; comparisons are case-insensitive and ``*`` is a wildcard suffix/prefix.
    """

    match: dict[str, str | list[str]]
    priority: Literal["stat", "urgent", "routine"]


def default_priority_rules() -> list[PriorityRule]:
    """Modalities send RequestedProcedurePriority (HIGH/MEDIUM/LOW) or STAT in free text."""
    return [
        PriorityRule(match={"RequestedProcedurePriority": ["STAT", "HIGH"]}, priority="stat"),
        PriorityRule(match={"RequestedProcedurePriority": ["MEDIUM", "URGENT"]}, priority="urgent"),
        PriorityRule(match={"StudyDescription": ["*STAT*", "*TRAUMA*"]}, priority="stat"),
    ]


def _values(ds: Dataset, key: str, calling_aet: str) -> list[str]:
    if key.lower() == "calling_aet":
        return [calling_aet]
    try:
        value = ds.get(key)
    except Exception:  # a malformed element must not fail the C-STORE over a priority rule
        return []
    if value is None:
        return []
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return [str(value)]


def _matches(actual: list[str], wanted: str | list[str]) -> bool:
    patterns = [wanted] if isinstance(wanted, str) else wanted
    return any(
        fnmatch.fnmatchcase(a.strip().upper(), p.strip().upper()) for a in actual for p in patterns
    )


def evaluate(rules: Sequence[PriorityRule], ds: Dataset, calling_aet: str) -> Priority:
    """The most urgent priority among matching rules; ROUTINE when none match.

    A rule matches when every key in its ``match`` table matches (AND); patterns use shell
    wildcards so ``*TRAUMA*`` matches a free-text study description.
    """
    best = Priority.ROUTINE
    for rule in rules:
        if all(_matches(_values(ds, k, calling_aet), v) for k, v in rule.match.items()):
            best = min(best, Priority.parse(rule.priority))
    return best
