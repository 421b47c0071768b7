"""Reading priority: the one order every room agrees on (send, assign and read)."""

from __future__ import annotations

from enum import IntEnum


class Priority(IntEnum):
    """Reading priority; lower value is sent and read first."""

    STAT = 0
    URGENT = 1
    ROUTINE = 2

    @classmethod
    def parse(cls, value: str | int | Priority) -> Priority:
        if isinstance(value, Priority):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[value.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown priority {value!r}: use stat, urgent or routine") from None

    @property
    def label(self) -> str:
        return self.name.lower()
