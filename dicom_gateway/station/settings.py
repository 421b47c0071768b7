"""The station gateway's settings: the ``[gateway]`` table."""

from __future__ import annotations

import ipaddress
import logging
import stat
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dicom_gateway.durable.settings import ListenerSettings

logger = logging.getLogger(__name__)


class DicomDestination(BaseModel):
    """A DICOM peer (PACS) that receives every study by C-STORE (destination type ``dicom``)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    aet: str
    host: str
    port: int
    calling_aet: str | None = None
    #: C-STORE over DICOM TLS; the peer's certificate is verified against ``ca`` (or the
    #: system's CAs) and must name ``host`` (or ``tls_server_name``).
    tls: bool = False
    #: CA bundle (PEM) that signed the peer's certificate.
    ca: Path | None = None
    #: Our client certificate and key, for peers that require mutual TLS.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: The name the peer's certificate carries, when it differs from ``host``.
    tls_server_name: str | None = None

    @model_validator(mode="after")
    def _tls_options(self) -> Self:
        used = [
            k
            for k in ("ca", "tls_cert", "tls_key", "tls_server_name")
            if getattr(self, k) is not None
        ]
        if used and not self.tls:
            raise ValueError(
                f"destination {self.name!r}: {', '.join(used)} given but tls = false; "
                "set tls = true to send over DICOM TLS"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"destination {self.name!r}: give both tls_cert and tls_key")
        return self


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 and ::1: addresses that never leave this machine."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GatewaySettings(ListenerSettings):
    _section = "gateway"
    aet: str = "TELERAD_GW"
    hub_url: str | None = None
    #: The station token; prefer ``token_file`` or ``TELERAD_TOKEN`` (a flag shows in ``ps``).
    token: str | None = None
    #: File holding the station token (surrounding whitespace is ignored); keep it mode 0600.
    token_file: Path | None = None
    #: Allow an ``http://`` hub URL outside loopback: the token and the studies would cross
    #: the network in clear text. Only for a link that is encrypted by other means (VPN).
    insecure_http: bool = False
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

    @model_validator(mode="after")
    def _token_from_file(self) -> Self:
        if self.token_file is None:
            return self
        if self.token:
            raise ValueError(
                "both token and token_file are set: keep one (token_file is preferred)"
            )
        path = self.token_file
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"token_file {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ValueError(f"token_file {path} is not a text file") from None
        token = text.strip()
        if not token:
            raise ValueError(f"token_file {path} is empty")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning(
                "token_file %s is readable by other users (mode %o): chmod 600 it",
                path,
                stat.S_IMODE(mode),
            )
        self.token = token
        return self

    @model_validator(mode="after")
    def _hub_url_is_private(self) -> Self:
        if not self.hub_url:
            return self
        parts = urlsplit(self.hub_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"hub_url {self.hub_url!r}: use https://HOST[:PORT]")
        if parts.scheme != "http" or is_loopback(parts.hostname):
            return self
        if self.insecure_http:
            logger.warning(
                "hub %s is reached by plain http:// (insecure_http): the station token and "
                "the studies travel unencrypted",
                parts.hostname,
            )
        else:
            raise ValueError(
                f"hub_url {self.hub_url!r} is plain http:// to another machine: the station "
                "token and the studies would travel unencrypted. Use https:// (the hub's "
                "https_cert/https_key), or set insecure_http (--insecure-http) when the "
                "link is encrypted otherwise (VPN)"
            )
        return self
