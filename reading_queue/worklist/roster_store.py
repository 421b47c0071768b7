"""The roster in the database: radiologists and stations, one profile per row."""

from __future__ import annotations

import logging
import secrets

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from reading_queue import QueueError
from reading_queue.models import (
    Radiologist,
    Station,
    Study,
    hash_token,
)
from reading_queue.worklist.engine import (
    shift_status,
)
from reading_queue.worklist.roster import (
    RadiologistSpec,
    Roster,
    RosterError,
    StationSpec,
)
from reading_queue.worklist.store import (
    _HELD,
    ReaderStatus,
    S,
    UnknownRadiologist,
    WorklistStore,
    _radiologist_values,
    _spec,
    _station_spec,
    _station_values,
)

logger = logging.getLogger(__name__)


class RosterMixin(WorklistStore):
    """The roster in the database: radiologists and stations, one profile per row."""

    def upsert_radiologist(self, spec: RadiologistSpec) -> bool:
        """Create or update a radiologist; True when created. A lower capacity or a deactivation
        takes effect at the next round (not-started studies go back to the pool)."""
        with self.session.begin() as s:
            return self._upsert_radiologist(s, spec, self.clock())

    def _upsert_radiologist(self, s: Session, spec: RadiologistSpec, now: float) -> bool:
        values = _radiologist_values(spec)
        row = s.scalar(select(Radiologist).where(Radiologist.key == spec.key))
        if row is None:
            s.add(Radiologist(key=spec.key, created_at=now, updated_at=now, **values))
            created = True
        else:
            changed = any(getattr(row, k) != v for k, v in values.items())
            for k, v in values.items():
                setattr(row, k, v)
            if changed:
                row.updated_at = max(now, row.updated_at + 1e-6)  # claims cache by this
            created = False
        logger.info("radiologist %s %s", spec.key, "added" if created else "updated")
        return created

    def set_radiologist_active(self, key: str, active: bool) -> None:
        with self.session.begin() as s:
            res = s.execute(
                update(Radiologist)
                .where(Radiologist.key == key)
                .values(active=active, updated_at=self.clock())
            )
            if not res.rowcount:  # type: ignore[attr-defined]
                raise UnknownRadiologist(f"no radiologist {key!r}")

    def radiologist(self, key: str) -> RadiologistSpec:
        with self.read() as s:
            row = s.scalar(select(Radiologist).where(Radiologist.key == key))
            if row is None:
                raise UnknownRadiologist(f"no radiologist {key!r}")
            return _spec(row)

    def radiologists(self) -> list[RadiologistSpec]:
        with self.read() as s:
            return [_spec(r) for r in s.scalars(select(Radiologist).order_by(Radiologist.key))]

    def roster_status(self, now: float | None = None) -> list[ReaderStatus]:
        now = self.clock() if now is None else now
        with self.read() as s:
            specs = [_spec(r) for r in s.scalars(select(Radiologist).order_by(Radiologist.key))]
            loads = {
                key: (int(n), float(rvu or 0.0))
                for key, n, rvu in s.execute(
                    select(Study.assignee, func.count(), func.sum(Study.rvu))
                    .where(Study.state.in_(_HELD))
                    .group_by(Study.assignee)
                )
            }
        out = []
        for spec in specs:
            status = shift_status(spec.reader(), now)
            n, rvu = loads.get(spec.key, (0, 0.0))
            out.append(ReaderStatus(spec, status.on_shift, status.on_call, status.ends_at, n, rvu))
        return out

    def configure_station(self, spec: StationSpec) -> str | None:
        """Create or update a station's reading profile; returns a new station's upload token
        (shown once), None for an existing station (its token is kept)."""
        with self.session.begin() as s:
            return self._configure_station(s, spec)

    def _configure_station(self, s: Session, spec: StationSpec) -> str | None:
        values = _station_values(spec)
        row = s.scalar(select(Station).where(Station.name == spec.name))
        if spec.jurisdiction:
            # Studies that arrived while the station had no jurisdiction were readable by
            # no one ("needs jurisdiction"): setting it now lets them be read.
            moved = s.execute(
                update(Study)
                .where(
                    Study.station == spec.name,
                    Study.jurisdiction == "",
                    Study.state.in_([S.RECEIVED.value, S.READY.value]),
                )
                .values(jurisdiction=spec.jurisdiction, updated_at=self.clock())
            )
            count = int(getattr(moved, "rowcount", 0) or 0)
            if count:
                logger.info(
                    "station %s: jurisdiction %s set on %d waiting studies",
                    spec.name,
                    spec.jurisdiction,
                    count,
                )
        if row is not None:
            for k, v in values.items():
                setattr(row, k, v)
            return None
        token = secrets.token_urlsafe(32)
        s.add(
            Station(
                name=spec.name, token_sha256=hash_token(token), created_at=self.clock(), **values
            )
        )
        return token

    def station(self, name: str) -> StationSpec:
        with self.read() as s:
            row = s.scalar(select(Station).where(Station.name == name))
            if row is None:
                raise QueueError(f"no station {name!r}")
            return _station_spec(row)

    def stations(self) -> list[StationSpec]:
        with self.read() as s:
            return [_station_spec(r) for r in s.scalars(select(Station).order_by(Station.name))]

    def load_roster(self, roster: Roster) -> dict[str, str]:
        """Seed or update radiologists and stations, all or nothing; returns the upload tokens
        of newly created stations. Stations may name radiologists of the file or of the hub."""
        tokens: dict[str, str] = {}
        now = self.clock()
        with self.session.begin() as s:
            known = set(s.scalars(select(Radiologist.key))) | {r.key for r in roster.radiologists}
            for st in roster.stations:
                unknown = sorted(set(st.preferred + st.excluded) - known)
                if unknown:
                    raise RosterError(f"station {st.name} names unknown radiologists {unknown}")
            for spec in roster.radiologists:
                self._upsert_radiologist(s, spec, now)
            for st in roster.stations:
                token = self._configure_station(s, st)
                if token is not None:
                    tokens[st.name] = token
        return tokens

    def has_roster(self) -> bool:
        with self.read() as s:
            return s.scalar(select(func.count()).select_from(Radiologist)) != 0
