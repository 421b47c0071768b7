"""What the durable DICOM listener needs; shared by the station gateway and the hub's inbox."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from dicom_gateway.durable.priority_rules import PriorityRule, default_priority_rules
from telerad.core.settings import SectionSettings


class ListenerSettings(SectionSettings):
    """What the DICOM listener needs; shared by the gateway and the hub's own SCP."""

    data_dir: Path = Path("telerad-data")
    aet: str = "TELERAD"
    dicom_port: int = 11112
    dicom_host: str = "0.0.0.0"
    #: ``AET`` or ``AET@HOST``; empty means any caller is accepted.
    allowed_callers: list[str] = Field(default_factory=list)
    #: Free disk kept for the OS and the database; C-STOREs beyond it get 0xA700.
    disk_reserve_mb: int = 512
    #: Seconds without a new instance after which a study counts as complete: the fallback
    #: while the sending association stays open, or when it aborted.
    quiet_period_s: float = 60.0
    #: Seconds after the association that sent a study was released (A-RELEASE), with no
    #: other open association adding to it, before the study counts as complete.
    release_settle_s: float = 5.0
    #: Refusals by a destination (4xx, checksum, conflict) before a study steps aside as
    #: ``needs attention`` (``telerad gateway retry STUDY_UID`` sends it again).
    refusal_budget: int = 3
    priority_rules: list[PriorityRule] = Field(default_factory=default_priority_rules)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: CA bundle to verify callers' certificates (mutual TLS) when set.
    tls_ca: Path | None = None
    max_associations: int = 16
    #: Associations one peer address may hold at once, out of ``max_associations``; a peer
    #: over its share is rejected (A-ASSOCIATE-RJ, local limit exceeded), others still get in.
    max_associations_per_peer: int = Field(default=4, gt=0)
    #: Seconds a new connection has to deliver its A-ASSOCIATE-RQ (and a finished one to
    #: close): the DICOM ARTIM timer. Silent and junk connections are dropped after it.
    artim_s: float = Field(default=5.0, gt=0)

    @field_validator("aet")
    @classmethod
    def _aet_length(cls, value: str) -> str:
        if not 0 < len(value) <= 16:
            raise ValueError("AE titles are 1 to 16 characters")
        return value
