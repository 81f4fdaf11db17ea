"""Loading a config: a YAML file (or a dict) plus dotted `--set` overrides, validated into the typed tree of
`tuneflow.core.config`, with every problem reported at once, each naming its key (and the key meant, for a typo)."""

from __future__ import annotations

import copy
import difflib
import json
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from tuneflow.core.config import TuneflowConfig
from tuneflow.core.errors import TuneflowError


class ConfigError(TuneflowError, ValueError):
    """A config that cannot run; the message lists every problem with the key it belongs to."""


def _known_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _section_model(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the key at ``loc`` (to suggest close names for unknown keys)."""
    model: type[BaseModel] = TuneflowConfig
    for part in loc[:-1]:
        if isinstance(part, int):  # an entry of a list of sections (eval.benchmarks.0)
            continue
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if get_origin(annotation) is list and get_args(annotation):
            annotation = get_args(annotation)[0]
        if not isinstance(annotation, type) or not issubclass(annotation, BaseModel):
            return None
        model = annotation
    return model


def format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(
            p for p in e["loc"]
            # pydantic adds union members to the location (int, literal['auto'], ...): not keys a user can set
            if not (str(p).startswith(("literal[", "list[", "function-after")) or p in ("int", "float", "str", "bool"))
        )
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            owner = _section_model(loc)
            hint = ""
            if owner is not None:
                close = difflib.get_close_matches(str(loc[-1]), _known_keys(owner), n=1)
                if close:
                    hint = f" (did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?)"
            lines.append(f"{key}: unknown key{hint}")
        elif not loc:  # cross-field checks name their own keys
            lines += e["msg"].removeprefix("Value error, ").splitlines()
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg} (got {json.dumps(e.get('input'), default=str)[:80]})")
    return "\n".join(f"  - {line}" for line in dict.fromkeys(lines))


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``dotted.key=value`` to a nested dict; the value is parsed as YAML (1e-4, true, [a, b])."""
    import yaml

    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value")
    key, raw = assignment.split("=", 1)
    assign(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "", "--set")


def assign(data: dict, key: str, value: Any, said: str) -> None:
    """Set ``dotted.key`` of a nested dict to ``value`` (``said``: where the key was given, for messages)."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):  # an entry of a list of sections: datasets.1.weight
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{said} {key}: '{'.'.join(parts[:i])}' has {len(node)} entries; '{part}' is none")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"{said} {key}: '{parts[i - 1]}' is not a section")
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]


def with_values(cfg: TuneflowConfig, values: dict[str, Any], said: str = "--set") -> TuneflowConfig:
    """``cfg`` with each dotted key of ``values`` set; raise ConfigError naming every bad key."""
    data = cfg.model_dump(mode="json")
    for key, value in values.items():
        assign(data, key, value, said)
    try:
        return TuneflowConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc)) from None


def load_config(path: str | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> TuneflowConfig:
    """Read a YAML file (or a dict), apply overrides, validate; raise ConfigError naming every bad key."""
    import yaml

    raw: dict[str, Any] = copy.deepcopy(data or {})  # overrides change nested sections: never the caller's
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                loaded = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
        raw.update(loaded)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        return TuneflowConfig.model_validate(raw)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid config{where}:\n{format_errors(exc)}") from None
