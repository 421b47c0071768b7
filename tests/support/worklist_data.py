"""Worklist test data: studies arrive the way the hub's ingest hands them over.

``announce_studies`` writes what ``IngestService.commit`` writes (a committed ``HubStudy``
and a ``study_received`` outbox event) so the worklist's real intake path consumes them.
Used by the worklist tests and benchmarks/assign_speed.py.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import insert
from sqlalchemy.engine import Engine

from reading_queue.models import HubStudy, StudyEvent
from reading_queue.worklist.roster import RadiologistSpec, ShiftSpec, StationSpec

ALWAYS = [ShiftSpec(days="daily", start="00:00", end="24:00")]


@dataclass(frozen=True)
class NewStudy:
    uid: str
    station: str
    modality: str = "CR"
    body_part: str = "CHEST"
    priority: int = 2
    instances: int = 1


def announce_studies(engine: Engine, studies: Sequence[NewStudy], at: float) -> None:
    """Commit ``studies`` at the hub as ingest does (no files: the worklist only needs rows)."""
    hub_rows = [
        {
            "study_uid": st.uid,
            "station": st.station,
            "modality": st.modality,
            "body_part": st.body_part,
            "priority": st.priority,
            "state": "committed",
            "instance_count": st.instances,
            "bytes": 0,
            "first_received": at,
            "committed_at": at,
            "commit_count": 1,
        }
        for st in studies
    ]
    events = [
        {
            "study_uid": st.uid,
            "kind": "study_received",
            "payload": json.dumps(
                {
                    "station": st.station,
                    "priority": st.priority,
                    "instance_count": st.instances,
                    "new_instances": st.instances,
                    "commit_count": 1,
                }
            ),
            "created_at": at,
        }
        for st in studies
    ]
    with engine.begin() as conn:
        for i in range(0, len(studies), 1000):
            conn.execute(insert(HubStudy), hub_rows[i : i + 1000])
            conn.execute(insert(StudyEvent), events[i : i + 1000])


def reader(key: str, **kw: object) -> RadiologistSpec:
    base: dict[str, object] = {
        "key": key,
        "modalities": ["CR", "CT"],
        "licences": ["VN"],
        "languages": ["vi"],
        "subspecialties": ["neuro"],
        "shifts": ALWAYS,
        "max_concurrent": 3,
        "rvu_per_hour": 8.0,
        "timezone": "Asia/Ho_Chi_Minh",
    }
    base.update(kw)
    return RadiologistSpec.model_validate(base)


def station(name: str, **kw: object) -> StationSpec:
    base: dict[str, object] = {"name": name, "jurisdiction": "VN-HN", "language": "vi"}
    base.update(kw)
    return StationSpec.model_validate(base)


def synthetic_load(
    n_studies: int, n_readers: int, seed: int = 1
) -> tuple[list[RadiologistSpec], list[StationSpec], list[NewStudy]]:
    """A large, mixed worklist: Vietnamese and Cambodian stations, CR and CT, 3 priorities."""
    rng = random.Random(seed)
    stations = [
        station(f"vn-{i:03d}", jurisdiction=rng.choice(["VN-HN", "VN-SG", "VN-31"]))
        for i in range(40)
    ] + [station(f"kh-{i:03d}", jurisdiction="KH-12", language="km") for i in range(20)]
    readers = []
    for i in range(n_readers):
        licences = rng.choice([["VN"], ["KH"], ["VN", "KH"], ["VN-HN"]])
        languages = ["vi", "en"] if "VN" in licences[0] else ["km", "en"]
        if len(licences) == 2:
            languages = ["vi", "km", "en"]
        readers.append(
            reader(
                f"dr-{i:03d}",
                licences=licences,
                languages=languages,
                subspecialties=["neuro"] if rng.random() < 0.4 else [],
                max_concurrent=rng.choice([3, 4, 5]),
                rvu_per_hour=rng.choice([6.0, 8.0, 10.0]),
            )
        )
    studies = []
    for i in range(n_studies):
        ct = rng.random() < 0.3
        st = rng.choice(stations)
        prio = 0 if rng.random() < 0.1 else (1 if rng.random() < 0.17 else 2)
        studies.append(
            NewStudy(
                uid=f"2.25.{seed}.{i}",
                station=st.name,
                modality="CT" if ct else "CR",
                body_part=rng.choice(["HEAD", "CHEST", "ABDOMEN"]) if ct else "CHEST",
                priority=prio,
            )
        )
    return readers, stations, studies
