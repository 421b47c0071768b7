"""The roster: radiologists and stations as an admin writes them (YAML or TOML).

The same format seeds the hub (``telerad hub roster load``) and feeds the simulator
(``telerad hub simulate --roster``), so "does this roster keep our SLAs?" is answered about
exactly what will be loaded. The format is in docs/worklist-simulation.md ("The roster file").
"""

from __future__ import annotations

import re
import tomllib
from datetime import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from reading_queue import QueueError
from reading_queue.worklist.engine import Reader, Shift
from reading_queue.worklist.policy import PRIORITY_NAMES

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RosterError(QueueError):
    pass


_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def _day(token: str) -> int:
    """``mon``, ``tues``, ``Monday``: at least three letters of a day's name, nothing else."""
    token = token.strip().lower()
    for i, name in enumerate(_DAY_NAMES):
        if len(token) >= 3 and name.startswith(token):
            return i
    raise ValueError(f"unknown day {token!r}: use mon..sun, ranges like mon-fri")


def parse_days(text: str) -> list[int]:
    """``mon-fri``, ``sat,sun``, ``daily`` -> weekday numbers (Monday 0)."""
    text = text.strip().lower()
    if text in ("daily", "all", "*"):
        return list(range(7))
    days: list[int] = []
    for part in text.split(","):
        if "-" in part:
            first, last = part.split("-", 1)
            i, j = _day(first), _day(last)
            days.extend((i + k) % 7 for k in range((j - i) % 7 + 1))
        else:
            days.append(_day(part))
    return sorted(set(days))


def parse_clock(text: str) -> time:
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", text.strip())
    if not m:
        raise ValueError(f"time {text!r} must be HH:MM")
    hour, minute = int(m.group(1)), int(m.group(2))
    if hour == 24 and minute == 0:
        return time(0, 0)
    if hour > 23 or minute > 59:
        raise ValueError(f"time {text!r} out of range")
    return time(hour, minute)


class ShiftSpec(BaseModel):
    """``days`` in the reader's time zone; ``end`` before ``start`` runs past midnight and
    ``00:00``-``24:00`` is the whole day."""

    days: str
    start: str
    end: str
    on_call: bool = False

    @field_validator("start")
    @classmethod
    def _start(cls, v: str) -> str:
        if v.strip() == "24:00":
            raise ValueError("a shift starts at 00:00..23:59 (24:00 is only an end)")
        return v

    @model_validator(mode="after")
    def _check(self) -> ShiftSpec:
        parse_days(self.days)
        parse_clock(self.start)
        parse_clock(self.end)
        return self

    @classmethod
    def parse(cls, text: str) -> ShiftSpec:
        """CLI form: ``mon-fri 07:00-15:00`` (append `` on-call`` for on-call)."""
        parts = text.split()
        on_call = bool(parts) and parts[-1].lower() in ("on-call", "oncall", "on_call")
        if on_call:
            parts = parts[:-1]
        if len(parts) != 2 or "-" not in parts[1]:
            raise ValueError(f"shift {text!r}: write it as 'mon-fri 07:00-15:00 [on-call]'")
        start, end = parts[1].split("-", 1)
        return cls(days=parts[0], start=start, end=end, on_call=on_call)

    def label(self) -> str:
        return f"{self.days} {self.start}-{self.end}" + (" on-call" if self.on_call else "")

    def shifts(self) -> list[Shift]:
        start, end = parse_clock(self.start), parse_clock(self.end)
        return [Shift(day, start, end, self.on_call) for day in parse_days(self.days)]


def _upper_list(values: list[str]) -> list[str]:
    return sorted({v.strip().upper() for v in values if v.strip()})


def _lower_list(values: list[str]) -> list[str]:
    return sorted({v.strip().lower() for v in values if v.strip()})


