"""`--set a.b.c=value` overrides and config errors that name the field path.

Shared by `train`, `validate` and `run`: a value is parsed as YAML (so `3`, `1e-3`, `true`, `null`,
`[1, 2]` and `{a: 1}` mean what they look like), a missing intermediate mapping is created, and a
path through a non-mapping is an error naming the path.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """Bad user input: one message per problem, each naming the field path. CLI exit code 2."""

    def __init__(self, problems: list[str] | str, *, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        if len(self.problems) == 1:
            text = head + self.problems[0]
        else:
            text = (
                head
                + f"{len(self.problems)} problems:\n"
                + "\n".join(f"  - {p}" for p in self.problems)
            )
        super().__init__(text)


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    # pydantic puts the discriminator tag into the location of union members
    # (model.projector.moe.top_k); drop it so the path is the one the user wrote.
    parts = [
        str(p) for p in loc if not isinstance(p, str) or p not in {"mlp", "mosa", "moe", "qformer"}
    ]
    return ".".join(parts)


def validation_problems(err: ValidationError, prefix: str = "") -> list[str]:
    """One line per error: `path.to.field: message`."""
    problems = []
    for e in err.errors(include_url=False):
        path = _loc_to_path(e["loc"])
        path = f"{prefix}.{path}" if prefix and path else (prefix or path)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        problems.append(f"{path or '<top level>'}: {msg}")
    return problems


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b.c=value` → (`a.b.c`, parsed value)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc})") from None
    return key, _yaml12_number(value)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml12_number(value: Any) -> Any:
    # PyYAML follows YAML 1.1, where `1e-3` is a string; everyone typing it means a number.
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A deep copy of `data` with every `key.path=value` applied in order."""
    out: dict[str, Any] = copy.deepcopy(dict(data))
    for item in overrides:
        key, value = parse_override(item)
        set_path(out, key, value)
    return out


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `data[a][b][c] = value` for `a.b.c`, creating missing mappings."""
    node = data
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"{dotted}: `{where}` is a {type(child).__name__}, not a mapping")
        node = child
    node[parts[-1]] = value


def get_path(data: Mapping[str, Any], dotted: str) -> Any:
    """`data[a][b][c]` for `a.b.c`; KeyError naming the path if absent."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def validate_model(model: type[M], data: Any, *, source: str | None = None, prefix: str = "") -> M:
    """`model.model_validate(data)`, with errors turned into one `ConfigError` naming each path."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(validation_problems(err, prefix), source=source) from None


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping (safe loader); ConfigError if missing or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=str(p)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping at the top level, got {type(data).__name__}", source=str(p)
        )
    return data
