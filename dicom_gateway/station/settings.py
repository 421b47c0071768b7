"""The station gateway's settings: the ``[gateway]`` table."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from dicom_gateway.durable.settings import ListenerSettings


class DicomDestination(BaseModel):
    """A DICOM peer (PACS) that receives every study by C-STORE (destination type ``dicom``)."""

    name: str
    aet: str
    host: str
    port: int
    calling_aet: str | None = None
    tls: bool = False


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
