"""The roster as an admin writes it: shifts, radiologists, stations, and YAML/TOML files.

Errors must say what is wrong and where: ``ValueError`` with a hint for the CLI shift form,
``RosterError`` naming the file and the field for a roster file.
"""

from __future__ import annotations

from datetime import UTC, datetime, time
from pathlib import Path

import pytest
from pydantic import ValidationError

from reading_queue import QueueError
from reading_queue.worklist.engine import DecisionKind, QueuedStudy, Shift, plan, shift_status
from reading_queue.worklist.policy import QueuePolicy
from reading_queue.worklist.roster import (
    RadiologistSpec,
    Roster,
    RosterError,
    ShiftSpec,
    StationSpec,
    load_roster,
    parse_clock,
    parse_days,
)
from telerad.core.priority import Priority

YAML_ROSTER = """\
radiologists:
  - key: dr.an
    name: Dr An
    modalities: [ct, MR]
    subspecialties: [Neuro]
    licences: [vn-hn, KH]
    languages: [VI, en]
    timezone: Asia/Ho_Chi_Minh
    max_concurrent: 3
    shifts:
      - {days: mon-fri, start: "07:00", end: "15:00"}
      - {days: sat, start: "22:00", end: "06:00", on_call: true}
  - key: dr.bo
    modalities: [CR]
    licences: [VN]
stations:
  - name: hanoi-1
    jurisdiction: vn-hn
    language: VI
    preferred: [dr.an]
    excluded: [dr.bo]
    sla_minutes: {STAT: 20}
"""

TOML_ROSTER = """\
[[radiologists]]
key = "dr.an"
name = "Dr An"
modalities = ["ct", "MR"]
subspecialties = ["Neuro"]
licences = ["vn-hn", "KH"]
languages = ["VI", "en"]
timezone = "Asia/Ho_Chi_Minh"
max_concurrent = 3
shifts = [
  { days = "mon-fri", start = "07:00", end = "15:00" },
  { days = "sat", start = "22:00", end = "06:00", on_call = true },
]

[[radiologists]]
key = "dr.bo"
modalities = ["CR"]
licences = ["VN"]

[[stations]]
name = "hanoi-1"
jurisdiction = "vn-hn"
language = "VI"
preferred = ["dr.an"]
excluded = ["dr.bo"]
sla_minutes = { STAT = 20 }
"""


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def radiologist(**kw: object) -> RadiologistSpec:
    fields: dict[str, object] = {"key": "dr.an", "modalities": ["CT"], "licences": ["VN"]}
    fields.update(kw)
    return RadiologistSpec(**fields)  # type: ignore[arg-type]


# -- shifts ---------------------------------------------------------------------------------


def test_parse_weekday_shift() -> None:
    spec = ShiftSpec.parse("mon-fri 07:00-15:00")
    assert (spec.days, spec.start, spec.end, spec.on_call) == ("mon-fri", "07:00", "15:00", False)
    assert spec.shifts() == [Shift(d, time(7), time(15)) for d in range(5)]
    assert spec.label() == "mon-fri 07:00-15:00"


@pytest.mark.parametrize("suffix", ["on-call", "oncall", "ON_CALL"])
def test_parse_overnight_on_call_shift(suffix: str) -> None:
    spec = ShiftSpec.parse(f"sat 22:00-06:00 {suffix}")
    assert spec.on_call
    assert spec.shifts() == [Shift(5, time(22), time(6), on_call=True)]
    assert spec.label() == "sat 22:00-06:00 on-call"


