"""Configuration: a TOML file plus ``TELERAD_*`` environment variables plus command-line flags.

Precedence, highest first: command-line flag, environment variable, TOML file, default.
The TOML file holds one table per role (``[gateway]``, ``[hub]``) so one file can describe a
whole site; every key of a table is also a ``TELERAD_<KEY>`` variable and a ``--<key>`` flag.
"""

from __future__ import annotations

import os
import tomllib
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

if TYPE_CHECKING:
    from reading_queue.policy import QueuePolicy


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


class DicomDestination(BaseModel):
    """A DICOM peer (PACS) that receives every study by C-STORE (destination type ``dicom``)."""

    name: str
    aet: str
    host: str
    port: int
    calling_aet: str | None = None
    tls: bool = False


class _TomlSection(PydanticBaseSettingsSource):
    """Reads one table of the TOML file named by ``TELERAD_CONFIG`` (or ``--config``)."""

    def __init__(self, settings_cls: type[BaseSettings], section: str) -> None:
        super().__init__(settings_cls)
        self.section = section

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("TELERAD_CONFIG")
        if not path:
            return {}
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        section = data.get(self.section, {})
        if not isinstance(section, dict):
            raise ValueError(f"[{self.section}] in {path} must be a table")
        return section


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TELERAD_", extra="ignore")
    _section = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        section = str(cls._section.default)  # type: ignore[attr-defined]
        return (init_settings, env_settings, _TomlSection(settings_cls, section))


class ListenerSettings(_Settings):
    """What the DICOM listener needs; shared by the gateway and the hub's own SCP."""

    data_dir: Path = Path("telerad-data")
    aet: str = "TELERAD"
    dicom_port: int = 11112
    dicom_host: str = "0.0.0.0"
    #: ``AET`` or ``AET@HOST``; empty means any caller is accepted.
    allowed_callers: list[str] = Field(default_factory=list)
    #: Free disk kept for the OS and the database; C-STOREs beyond it get 0xA700.
    disk_reserve_mb: int = 512
    #: Seconds without a new instance after which a study counts as complete.
    quiet_period_s: float = 60.0
    priority_rules: list[PriorityRule] = Field(default_factory=default_priority_rules)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: CA bundle to verify callers' certificates (mutual TLS) when set.
    tls_ca: Path | None = None
    max_associations: int = 16

    @field_validator("aet")
    @classmethod
    def _aet_length(cls, value: str) -> str:
        if not 0 < len(value) <= 16:
            raise ValueError("AE titles are 1 to 16 characters")
        return value


class GatewaySettings(ListenerSettings):
    _section = "gateway"
    aet: str = "TELERAD_GW"
    hub_url: str | None = None
    token: str | None = None
    #: Station name, reported to the hub for logs; the token identifies the station.
    station: str | None = None
    #: HTTP port for /healthz and /metrics (0 = pick a free port, -1 = off).
    http_port: int = 8105
    http_host: str = "127.0.0.1"
    #: Extra C-STORE destinations (hospital PACS and the like).
    destinations: list[DicomDestination] = Field(default_factory=list)
    retention_days: float = 7.0
    #: Largest bundle (raw bytes) packed for one resumable upload.
    bundle_max_mb: int = 16
    #: Bytes per PATCH piece; pre-emption by a more urgent study happens between pieces.
    chunk_kb: int = 256
    retry_max_s: float = 300.0
    #: CA bundle to verify the hub's certificate (``https://`` hub URLs).
    hub_ca: Path | None = None


class HubSettings(ListenerSettings):
    _section = "hub"
    aet: str = "TELERAD_HUB"
    dicom_port: int = 11113
    http_port: int = 8100
    http_host: str = "0.0.0.0"
    archive: Literal["filesystem", "orthanc"] = "filesystem"
    orthanc_url: str = "http://127.0.0.1:8042"
    orthanc_user: str | None = None
    orthanc_password: str | None = None
    #: SQLAlchemy URL; SQLite under ``data_dir`` when unset.
    database_url: str | None = None
    #: Partial uploads nobody resumed for this long are dropped (the gateway re-uploads).
    upload_expiry_s: float = 7 * 24 * 3600.0
    #: Serve the upload protocol over HTTPS with this certificate and key.
    https_cert: Path | None = None
    https_key: Path | None = None
    #: ``push``: the hub assigns studies as they arrive and as capacity frees;
    #: ``pull``: radiologists take the next study themselves (leases, escalation and
    #: releases run in both modes).
    assignment_mode: Literal["push", "pull"] = "push"
    #: Seconds between worklist rounds (new studies trigger one at once).
    queue_interval_s: float = 15.0
    #: URLs that receive escalations as JSON POSTs (retried until they answer 2xx).
    escalation_webhooks: list[str] = Field(default_factory=list)
    #: URLs that receive every STAT handed to a reader by a round or an admin (a pager, the
    #: viewer): JSON POSTs, retried until they answer 2xx.
    stat_webhooks: list[str] = Field(default_factory=list)
    #: Roster (radiologists and stations) loaded at start when set: YAML or TOML.
    roster_file: Path | None = None
    #: SLAs, leases, escalation, RVU table: the ``[hub.queue]`` table.
    queue: Any = None

    @field_validator("queue", mode="before")
    @classmethod
    def _queue_policy(cls, value: Any) -> Any:
        from reading_queue.policy import QueuePolicy

        if value is None:
            return QueuePolicy()
        if isinstance(value, QueuePolicy):
            return value
        return QueuePolicy.model_validate(value)

    @property
    def queue_policy(self) -> QueuePolicy:
        policy: QueuePolicy = self.queue
        return policy

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'hub.sqlite3').resolve()}"