class RadiologistSpec(BaseModel):
    key: str
    name: str = Field(default="", max_length=128)
    modalities: list[str]
    subspecialties: list[str] = Field(default_factory=list)
    #: jurisdictions: ISO 3166 country (``VN``) or subdivision (``VN-HN``, ``KH-12``)
    licences: list[str]
    #: report languages (ISO 639-1: ``vi``, ``km``, ``en``)
    languages: list[str] = Field(default_factory=list)
    timezone: str = "Asia/Ho_Chi_Minh"
    shifts: list[ShiftSpec] = Field(default_factory=list)
    max_concurrent: int = 4
    rvu_per_hour: float = 8.0
    active: bool = True

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        if not _KEY.match(v):
            raise ValueError("key: letters, digits, '.', '_' or '-', at most 64")
        return v

    @field_validator("shifts", mode="before")
    @classmethod
    def _shift_strings(cls, v: Any) -> Any:
        """Files may write shifts as tables or in the CLI's form 'mon-fri 07:00-15:00'."""
        if isinstance(v, list):
            return [ShiftSpec.parse(x) if isinstance(x, str) else x for x in v]
        return v

    @field_validator("modalities", "licences")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        v = _upper_list(v)
        if not v:
            raise ValueError("at least one is needed")
        return v

    @field_validator("subspecialties", "languages")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return _lower_list(v)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (use an IANA name)") from None
        return v

    @field_validator("max_concurrent")
    @classmethod
    def _cap(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("rvu_per_hour")
    @classmethod
    def _rate(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    def reader(self, **load: Any) -> Reader:
        return Reader(
            key=self.key,
            modalities=frozenset(self.modalities),
            licences=frozenset(self.licences),
            languages=frozenset(self.languages),
            subspecialties=frozenset(self.subspecialties),
            timezone=self.timezone,
            shifts=tuple(s for spec in self.shifts for s in spec.shifts()),
            max_concurrent=self.max_concurrent,
            rvu_per_hour=self.rvu_per_hour,
            active=self.active,
            **load,
        )


class PacsDestination(BaseModel):
    """A hospital PACS that gets this station's reports (DICOM C-STORE)."""

    name: str = Field(min_length=1, max_length=64)
    aet: str = Field(min_length=1, max_length=16)
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(ge=1, le=65535)


class StationSpec(BaseModel):
    name: str
    institution: str = Field(default="", max_length=128)
    jurisdiction: str = Field(default="", max_length=16)
    language: str = Field(default="", max_length=8)
    preferred: list[str] = Field(default_factory=list)
    excluded: list[str] = Field(default_factory=list)
    #: SLA minutes per priority from this institution's contract, e.g. ``{stat = 20}``
    sla_minutes: dict[str, float] = Field(default_factory=dict)
    pacs: list[PacsDestination] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _KEY.match(v):
            raise ValueError("name: letters, digits, '.', '_' or '-', at most 64")
        return v

    @field_validator("jurisdiction")
    @classmethod
    def _jur(cls, v: str) -> str:
        return v.strip().upper()

    @field_validator("language")
    @classmethod
    def _lang(cls, v: str) -> str:
        return v.strip().lower()

    @field_validator("sla_minutes")
    @classmethod
    def _sla(cls, v: dict[str, float]) -> dict[str, float]:
        out = {k.lower(): float(x) for k, x in v.items()}
        bad = [k for k in out if k not in PRIORITY_NAMES]
        if bad:
            raise ValueError(f"unknown priorities {bad}: use stat, urgent, routine")
        if any(x <= 0 for x in out.values()):
            raise ValueError("SLA minutes must be positive")
        return out


class Roster(BaseModel):
    radiologists: list[RadiologistSpec] = Field(default_factory=list)
    stations: list[StationSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Roster:
        for what, keys in (
            ("radiologist", [r.key for r in self.radiologists]),
            ("station", [s.name for s in self.stations]),
        ):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            if dup:
                raise ValueError(f"{what} listed twice: {', '.join(dup)}")
        known = {r.key for r in self.radiologists}
        for st in self.stations:
            unknown = sorted(set(st.preferred + st.excluded) - known)
            if unknown and self.radiologists:
                raise ValueError(f"station {st.name} names unknown radiologists {unknown}")
        return self


def _yaml_clock_times(data: Any) -> Any:
    """YAML 1.1 reads an unquoted ``15:00`` as the base-60 number 900 (``07:00`` stays a
    string): turn shift start/end numbers back into HH:MM. YAML only; TOML has no such trap."""
    if not isinstance(data, dict):
        return data
    for rad in data.get("radiologists") or []:
        for shift in (rad.get("shifts") or []) if isinstance(rad, dict) else []:
            if not isinstance(shift, dict):
                continue
            for k in ("start", "end"):
                v = shift.get(k)
                if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 24 * 60:
                    shift[k] = f"{v // 60:02d}:{v % 60:02d}"
    return data


def load_roster(path: Path) -> Roster:
    """Read a roster file (``.yaml``/``.yml`` or ``.toml``); errors name the file and field."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RosterError(f"cannot read roster {path}: {exc.strerror}") from exc
    try:
        if path.suffix.lower() == ".toml":
            data: Any = tomllib.loads(raw.decode())
        else:
            data = _yaml_clock_times(yaml.safe_load(raw) or {})
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RosterError(f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise RosterError(f"{path}: expected 'radiologists' and 'stations' at the top level")
    try:
        return Roster.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise RosterError(f"{path}: invalid roster\n" + "\n".join(lines)) from None