def test_parse_whole_day_shift() -> None:
    spec = ShiftSpec.parse("sun 00:00-24:00")
    assert spec.shifts() == [Shift(6, time(0), time(0))]
    r = radiologist(timezone="UTC", shifts=[spec]).reader()
    sunday = datetime(2024, 5, 19, tzinfo=UTC).timestamp()
    assert shift_status(r, sunday).on_shift
    assert shift_status(r, sunday + 86399).on_shift
    assert not shift_status(r, sunday + 86400).on_shift


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("", "write it as 'mon-fri 07:00-15:00 \\[on-call\\]'"),
        ("mon-fri", "write it as"),
        ("mon-fri 07:00 15:00", "write it as"),
        ("07:00-15:00", "write it as"),
        ("mon-fri 07:00-15:00 maybe", "write it as"),
        ("mon-fri 7-15", "time '7' must be HH:MM"),
        ("mon-fri 07:00-25:00", "time '25:00' out of range"),
        ("mon-fri 07:60-08:00", "time '07:60' out of range"),
        ("funday 07:00-15:00", "unknown day 'funday': use mon..sun"),
        ("mon-xyz 07:00-15:00", "unknown day 'xyz'"),
        ("monkey 07:00-15:00", "unknown day 'monkey'"),
    ],
)
def test_bad_shift_text_is_refused_with_a_hint(text: str, hint: str) -> None:
    with pytest.raises(ValueError, match=hint):
        ShiftSpec.parse(text)


def test_shift_spec_fields_are_validated() -> None:
    with pytest.raises(ValidationError, match="must be HH:MM"):
        ShiftSpec(days="mon", start="7am", end="15:00")
    with pytest.raises(ValidationError, match="unknown day"):
        ShiftSpec(days="someday", start="07:00", end="15:00")


@pytest.mark.parametrize(
    ("text", "days"),
    [
        ("mon-fri", [0, 1, 2, 3, 4]),
        ("fri-mon", [0, 4, 5, 6]),
        ("sun-tue", [0, 1, 6]),
        ("sat,sun", [5, 6]),
        ("mon-wed, fri", [0, 1, 2, 4]),
        ("mon,mon-tue", [0, 1]),
        ("sun-sun", [6]),
        ("sat-fri", list(range(7))),
        ("Monday", [0]),
        ("tues-thurs", [1, 2, 3]),
        ("Saturday-Sunday", [5, 6]),
        ("  THU  ", [3]),
        ("daily", list(range(7))),
        ("all", list(range(7))),
        ("*", list(range(7))),
    ],
)
def test_parse_days(text: str, days: list[int]) -> None:
    assert parse_days(text) == days


@pytest.mark.parametrize("text", ["", "funday", "mon-", "-fri", "mon-xyz", "mon,,fri", "1-5"])
def test_parse_days_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="unknown day"):
        parse_days(text)


@pytest.mark.parametrize("text", ["monkey", "month", "sunset-wed", "mon-wedge", "mo", "tu-fr"])
def test_parse_days_refuses_words_that_merely_start_like_a_day(text: str) -> None:
    with pytest.raises(ValueError, match="unknown day"):
        parse_days(text)


@pytest.mark.parametrize(
    ("text", "clock"),
    [("07:00", time(7)), ("7:05", time(7, 5)), (" 23:59 ", time(23, 59)), ("24:00", time(0))],
)
def test_parse_clock(text: str, clock: time) -> None:
    assert parse_clock(text) == clock


@pytest.mark.parametrize("text", ["24:30", "12:60", "noon", "1200", "07:00:00", "-1:00"])
def test_parse_clock_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match=f"time '{text}'"):
        parse_clock(text)


# -- radiologists and stations ----------------------------------------------------------------


