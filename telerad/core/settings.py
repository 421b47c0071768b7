"""Settings base: a TOML file plus ``TELERAD_*`` environment variables plus command-line flags.

Precedence, highest first: command-line flag, environment variable, TOML file, default.
The TOML file holds one table per role (``[gateway]``, ``[hub]``) so one file can describe a
whole site; every key of a table is also a ``TELERAD_<KEY>`` variable and a ``--<key>`` flag.
Each role's settings class lives with its room (``dicom_gateway.station.settings``,
``reading_queue.settings``); this module only knows how to read them.

Closed by default: a key of the role's table (and of its nested tables) that no setting
knows is an error naming the key and the file, never a silent fallback to the default, which
would hide a typo such as ``quiet_perod_s``. Environment variables are not checked: other
tools share the ``TELERAD_`` prefix, and a variable nobody reads is harmless.
"""

from __future__ import annotations

import difflib
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class SettingsError(ValueError):
    """The configuration cannot be used as written (unknown key, unreadable file...)."""


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The pydantic model a field holds, and whether it holds a list of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (list, tuple, set, frozenset) and args:
        model, _ = _model_of(args[0])
        return model, model is not None
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            model, many = _model_of(arg)
            if model is not None:
                return model, many
    return None, False


def _field_names(fields: Mapping[str, FieldInfo]) -> dict[str, str]:
    """Every key a table may use (field names and string aliases) -> the field name."""
    names: dict[str, str] = {}
    for name, field in fields.items():
        names[name] = name
        for alias in (field.alias, field.validation_alias):
            if isinstance(alias, str):
                names[alias] = name
    return names


def unknown_keys(
    model: type[BaseModel],
    data: Mapping[str, Any],
    table: str,
    nested: Mapping[str, type[BaseModel]] | None = None,
    *,
    label: str | None = None,
) -> list[tuple[str, str]]:
    """Where ``data`` (the TOML table ``table`` for ``model``) uses keys ``model`` does not
    know: ``("unknown key 'x' in [table]", " (did you mean 'y'?)")`` per key, the hint empty
    when no key is close.

    Nested tables (``[hub.queue]``) and arrays of tables (``[[gateway.destinations]]``) are
    checked against their own models. ``nested`` names models for fields typed ``Any``.
    """
    where = label or f"[{table}]"
    fields = model.model_fields
    names = _field_names(fields)
    problems: list[tuple[str, str]] = []
    for key, value in data.items():
        name = names.get(key)
        if name is None:
            guess = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f" (did you mean '{guess[0]}'?)" if guess else ""
            problems.append((f"unknown key '{key}' in {where}", hint))
            continue
        sub, many = _model_of(fields[name].annotation)
        if nested and name in nested:
            sub, many = nested[name], False
        if sub is None:
            continue
        path = f"{table}.{key}"
        if not many and isinstance(value, Mapping):
            problems += unknown_keys(sub, value, path)
        elif many and isinstance(value, list):
            for i, item in enumerate(value, start=1):
                if isinstance(item, Mapping):
                    problems += unknown_keys(sub, item, path, label=f"[[{path}]] #{i}")
    return problems


class TomlSection(PydanticBaseSettingsSource):
    """Reads one table of the TOML file named by ``TELERAD_CONFIG`` (or ``--config``).

    Only the role's own table is read and checked: the same file holds the other roles'.
    """

    def __init__(self, settings_cls: type[BaseSettings], section: str) -> None:
        super().__init__(settings_cls)
        self.section = section

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("TELERAD_CONFIG")
        if not path:
            return {}
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise SettingsError(f"cannot read {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{path} is not valid TOML: {exc}") from None
        section = data.get(self.section, {})
        if not isinstance(section, dict):
            raise SettingsError(f"[{self.section}] in {path} must be a table")
        nested = getattr(self.settings_cls, "nested_tables", None)
        problems = unknown_keys(self.settings_cls, section, self.section, nested)
        if problems:
            raise SettingsError("; ".join(f"{p} of {path}{hint}" for p, hint in problems))
        return section


class SectionSettings(BaseSettings):
    """A role's settings: one TOML table (``_section``), ``TELERAD_*`` variables, flags."""

    model_config = SettingsConfigDict(env_prefix="TELERAD_", extra="ignore")
    _section = ""
    #: Fields typed ``Any`` that hold a table of their own (checked for unknown keys).
    nested_tables: ClassVar[dict[str, type[BaseModel]]] = {}

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
