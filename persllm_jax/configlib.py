"""Typed, frozen config dataclasses from YAML files and dotted `key=value` overrides.

Unknown keys are errors that name the key and list the valid ones; values are checked against
the field's type. Used by every CLI command; the library itself takes the dataclasses.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the config dataclasses."""


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if value is None:
            return annotation()
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {annotation.__name__}, got {value!r}")
        return from_dict(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if annotation is Any:
        return value
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        return tuple(_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    types_ = _field_types(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in types_:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {', '.join(valid)}")
        kwargs[key] = _coerce(value, types_[key], path)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def to_dict(config) -> dict:
    def convert(value):
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        return value

    return convert(config)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Set dotted keys (`train.max_steps=8`) in a nested dict; values are parsed as YAML."""
    data = dict(data)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        key, raw = override.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return data


def load(cls, path: str | Path | None = None, overrides: Sequence[str] = ()):
    """Load a config: the YAML file (if any), then the overrides, into dataclass `cls`."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from err
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        config = from_dict(cls, apply_overrides(data, overrides))
    except ConfigError as err:
        raise ConfigError(_blame(cls, path, data, overrides, err)) from err
    return config


def _blame(cls, path, data: dict, overrides: Sequence[str], err: ConfigError) -> str:
    """`err` said of where it comes from: the first command-line override that brings it in, or
    the YAML file when the file alone is already wrong."""
    for count in range(len(overrides) + 1):
        try:
            from_dict(cls, apply_overrides(data, overrides[:count]))
        except ConfigError as partial:
            if count == 0:
                return f"{path}: {partial}" if path else str(partial)
            return f"command-line override {overrides[count - 1]!r}: {partial}"
    return f"{path}: {err}" if path else str(err)


def dump(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
