"""Stage configs: one dataclass per stage, validated on construction, JSON round-trip."""

import dataclasses
import json
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

from safeexport.errors import ConfigError


def opt(default: Any, help: str, choices: tuple | None = None,  # noqa: A002 - click's naming
        **kw) -> Any:
    """A dataclass field with its help text and, for a field that takes one of a set of names
    (each item of a list field), its ``choices`` (from safeexport.names): the docs and the
    command line read both, and ``StageConfig`` refuses any other value."""
    meta = {"help": help, **({"choices": tuple(choices)} if choices is not None else {})}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


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
        problems = problems or self.choice_problems() + self.problems()
        if problems:
            raise ConfigError("; ".join(problems))

    # keys added after runs were recorded, with the value such a run ran with: a recorded
    # config lacking one means that value, not the new default
    RECORDED_DEFAULTS: typing.ClassVar[dict[str, Any]] = {}

    def problems(self) -> list[str]:
        """Every invalid value (none by default)."""
        return []

    def choice_problems(self) -> list[str]:
        """A value (or a list's item) that is not one of its field's ``choices``."""
        out = []
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is None or (value is None and f.default is None):
                continue
            for v in (value if isinstance(value, list) else [value]):
                if v not in choices:
                    out.append(f"unknown {f.name.replace('_', ' ')} {v!r}; known: "
                               f"{', '.join(map(str, choices))}")
        return out

    @classmethod
    def choices(cls) -> dict[str, tuple]:
        """Field name -> the names it takes, for the fields that take one of a set."""
        return {f.name: f.metadata["choices"] for f in dataclasses.fields(cls)
                if "choices" in f.metadata}

    def to_dict(self) -> dict:
        """Plain JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StageConfig":
        """Inverse of ``to_dict``; unknown keys and values of the wrong type are an error (a
        typo, or a hand-written file, must not pass silently or crash a range check)."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a mapping of keys to values, got "
                              f"{type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        extra = set(d) - set(fields)
        if extra:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(extra))}")
        wrong = [f"{k} must be {type_name(fields[k].type)}, got {v!r}"
                 for k, v in d.items() if not fits(v, fields[k].type)]
        if wrong:
            raise ConfigError("; ".join(wrong))
        return cls(**d)

    @classmethod
    def from_file(cls, path: Path) -> "StageConfig":
        """A config from a JSON or YAML file: a run's recorded ``config.json`` (its ``config``
        entry) or a hand-written mapping of the same keys, at most MAX_CONFIG_BYTES. YAML is
        read with ``load_yaml`` (plain data only, its depth bounded before it is built)."""
        import yaml

        from safeexport.rundir import regular_file

        source = regular_file(path)
        try:
            with source.open("rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)
            if len(raw) > MAX_CONFIG_BYTES:
                raise ConfigError(f"larger than {MAX_CONFIG_BYTES // 1024} KiB; a config is "
                                  "a mapping of a few dozen settings")
            text = raw.decode("utf-8")
            data = (json.loads(text) if Path(path).suffix == ".json" else load_yaml(text))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
        except (OSError, ValueError, RecursionError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read it as a {Path(path).suffix[1:] or 'YAML'} "
                              f"config ({str(e).splitlines()[0]})") from e
        recorded = isinstance(data, dict) and isinstance(data.get("config"), dict) \
            and "dataset_fingerprint" in data
        try:
            # a run's config.json: the resolved config it ran with
            return cls.from_run_record(data) if recorded else cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    @classmethod
    def from_recorded(cls, d: dict) -> "StageConfig":
        """The config a run recorded (its config.json's ``config``), keys it predates filled
        with what it ran with (``RECORDED_DEFAULTS``)."""
        return cls.from_dict({**cls.RECORDED_DEFAULTS, **d} if isinstance(d, dict) else d)

    @classmethod
    def from_run_record(cls, record: dict) -> "StageConfig":
        """The config of a run's whole config.json (``from_recorded`` of its ``config``)."""
        return cls.from_recorded(record["config"])

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


def fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` (from JSON or YAML) is of the field type ``tp`` (an int is a float)."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return any(fits(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(fits(v, typing.get_args(tp)[0]) for v in value)
    if isinstance(value, bool):
        return tp is bool
    if tp is float:
        return isinstance(value, int | float)
    return isinstance(value, tp)


def type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             type(None): "null", dict: "an object", list: "a list"}
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {type_name(typing.get_args(tp)[0]).split(' ', 1)[-1]}s"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def parse_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` given on a command line: the key with dashes as underscores, the value read
    as a YAML scalar or flow list (5, 0.1, true, re2, [a, b]; text when it does not parse).
    Whether the key exists and the value fits its field is the config's check (``from_dict``).
    Raises ConfigError when there is no ``=`` or no key."""
    import yaml

    key, eq, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not eq or not key:
        raise ConfigError(f"{text!r} is not KEY=VALUE (e.g. select=random)")
    try:
        return key, load_yaml(value)
    except yaml.YAMLError:
        return key, value


MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 4  # a config is a mapping whose values are scalars or lists of them


def load_yaml(text: str) -> Any:
    """Plain data from YAML (``safe_load``: no Python objects), bounded before it is built.
    PyYAML's composer recurses once per nesting level (a deeply nested file is a
    RecursionError) and expands every alias (a few hundred bytes of "billion laughs" fill the
    memory), while its parser keeps its own stack: so the event stream is walked first, and
    aliases or nesting deeper than MAX_DEPTH raise ConfigError."""
    import yaml

    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(f"YAML aliases (*{event.anchor}) are not accepted in a config: "
                              "write the value out")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(f"nested deeper than {MAX_DEPTH} levels: a config maps "
                                  "settings to values or lists of values")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return yaml.safe_load(text)
