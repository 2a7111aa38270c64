"""Reading a scenario's JSON with an error that names the exact field.

A scenario file is user input: every bad value must come back as a
``ConfigError`` saying where it is (``clustered.json: servers[2].class``)
and what was expected, never as a KeyError or a silent default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError


class Fields:
    """One JSON object under a dotted path; typed getters that validate."""

    def __init__(self, data: object, where: str, *, allowed: set[str] | None = None) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected an object, got {_describe(data)}", field=where)
        self.data: Mapping[str, Any] = data
        self.where = where
        if allowed is not None:
            unknown = sorted(set(data) - allowed)
            if unknown:
                raise ConfigError(
                    f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})",
                    field=where,
                )

    def path(self, key: str) -> str:
        return f"{self.where}.{key}"

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str) -> Any:
        if key not in self.data:
            raise ConfigError(f"{self.path(key)}: missing", field=self.path(key))
        return self.data[key]

    def number(
        self,
        key: str,
        *,
        default: float | None = None,
        minimum: float | None = None,
        positive: bool = False,
    ) -> float:
        if not self.has(key):
            if default is None:
                raise ConfigError(f"{self.path(key)}: missing (a number)", field=self.path(key))
            return default
        value = self.data[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ConfigError(
                f"{self.path(key)}: expected a finite number, got {_describe(value)}",
                field=self.path(key),
            )
        if positive and value <= 0:
            raise ConfigError(f"{self.path(key)}: must be > 0, got {value}", field=self.path(key))
        if minimum is not None and value < minimum:
            raise ConfigError(
                f"{self.path(key)}: must be >= {minimum}, got {value}", field=self.path(key)
            )
        return float(value)

    def integer(
        self,
        key: str,
        *,
        default: int | None = None,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        if not self.has(key):
            if default is None:
                raise ConfigError(f"{self.path(key)}: missing (an integer)", field=self.path(key))
            return default
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"{self.path(key)}: expected an integer, got {_describe(value)}",
                field=self.path(key),
            )
        if minimum is not None and value < minimum:
            raise ConfigError(
                f"{self.path(key)}: must be >= {minimum}, got {value}", field=self.path(key)
            )
        if maximum is not None and value > maximum:
            raise ConfigError(
                f"{self.path(key)}: must be <= {maximum}, got {value}", field=self.path(key)
            )
        return value

    def string(self, key: str, *, default: str | None = None) -> str:
        if not self.has(key):
            if default is None:
                raise ConfigError(f"{self.path(key)}: missing (a string)", field=self.path(key))
            return default
        value = self.data[key]
        if not isinstance(value, str) or not value:
            raise ConfigError(
                f"{self.path(key)}: expected a non-empty string, got {_describe(value)}",
                field=self.path(key),
            )
        return value

    def objects(self, key: str) -> list[object]:
        """A non-empty JSON array (its items are checked by the caller)."""
        value = self.raw(key)
        if not isinstance(value, list) or not value:
            raise ConfigError(
                f"{self.path(key)}: expected a non-empty list, got {_describe(value)}",
                field=self.path(key),
            )
        return value

    def child(self, key: str, *, allowed: set[str] | None = None) -> Fields:
        return Fields(self.raw(key), self.path(key), allowed=allowed)


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"
