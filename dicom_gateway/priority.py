"""Priority rules: which studies jump the forward queue (STAT / URGENT / ROUTINE)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from pydicom import Dataset

from telerad.config import Priority, PriorityRule


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
