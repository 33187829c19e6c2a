"""Typed configs: dataclass fields become CLI options, TOML/YAML files fill them, JSON records them.

Precedence: dataclass default < config file (`--config`) < an option given on the command line.
Each field carries its help text in `metadata["help"]`; `option()` builds such a field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

import tomllib

from cfdg.errors import UserError


def option(default: Any, help: str, **metadata: Any) -> Any:
    """Declare a config field with its default and help text (unit and meaning)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help, **metadata}
        )
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def _base_type(annotation: Any) -> tuple[type, bool]:
    """Return (scalar type, optional) for annotations like `int`, `float | None`, `str`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}: use true or false")


def add_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one `--field-name` option per dataclass field, with its help text and default."""
    hints = _field_types(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip or field.metadata.get("cli") is False:
            continue
        flag = "--" + field.name.replace("_", "-")
        scalar, _ = _base_type(hints[field.name])
        default = (
            field.default if field.default is not dataclasses.MISSING else field.default_factory()
        )
        # argparse expands %-formats in help strings, so a literal % must be doubled.
        help_text = field.metadata.get("help", "").replace("%", "%%")
        shown = "none" if default is None else default
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": field.name}
        if scalar is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["help"] = f"{help_text} (default: {'on' if default else 'off'})"
        else:
            kwargs["type"] = field.metadata.get("parse", scalar)
            kwargs["metavar"] = field.metadata.get("metavar", scalar.__name__.upper())
            if "choices" in field.metadata:
                kwargs["choices"] = field.metadata["choices"]
            kwargs["help"] = f"{help_text} (default: {shown})"
        parser.add_argument(flag, **kwargs)


def read_config_file(path: str | os.PathLike, section: str | None = None) -> dict[str, Any]:
    """Read a TOML, YAML or JSON file of options; the table `section` overrides the top level."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"config file {path} is not UTF-8 text: {err}") from None
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"invalid TOML in {path}: {err}") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise UserError(f"invalid YAML in {path}: {err}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"invalid JSON in {path}: {err}") from None
    else:
        raise UserError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    if not isinstance(data, dict):
        raise UserError(
            f"config file {path} must contain a table of options, got {type(data).__name__}"
        )
    # Top-level keys apply to every command; a table named after the command overrides them,
    # and other tables belong to other commands.
    merged = {key: value for key, value in data.items() if not isinstance(value, dict)}
    if section and isinstance(data.get(section), dict):
        merged.update(data[section])
    return {key.replace("-", "_"): value for key, value in merged.items()}


def build(
    cls: type,
    values: dict[str, Any] | argparse.Namespace,
    config_path: str | None = None,
    section: str | None = None,
) -> Any:
    """Build `cls` from defaults, then the config file, then explicit `values` (CLI options).

    Raises:
        UserError: for an unknown key in the config file, naming the allowed keys.
    """
    if isinstance(values, argparse.Namespace):
        values = vars(values)
    names = {f.name for f in dataclasses.fields(cls)}
    merged: dict[str, Any] = {}
    if config_path:
        from_file = read_config_file(config_path, section)
        unknown = sorted(set(from_file) - names - {"command"})
        if unknown:
            raise UserError(
                f"unknown option(s) {', '.join(unknown)} in {config_path}; "
                f"allowed: {', '.join(sorted(names))}"
            )
        hints = _field_types(cls)
        for key, value in from_file.items():
            if key in names:
                merged[key] = _check_file_value(key, value, hints[key], config_path)
    merged.update({k: v for k, v in values.items() if k in names})
    return cls(**merged)


def _check_file_value(key: str, value: Any, annotation: Any, path: str) -> Any:
    """Return a config-file value converted to the field's type, or raise UserError.

    Command-line flags are converted by argparse. Values from TOML, YAML or JSON arrive with the
    file's own types, so `"false"` or `"ten"` must be caught here.
    """
    scalar, optional = _base_type(annotation)
    where = f"option {key!r} in {path}"
    if value is None:
        if optional:
            return None
        raise UserError(f"{where} must not be empty; give a {scalar.__name__} or remove it")
    if scalar is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return _parse_bool(value)
            except argparse.ArgumentTypeError:
                pass
        raise UserError(f"{where} must be true or false, got {value!r}")
    if scalar is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{where} must be an integer, got {value!r}")
    if scalar is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{where} must be a number, got {value!r}")
    if scalar is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float, list)) and not isinstance(value, bool):
            # Lists such as `w = [0, 1, 3]` or `classes = [0, 3]` are parsed by the command.
            return value if isinstance(value, list) else str(value)
        raise UserError(f"{where} must be a string, got {value!r}")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """Return a JSON-ready dict of a config dataclass (paths become strings)."""
    out = dataclasses.asdict(config)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}


def save_json(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `data` as indented JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path
