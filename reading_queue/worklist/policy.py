"""The reading-queue policy: SLAs, leases, escalation and the RVU/subspecialty table.

One pydantic model so it can live in ``[hub.queue]`` of the TOML config, be overridden per
station contract, and be handed as plain data to the (pure) assignment engine.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from pydantic import BaseModel, Field, field_validator

from telerad.core.priority import Priority

PRIORITY_NAMES = ("stat", "urgent", "routine")


def _per_priority(stat: float, urgent: float, routine: float) -> dict[str, float]:
    return {"stat": stat, "urgent": urgent, "routine": routine}


class ProcedureRule(BaseModel):
    """Maps a modality + body part to the subspecialty a reader needs and its work in RVU.

    ``body_parts`` are DICOM BodyPartExamined values, compared case-insensitively, ``*``
    wildcards allowed. The first matching rule wins.
    """

    modality: str
    body_parts: list[str] = Field(default_factory=lambda: ["*"])
    #: empty: any reader of the modality may read it
    subspecialty: str = ""
    rvu: float = Field(gt=0)


def default_procedures() -> list[ProcedureRule]:
    """Professional-component RVUs of the CMS fee schedule, rounded (work is what matters)."""
    neuro = ["HEAD", "BRAIN", "SKULL", "NECK", "HEADNECK", "*SPINE", "IAC", "ORBIT", "SINUS"]
    return [
        ProcedureRule(modality="CT", body_parts=neuro, subspecialty="neuro", rvu=0.85),
        ProcedureRule(modality="CT", body_parts=["CHEST", "LUNG", "THORAX"], rvu=1.0),
        ProcedureRule(
            modality="CT", body_parts=["ABDOMEN", "PELVIS", "ABDOMENPELVIS", "*ABD*"], rvu=1.75
        ),
        ProcedureRule(modality="CT", body_parts=["WHOLEBODY", "*TRAUMA*", "POLYTRAUMA"], rvu=2.5),
        ProcedureRule(modality="CT", rvu=1.2),
        ProcedureRule(modality="MR", body_parts=neuro, subspecialty="neuro", rvu=1.5),
        ProcedureRule(modality="MR", subspecialty="msk", rvu=1.4),
        ProcedureRule(modality="CR", body_parts=["CHEST", "THORAX", "LUNG"], rvu=0.22),
        ProcedureRule(modality="DX", body_parts=["CHEST", "THORAX", "LUNG"], rvu=0.22),
        ProcedureRule(modality="CR", rvu=0.18),
        ProcedureRule(modality="DX", rvu=0.18),
        ProcedureRule(modality="US", rvu=0.6),
        ProcedureRule(modality="MG", subspecialty="breast", rvu=0.7),
    ]


class QueuePolicy(BaseModel):
    """Everything the engine needs besides the studies and readers themselves."""

    #: time from receipt to a final report, per priority (overridable per station contract)
    sla_minutes: dict[str, float] = Field(default_factory=lambda: _per_priority(30, 240, 1440))
    #: an assignment lapses unless the reader opens/renews it within this time
    lease_minutes: dict[str, float] = Field(default_factory=lambda: _per_priority(5, 15, 30))
    #: escalate (event + webhook) when this little time is left before the deadline
    escalate_minutes: dict[str, float] = Field(default_factory=lambda: _per_priority(10, 60, 240))
    #: no more pushes to a reader whose work ahead of the study would exceed this
    #: (STAT ignores it: only the concurrent-study cap holds a STAT back)
    max_backlog_minutes: float = Field(default=60.0, ge=0)
    #: weight of the fairness term: a reader busy all their recent shift time counts as this
    #: many hours of extra projected work (1.0: an hour; STAT ignores it). Measured with
    #: benchmarks/worklist_sim.py: higher evens the workload, at some cost to STAT.
    fairness_weight: float = Field(default=1.0, ge=0)
    #: minutes of projected load a station's preferred reader is forgiven
    preferred_bonus_minutes: float = Field(default=10.0, ge=0)
    #: a patient's new study goes to the reader of their studies from the last N days
    sticky_days: float = Field(default=30.0, ge=0)
    #: priorities an on-call (not on regular shift) reader is given
    on_call_priorities: list[str] = Field(default_factory=lambda: ["stat", "urgent"])
    #: calling an on-call reader must save at least this many minutes over the readers on
    #: shift (URGENT; a STAT goes to a free reader on shift first, to a free on-call reader
    #: when nobody on shift is free). 0: on-call readers compete like everyone else.
    on_call_penalty_minutes: float = Field(default=15.0, ge=0)
    #: a reader who falls free takes an unopened study from a colleague's list when they
    #: would finish it at least this many minutes sooner (STAT: 2 min, always). 0: only
    #: STAT and studies about to breach move.
    rebalance_minutes: float = Field(default=10.0, ge=0)
    #: a reader sets a non-STAT case aside to read a STAT given to them (the case stays
    #: theirs, in progress): a new STAT waits only for the STAT work ahead of it. False: a
    #: STAT waits for the case in hand like any other study.
    stat_interrupts: bool = True
    #: a STAT goes to a reader in the middle of another case only when that finishes it at
    #: least this many minutes before a free reader would (interruptions cost the set-aside
    #: case time and attention)
    interrupt_penalty_minutes: float = Field(default=2.0, ge=0)
    procedures: list[ProcedureRule] = Field(default_factory=default_procedures)
    #: RVU when no procedure rule matches the modality
    default_rvu: float = Field(default=0.5, gt=0)

    @field_validator("sla_minutes", "lease_minutes", "escalate_minutes")
    @classmethod
    def _all_priorities(cls, value: dict[str, float]) -> dict[str, float]:
        value = {k.lower(): float(v) for k, v in value.items()}
        missing = [p for p in PRIORITY_NAMES if p not in value]
        unknown = [k for k in value if k not in PRIORITY_NAMES]
        if missing or unknown:
            raise ValueError(
                f"need exactly stat, urgent and routine (missing {missing}, unknown {unknown})"
            )
        if any(v <= 0 for v in value.values()):
            raise ValueError("minutes must be positive")
        return value

    @field_validator("on_call_priorities")
    @classmethod
    def _on_call(cls, value: list[str]) -> list[str]:
        value = [v.strip().lower() for v in value]
        unknown = [v for v in value if v not in PRIORITY_NAMES]
        if unknown:
            raise ValueError(f"unknown priorities {unknown}: use stat, urgent, routine")
        return value

    def sla_s(self, priority: int, overrides: dict[str, float] | None = None) -> float:
        name = Priority(priority).label
        if overrides and name in overrides:
            return float(overrides[name]) * 60.0
        return self.sla_minutes[name] * 60.0

    def lease_s(self, priority: int) -> float:
        return self.lease_minutes[Priority(priority).label] * 60.0

    def escalate_s(self, priority: int) -> float:
        return self.escalate_minutes[Priority(priority).label] * 60.0

    def on_call_takes(self, priority: int) -> bool:
        return Priority(priority).label in self.on_call_priorities

    def classify(self, modality: str, body_part: str) -> tuple[str, float]:
        """(subspecialty, RVU) of a study from the first matching procedure rule."""
        modality = modality.strip().upper()
        part = body_part.strip().upper().replace(" ", "")
        for rule in self.procedures:
            if rule.modality.upper() != modality:
                continue
            if any(fnmatchcase(part, pat.upper().replace(" ", "")) for pat in rule.body_parts):
                return rule.subspecialty, rule.rvu
        return "", self.default_rvu
