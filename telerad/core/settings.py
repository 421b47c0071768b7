"""Settings base: a TOML file plus ``TELERAD_*`` environment variables plus command-line flags.

Precedence, highest first: command-line flag, environment variable, TOML file, default.
The TOML file holds one table per role (``[gateway]``, ``[hub]``) so one file can describe a
whole site; every key of a table is also a ``TELERAD_<KEY>`` variable and a ``--<key>`` flag.
Each role's settings class lives with its room (``dicom_gateway.station.settings``,
``reading_queue.settings``); this module only knows how to read them.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class TomlSection(PydanticBaseSettingsSource):
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


class SectionSettings(BaseSettings):
    """A role's settings: one TOML table (``_section``), ``TELERAD_*`` variables, flags."""

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
        return (init_settings, env_settings, TomlSection(settings_cls, section))
