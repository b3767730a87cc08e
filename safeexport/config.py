"""Stage configs: one dataclass per stage, validated on construction, JSON round-trip."""

import dataclasses
import json
import math
from dataclasses import field
from typing import Any

from safeexport.errors import ConfigError


def opt(default: Any, help: str, **kw) -> Any:  # noqa: A002 - mirrors click's naming
    """A dataclass field with its help text (shared by the docs and the CLI)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


class StageConfig:
    """Mixin of every stage's config dataclass: validation hook and JSON round-trip.

    A subclass defines ``problems()`` returning every invalid value with what is allowed; all of
    them are reported at once in one ConfigError.
    """

    def __post_init__(self) -> None:
        # NaN compares false with everything, so range checks would let it through (and a
        # NaN tolerance disables the check it sets): non-finite numbers are refused first.
        problems = [f"{f.name} must be a finite number, got {getattr(self, f.name)}"
                    for f in dataclasses.fields(self)
                    if isinstance(getattr(self, f.name), float)
                    and not math.isfinite(getattr(self, f.name))]
        problems = problems or self.problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every invalid value (none by default)."""
        return []

    def to_dict(self) -> dict:
        """Plain JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StageConfig":
        """Inverse of ``to_dict``; unknown keys are an error (a typo must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - known
        if extra:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(extra))}")
        return cls(**d)

    def to_json(self) -> str:
        """JSON text of the config."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "StageConfig":
        """Parse ``to_json`` output."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def help_texts(cls) -> dict[str, str]:
        """Field name → help text."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