def test_radiologist_spec_is_normalised() -> None:
    spec = radiologist(
        modalities=[" ct", "mr", "CT", ""],
        licences=["vn-hn", "VN-HN", " kh "],
        languages=["VI", "en", " vi "],
        subspecialties=["Neuro", "MSK"],
    )
    assert spec.modalities == ["CT", "MR"]
    assert spec.licences == ["KH", "VN-HN"]
    assert spec.languages == ["en", "vi"]
    assert spec.subspecialties == ["msk", "neuro"]
    assert spec.timezone == "Asia/Ho_Chi_Minh"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"modalities": []}, "at least one is needed"),
        ({"licences": ["  "]}, "at least one is needed"),
        ({"key": "dr an"}, "letters, digits"),
        ({"key": "-dr"}, "letters, digits"),
        ({"key": "x" * 65}, "at most 64"),
        ({"timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus' \\(use an IANA name\\)"),
        ({"timezone": ""}, "unknown time zone ''"),
        ({"timezone": "../etc/passwd"}, "unknown time zone"),
        ({"max_concurrent": -1}, "must be >= 0"),
        ({"rvu_per_hour": 0}, "must be > 0"),
    ],
)
def test_radiologist_spec_refuses_bad_values(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        radiologist(**change)


def test_radiologist_spec_gives_an_engine_reader() -> None:
    spec = radiologist(
        modalities=["ct"],
        licences=["vn"],
        languages=["VI"],
        timezone="Europe/Paris",
        max_concurrent=0,
        rvu_per_hour=6,
        active=False,
        shifts=[ShiftSpec.parse("mon-tue 08:00-16:00"), ShiftSpec.parse("sun 20:00-08:00 on-call")],
    )
    r = spec.reader(open_count=2, open_rvu=(1.0, 0.0, 0.5), recent_rvu=3.0)
    assert r.key == "dr.an"
    assert (r.modalities, r.licences, r.languages) == (
        frozenset({"CT"}),
        frozenset({"VN"}),
        frozenset({"vi"}),
    )
    assert r.timezone == "Europe/Paris"
    assert r.shifts == (
        Shift(0, time(8), time(16)),
        Shift(1, time(8), time(16)),
        Shift(6, time(20), time(8), on_call=True),
    )
    assert (r.max_concurrent, r.rvu_per_hour, r.active) == (0, 6.0, False)
    assert (r.open_count, r.open_rvu, r.recent_rvu) == (2, (1.0, 0.0, 0.5), 3.0)


def test_station_spec_is_normalised_and_its_sla_overrides_the_policy() -> None:
    station = StationSpec(name="hanoi-1", jurisdiction=" vn-hn ", language=" VI ")
    assert (station.jurisdiction, station.language) == ("VN-HN", "vi")
    station = StationSpec(name="hanoi-1", sla_minutes={"STAT": 20, "Routine": 600})
    assert station.sla_minutes == {"stat": 20.0, "routine": 600.0}
    policy = QueuePolicy()
    assert policy.sla_s(Priority.STAT, station.sla_minutes) == 1200.0
    assert policy.sla_s(Priority.URGENT, station.sla_minutes) == 240 * 60.0


@pytest.mark.parametrize(
    ("sla", "message"),
    [({"asap": 5}, "unknown priorities \\['asap'\\]"), ({"stat": 0}, "must be positive")],
)
def test_station_sla_is_validated(sla: dict[str, float], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        StationSpec(name="x", sla_minutes=sla)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "hanoi 1"}, "letters, digits"),
        ({"name": ""}, "letters, digits"),
        ({"name": "ok", "jurisdiction": "X" * 17}, "at most 16 characters"),
        (
            {"name": "ok", "pacs": [{"name": "p", "aet": "PACS", "host": "h", "port": 0}]},
            "greater than or equal to 1",
        ),
        (
            {"name": "ok", "pacs": [{"name": "p", "aet": "A" * 17, "host": "h", "port": 104}]},
            "at most 16 characters",
        ),
    ],
)
def test_station_spec_refuses_bad_values(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        StationSpec(**fields)  # type: ignore[arg-type]


def test_roster_written_in_mixed_case_matches_studies_in_the_engine() -> None:
    """Upper-case modalities/licences and lower-case languages on both sides line up."""
    spec = radiologist(
        modalities=["ct"],
        licences=["vn"],
        languages=["VI"],
        subspecialties=["NEURO"],
        timezone="UTC",
        shifts=[ShiftSpec.parse("daily 00:00-24:00")],
    )
    station = StationSpec(name="s", jurisdiction="vn-hn", language="Vi")
    subspecialty, rvu = QueuePolicy().classify("ct", "head")
    now = datetime(2024, 5, 15, 10, tzinfo=UTC).timestamp()
    study = QueuedStudy(
        uid="1.2.3",
        priority=Priority.STAT,
        modality="ct",
        received_at=now,
        deadline=now + 1800,
        rvu=rvu,
        jurisdiction=station.jurisdiction,
        language=station.language,
        subspecialty=subspecialty,
    )
    p = plan(now, [study], [spec.reader()], QueuePolicy())
    [d] = p.of_kind(DecisionKind.ASSIGN)
    assert d.radiologist == "dr.an"
    assert "licensed VN, reads CT-neuro, reports in vi" in d.reasons[0]


# -- roster files -----------------------------------------------------------------------------


def test_load_yaml_roster(tmp_path: Path) -> None:
    roster = load_roster(write(tmp_path, "roster.yaml", YAML_ROSTER))
    an, bo = roster.radiologists
    assert (an.key, an.name, an.modalities, an.licences) == (
        "dr.an",
        "Dr An",
        ["CT", "MR"],
        ["KH", "VN-HN"],
    )
    assert (an.languages, an.subspecialties, an.max_concurrent) == (["en", "vi"], ["neuro"], 3)
    assert [s.label() for s in an.shifts] == ["mon-fri 07:00-15:00", "sat 22:00-06:00 on-call"]
    assert (bo.key, bo.timezone, bo.max_concurrent) == ("dr.bo", "Asia/Ho_Chi_Minh", 4)
    [station] = roster.stations
    assert (station.name, station.jurisdiction, station.language) == ("hanoi-1", "VN-HN", "vi")
    assert (station.preferred, station.excluded) == (["dr.an"], ["dr.bo"])
    assert station.sla_minutes == {"stat": 20.0}
    assert len(an.reader().shifts) == 6


def test_toml_and_yaml_rosters_load_the_same(tmp_path: Path) -> None:
    from_toml = load_roster(write(tmp_path, "roster.toml", TOML_ROSTER))
    assert from_toml == load_roster(write(tmp_path, "roster.yml", YAML_ROSTER))
    assert isinstance(from_toml, Roster)


def test_empty_yaml_is_an_empty_roster(tmp_path: Path) -> None:
    assert load_roster(write(tmp_path, "roster.yaml", "")) == Roster()


def _error(path: Path) -> str:
    with pytest.raises(RosterError) as info:
        load_roster(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_roster_errors_are_queue_errors() -> None:
    assert issubclass(RosterError, QueueError)


def test_duplicate_radiologist_key(tmp_path: Path) -> None:
    text = YAML_ROSTER.replace("key: dr.bo", "key: dr.an").replace(", dr.bo", "")
    text = text.replace("excluded: [dr.bo]", "excluded: []")
    message = _error(write(tmp_path, "roster.yaml", text))
    assert "invalid roster" in message
    assert "radiologist listed twice: dr.an" in message


def test_duplicate_station_name(tmp_path: Path) -> None:
    text = YAML_ROSTER + "  - name: hanoi-1\n"
    assert "station listed twice: hanoi-1" in _error(write(tmp_path, "roster.yaml", text))


def test_station_naming_an_unknown_radiologist(tmp_path: Path) -> None:
    text = YAML_ROSTER.replace("preferred: [dr.an]", "preferred: [dr.an, dr.zz]")
    message = _error(write(tmp_path, "roster.yaml", text))
    assert "station hanoi-1 names unknown radiologists ['dr.zz']" in message
    toml = TOML_ROSTER.replace('excluded = ["dr.bo"]', 'excluded = ["dr.bo", "dr.yy"]')
    assert "unknown radiologists ['dr.yy']" in _error(write(tmp_path, "roster.toml", toml))


def test_stations_only_file_is_not_checked_against_radiologists(tmp_path: Path) -> None:
    # documents the current rule: names are only checked when the file lists radiologists
    text = "stations:\n  - name: s1\n    preferred: [dr.zz]\n"
    roster = load_roster(write(tmp_path, "stations.yaml", text))
    assert roster.stations[0].preferred == ["dr.zz"]


def test_invalid_yaml_names_the_file_and_the_line(tmp_path: Path) -> None:
    text = "radiologists:\n  - key: dr.an\n    modalities: [CT\n"
    message = _error(write(tmp_path, "roster.yaml", text))
    assert "not valid yaml" in message
    assert "line " in message


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    message = _error(write(tmp_path, "roster.toml", '[[radiologists]]\nkey = "dr.an\n'))
    assert "not valid toml" in message
    assert "line 2" in message


def test_undecodable_file(tmp_path: Path) -> None:
    assert "not valid toml" in _error(write(tmp_path, "roster.toml", b"\xff\xfe key = 1"))


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    message = _error(write(tmp_path, "roster.yaml", "- key: dr.an\n"))
    assert "expected 'radiologists' and 'stations' at the top level" in message


def test_missing_file(tmp_path: Path) -> None:
    message = _error(tmp_path / "nowhere.yaml")
    assert message.startswith("cannot read roster ")
    assert "No such file" in message


@pytest.mark.parametrize(
    ("old", "new", "field", "why"),
    [
        ("max_concurrent: 3", "max_concurrent: -1", "radiologists.0.max_concurrent", ">= 0"),
        (
            "timezone: Asia/Ho_Chi_Minh",
            "timezone: Asia/Hanoi_City",
            "radiologists.0.timezone",
            "unknown time zone 'Asia/Hanoi_City'",
        ),
        ('end: "15:00"', 'end: "25:00"', "radiologists.0.shifts.0", "time '25:00' out of range"),
        ("days: sat,", "days: caturday,", "radiologists.0.shifts.1", "unknown day 'caturday'"),
        ("licences: [VN]", "licences: []", "radiologists.1.licences", "at least one is needed"),
        ("sla_minutes: {STAT: 20}", "sla_minutes: {STAT: 0}", "stations.0.sla_minutes", "positive"),
        ("  - key: dr.bo\n", "  - name: dr.bo\n", "radiologists.1.key", "required"),
    ],
)
def test_field_errors_name_the_file_and_the_field(
    tmp_path: Path, old: str, new: str, field: str, why: str
) -> None:
    assert old in YAML_ROSTER
    message = _error(write(tmp_path, "roster.yaml", YAML_ROSTER.replace(old, new)))
    [line] = [ln for ln in message.splitlines() if ln.strip().startswith(field + ":")]
    assert why in line


def test_every_field_error_is_listed(tmp_path: Path) -> None:
    text = YAML_ROSTER.replace("max_concurrent: 3", "max_concurrent: -1").replace(
        "modalities: [CR]", "modalities: []"
    )
    message = _error(write(tmp_path, "roster.yaml", text))
    assert "radiologists.0.max_concurrent" in message
    assert "radiologists.1.modalities" in message


def test_unquoted_yaml_times_load(tmp_path: Path) -> None:
    # YAML 1.1 reads 15:00 (not 07:00) as the base-60 number 900
    text = YAML_ROSTER.replace('start: "07:00", end: "15:00"', "start: 07:00, end: 15:00")
    text = text.replace('start: "22:00", end: "06:00"', "start: 22:00, end: 24:00")
    roster = load_roster(write(tmp_path, "roster.yaml", text))
    first, second = roster.radiologists[0].shifts
    assert first.label() == "mon-fri 07:00-15:00"
    assert second.label() == "sat 22:00-24:00 on-call"
    assert second.shifts() == [Shift(5, time(22), time(0), on_call=True)]


def test_a_bare_number_is_not_a_time(tmp_path: Path) -> None:
    text = TOML_ROSTER.replace('start = "07:00"', "start = 900")
    message = _error(write(tmp_path, "roster.toml", text))
    assert "radiologists.0.shifts.0" in message


def test_shifts_may_be_written_in_the_cli_form(tmp_path: Path) -> None:
    text = YAML_ROSTER.replace(
        """      - {days: mon-fri, start: "07:00", end: "15:00"}
      - {days: sat, start: "22:00", end: "06:00", on_call: true}""",
        """      - mon-fri 07:00-15:00
      - sat 22:00-06:00 on-call""",
    )
    assert load_roster(write(tmp_path, "roster.yaml", text)) == load_roster(
        write(tmp_path, "roster.toml", TOML_ROSTER)
    )


def test_bad_cli_form_shift_in_a_file_names_the_field(tmp_path: Path) -> None:
    text = YAML_ROSTER.replace(
        '      - {days: mon-fri, start: "07:00", end: "15:00"}', "      - mon-fri from 7 to 3"
    )
    message = _error(write(tmp_path, "roster.yaml", text))
    assert "radiologists.0.shifts" in message
    assert "write it as 'mon-fri 07:00-15:00 [on-call]'" in message
