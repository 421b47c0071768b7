"""The hub's settings: the ``[hub]`` table (and its ``[hub.queue]`` policy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator

from dicom_gateway.durable.settings import ListenerSettings
from reading_queue.worklist.policy import QueuePolicy


class HubSettings(ListenerSettings):
    _section = "hub"
    nested_tables: ClassVar[dict[str, type[BaseModel]]] = {"queue": QueuePolicy}
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
    #: Serve the OpenAPI schema and its pages (/docs, /redoc, /openapi.json); off by default:
    #: the API is for stations and tools, and the schema maps it for anyone who asks.
    api_docs: bool = False
    #: ``-1``: /metrics on the main HTTP app; ``0`` or a port: /metrics only on a separate
    #: plain-HTTP listener on ``metrics_host`` (``0`` = any free port), not on the main app.
    metrics_port: int = -1
    metrics_host: str = "127.0.0.1"
    #: Largest JSON request body (manifests, commits) in KiB, refused with 413 before it is
    #: parsed; a 5,000-instance manifest is ~600 KiB. tus bundle uploads have their own limit.
    max_json_body_kb: int = Field(default=8 * 1024, gt=0)
    #: Web origins (``https://viewer.example.org``) whose pages may call the people's API and
    #: DICOMweb from the browser (CORS, with credentials). Empty: none; a page on the hub's
    #: own origin (the OHIF viewer it serves) needs nothing. ``*`` is refused: these answers
    #: are patient data.
    cors_origins: list[str] = Field(default_factory=list)
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

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        out = []
        for origin in value:
            parts = urlsplit(origin)
            if (
                parts.scheme not in ("http", "https")
                or not parts.hostname
                or parts.path not in ("", "/")
                or parts.query
                or parts.fragment
                or parts.username
            ):
                raise ValueError(
                    f"cors_origins: {origin!r} is not an origin like https://viewer.example.org"
                )
            out.append(f"{parts.scheme}://{parts.netloc}".lower())
        return out

    @field_validator("queue", mode="before")
    @classmethod
    def _queue_policy(cls, value: Any) -> Any:
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
