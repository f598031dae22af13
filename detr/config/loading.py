"""Loading a config: YAML (``yaml.safe_load``), dotted overrides, validation into the schema.

Unknown keys and bad values are errors that name the key path, the value and what is accepted.
Relative dataset and checkpoint paths stay relative to the working directory, so a config behaves
the same from the CLI, MLproject and a notebook started in the repository root.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from detr.config.schema import Config
from detr.errors import ConfigError


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply dotted overrides.

    Relative dataset and checkpoint paths stay relative to the working directory, so a config
    behaves the same from the CLI, MLproject and a notebook started in the repository root.
    """
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        raw = _read_yaml_mapping(Path(path))
    for item in overrides:
        key, value = _parse_override(item)
        set_dotted(raw, {key: value}, source=f"override {item!r}")
    return config_from_dict(raw, source=source)


def config_from_dict(raw: Mapping[str, Any], *, source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(dict(raw))
    except ValidationError as e:
        raise ConfigError(_describe_validation_error(e, source)) from None


def read_yaml(path: Path, *, what: str = "config file") -> Any:
    """``yaml.safe_load`` of a file; a missing, unreadable or malformed file is a ConfigError that
    names the file (and the line and column of a YAML error)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what} ({e.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like 'section.key=value', e.g. 'train.lr=2e-4'")
    try:
        # YAML typing: 2e-4 -> float, true -> bool, [a, b] -> list, null -> None.
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: value {text!r} is not valid YAML") from None
    return key, value


def apply_overrides(config: Config, overrides: Mapping[str, Any], *, source: str) -> Config:
    """``config`` with dotted keys set to Python values (not YAML text), validated by the schema."""
    raw = config.to_dict()
    set_dotted(raw, overrides, source=source)
    return config_from_dict(raw, source=source)


def set_dotted(raw: dict[str, Any], overrides: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """Set dotted keys (``train.lr``) in a raw config mapping, creating unset sections on the way.

    The one implementation of dotted overrides (``-o KEY=VALUE``, search spaces, search trials). A
    key the schema does not know is a ``ConfigError`` naming the key, a close match and the keys
    accepted at that level; values are checked when the mapping is validated into a ``Config``.
    """
    for key, value in overrides.items():
        parts = key.split(".")
        node: Any = raw
        model: type[BaseModel] | None = Config
        for depth, part in enumerate(parts):
            _check_known_key(model, parts[: depth + 1], source)
            model = _field_model(model, part)
            if depth == len(parts) - 1:
                node[part] = value
                break
            child = node.get(part)
            if child is None:  # an unset optional section (e.g. data.val)
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{source}: '{'.'.join(parts[: depth + 1])}' is not a section, cannot set '{key}'")
            node = child
    return raw


def _field_model(model: type[BaseModel] | None, name: str) -> type[BaseModel] | None:
    """The section class of field ``name`` of ``model`` (None for a plain value or free dict)."""
    if model is None:
        return None
    annotation = model.model_fields[name].annotation
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _check_known_key(model: type[BaseModel] | None, parts: list[str], source: str) -> None:
    if model is None:  # inside a free-form dict (e.g. labels.rename): any key is fine
        return
    name = parts[-1]
    if name not in model.model_fields:
        raise ConfigError(_unknown_key_message(".".join(parts), name, list(model.model_fields), source))


def _unknown_key_message(path: str, name: str, accepted: list[str], source: str) -> str:
    close = difflib.get_close_matches(name, accepted, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{source}: unknown key '{path}'{hint}; accepted keys here: {', '.join(accepted)}"


def _describe_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            parent = _model_at(item["loc"][:-1])
            accepted = list(parent.model_fields) if parent else []
            lines.append(_unknown_key_message(loc, str(item["loc"][-1]), accepted, source))
            continue
        value = item.get("input")
        shown = repr(value) if not isinstance(value, dict) else "a mapping"
        lines.append(f"{source}: '{loc}' = {shown}: {item['msg']}")
    return "; ".join(lines)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Config
    for part in loc:
        if isinstance(part, int):  # an item of a list: same section class as the list
            continue
        if model is None or part not in model.model_fields:
            return None
        model = _field_model(model, part)
    return model
