"""The sweep spec: what a `sweeps/*.yaml` file says, typed and checked before anything runs.

```yaml
name: moe-experts
base: trials/tiny-digits.yaml          # a trial config, inline or a path relative to this file
search:
  metric: eval/wer                     # or a list, with a list of modes (multi-objective)
  mode: min
  algorithm: tpe                       # tpe | random | grid | cmaes
  num_samples: 16                      # with grid: how many times each grid point runs (default 1)
  max_concurrent: 4
  scheduler: {type: asha, grace_period: 200, reduction_factor: 3}   # or {type: none}
  space: {train.lr: {loguniform: [1.0e-4, 3.0e-3]}, model.projector.type: {choice: [mlp, moe]}}
  when: {moe: {model.projector.top_k: {choice: [1, 2]}}}
resources: {cpus_per_trial: 1, gpus_per_trial: 0.5, workers_per_trial: 1}
```

`load_sweep_spec` reads the file, inlines `base`, applies `--set` overrides (paths from the spec's
top level; inside `search.space` / `search.when.<type>` the rest of the path is one dotted key) and
checks the schema; `orchestration.space.check_space` then checks the space against the trial schema.
Every problem is a `ConfigError` naming the field path (CLI exit 2).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from projectors.config import PROJECTOR_TYPES
from trainer.config import TrialConfig
from trainer.overrides import ConfigError, parse_override, read_yaml_mapping

PositiveInt = Annotated[int, Field(gt=0)]
Mode = Literal["min", "max"]
Algorithm = Literal["tpe", "random", "grid", "cmaes"]

TYPE_PATH = "model.projector.type"
"""The space key that makes a space conditional (`when:` entries are keyed by its values)."""

CONTRACT_METRICS = frozenset(
    {
        "train/loss", "train/lm_loss", "train/aux_loss", "train/balance_loss", "train/z_loss",
        "train/lr", "train/grad_norm", "train/samples_per_s", "train/audio_s_per_s",
        "train/tokens_per_s", "eval/loss", "eval/wer", "eval/cer", "router/entropy",
        "sys/peak_mem_mb", "model/projector_params",
    }
)  # fmt: skip
_EXPERT_LOAD = re.compile(r"router/load/expert_\d+")


def is_contract_metric(name: str) -> bool:
    return name in CONTRACT_METRICS or bool(_EXPERT_LOAD.fullmatch(name))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- distributions: a mapping with exactly one key naming the kind ---------------------------


class Choice(_Strict):
    """One of the listed values, sampled by the search algorithm."""

    choice: Annotated[list[Any], Field(min_length=1)]

    @property
    def values(self) -> list[Any]:
        return self.choice


class Grid(_Strict):
    """Every listed value (algorithm `grid` only)."""

    grid: Annotated[list[Any], Field(min_length=1)]

    @property
    def values(self) -> list[Any]:
        return self.grid


def _ordered(bounds: tuple[float, float]) -> None:
    if bounds[0] >= bounds[1]:
        raise ValueError(f"low ({bounds[0]}) must be < high ({bounds[1]})")


class Uniform(_Strict):
    uniform: tuple[float, float]

    @property
    def bounds(self) -> tuple[float, float]:
        return self.uniform

    @model_validator(mode="after")
    def _valid(self) -> Uniform:
        _ordered(self.uniform)
        return self


class LogUniform(_Strict):
    loguniform: tuple[float, float]

    @property
    def bounds(self) -> tuple[float, float]:
        return self.loguniform

    @model_validator(mode="after")
    def _valid(self) -> LogUniform:
        if self.loguniform[0] <= 0:
            raise ValueError(f"low ({self.loguniform[0]}) must be > 0 on a log scale")
        _ordered(self.loguniform)
        return self


class RandInt(_Strict):
    """An integer in [low, high], both ends included (Optuna's `suggest_int`)."""

    randint: tuple[int, int]

    @property
    def bounds(self) -> tuple[int, int]:
        return self.randint

    @model_validator(mode="after")
    def _valid(self) -> RandInt:
        _ordered(self.randint)
        return self


DISTRIBUTION_KINDS = ("choice", "uniform", "loguniform", "randint", "grid")


def _distribution_kind(value: Any) -> str | None:
    if isinstance(value, dict) and len(value) == 1:
        return next(iter(value))
    if isinstance(value, BaseModel):
        return next(iter(type(value).model_fields))
    return None


Distribution = Annotated[
    Annotated[Choice, Tag("choice")]
    | Annotated[Uniform, Tag("uniform")]
    | Annotated[LogUniform, Tag("loguniform")]
    | Annotated[RandInt, Tag("randint")]
    | Annotated[Grid, Tag("grid")],
    Discriminator(
        _distribution_kind,
        custom_error_type="distribution",
        custom_error_message="expected one of {choice: [...]}, {uniform: [low, high]}, "
        "{loguniform: [low, high]}, {randint: [low, high]}, {grid: [...]}",
    ),
]
Space = dict[str, Distribution]


def kind_of(dist: Choice | Uniform | LogUniform | RandInt | Grid) -> str:
    return next(iter(type(dist).model_fields))


# --- the spec ----------------------------------------------------------------------------------


class AshaScheduler(_Strict):
    """Asynchronous successive halving on the optimiser step; max_t is the trials' max_steps."""

    type: Literal["asha"]
    grace_period: PositiveInt = 100
    """Steps every trial runs before it can be stopped."""
    reduction_factor: Annotated[float, Field(gt=1.0)] = 3.0
    metric: str | None = None
    """What to stop on (default: the search's first metric). A smooth proxy such as `eval/loss`
    separates trials earlier than WER, which stays near 1 for the first few hundred steps."""
    mode: Mode | None = None
    """`min` or `max` for `metric` (required with it)."""

    @model_validator(mode="after")
    def _mode_with_metric(self) -> AshaScheduler:
        if (self.metric is None) != (self.mode is None):
            raise ValueError("give `metric` and `mode` together (or neither)")
        return self


class NoScheduler(_Strict):
    type: Literal["none"]


class SearchSpec(_Strict):
    metric: str | Annotated[list[str], Field(min_length=1)]
    mode: Mode | Annotated[list[Mode], Field(min_length=1)]
    algorithm: Algorithm = "tpe"
    num_samples: PositiveInt | None = None
    """Trials to run; with `grid`, how many times each grid point runs (default 1)."""
    max_concurrent: PositiveInt | None = None
    """At most this many trials at once (default: as many as resources allow)."""
    seed: int = 0
    """Seed of the search algorithm's sampler."""
    scheduler: Annotated[AshaScheduler | NoScheduler, Field(discriminator="type")] = Field(
        default_factory=lambda: NoScheduler(type="none")
    )
    space: Space
    when: dict[str, Space] = Field(default_factory=dict)
    """Per projector type: fields sampled only when `model.projector.type` is that type."""
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    """Points tried first, in order (e.g. the base config's known-good corner), before the
    algorithm samples: each maps space paths (and its type's `when` paths) to values; paths left
    out are sampled. Counted in `num_samples`. Not with `grid`, which enumerates its own."""

    @property
    def metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def modes(self) -> list[str]:
        return [self.mode] if isinstance(self.mode, str) else list(self.mode)

    @property
    def is_multi_objective(self) -> bool:
        return len(self.metrics) > 1


class ResourcesSpec(_Strict):
    cpus_per_trial: Annotated[float, Field(gt=0.0)] = 1.0
    gpus_per_trial: Annotated[float, Field(ge=0.0)] = 0.0
    """Fractional values below 1 share a GPU between trials."""
    workers_per_trial: PositiveInt = 1
    """More than 1: each trial runs data-parallel in a Ray Train TorchTrainer; the CPUs and GPUs
    above are then per worker."""

    @model_validator(mode="after")
    def _whole_gpus_above_one(self) -> ResourcesSpec:
        if self.gpus_per_trial > 1 and not self.gpus_per_trial.is_integer():
            raise ValueError(
                f"gpus_per_trial ({self.gpus_per_trial}) above 1 must be a whole number"
            )
        return self


class SweepSpec(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)]
    """Experiment name: the directory under the storage root and the MLflow experiment."""
    base: TrialConfig
    search: SearchSpec
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_failures: Annotated[int, Field(ge=0)] = 2
    """Restarts of a crashed trial from its last checkpoint before it counts as failed."""

    @property
    def max_steps(self) -> int:
        """The longest a trial can run, in optimiser steps (ASHA's max_t)."""
        dist = self.search.space.get("train.max_steps")
        if isinstance(dist, Choice | Grid):
            return max(int(v) for v in dist.values)
        if isinstance(dist, RandInt | Uniform | LogUniform):
            return int(dist.bounds[1])
        return self.base.train.max_steps


# --- loading -----------------------------------------------------------------------------------


_UNION_TAGS = {"projector": PROJECTOR_TYPES, "scheduler": ("asha", "none")}


def format_loc(loc: tuple[Any, ...]) -> str:
    """`search.space.train.lr.loguniform` from pydantic's location.

    Drops the tags pydantic puts into tagged-union locations (`…projector.moe.top_k`,
    `…scheduler.asha.grace_period`, `…loguniform.loguniform`) so the path is the one the user wrote.
    """
    parts: list[str] = []
    for i, raw in enumerate(loc):
        part = str(raw)
        if i > 0 and part in _UNION_TAGS.get(str(loc[i - 1]), ()):
            continue
        if parts and part == parts[-1] and part in DISTRIBUTION_KINDS:
            continue
        parts.append(part)
    return ".".join(parts)


def schema_problems(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors(include_url=False):
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        problems.append(f"{format_loc(e['loc']) or '<top level>'}: {msg}")
    return problems


def _split_override_path(key: str) -> list[str]:
    """Path parts of a `--set` key; a space key (`train.lr`) stays one part."""
    parts = key.split(".")
    if parts[:2] == ["search", "space"] and len(parts) > 2:
        return [*parts[:2], ".".join(parts[2:])]
    if parts[:2] == ["search", "when"] and len(parts) > 3:
        return [*parts[:3], ".".join(parts[3:])]
    return parts


def apply_spec_overrides(data: dict[str, Any], overrides: Iterable[str]) -> None:
    for item in overrides:
        key, value = parse_override(item)
        parts = _split_override_path(key)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(
                    f"--set {key}: `{where}` is a {type(child).__name__}, not a mapping"
                )
            node = child
        node[parts[-1]] = value


def _inline_base(data: dict[str, Any], spec_dir: Path) -> None:
    base = data.get("base")
    if isinstance(base, str):
        path = (spec_dir / base).resolve()
        if not path.is_file():
            raise ConfigError(f"base: file not found: {path}")
        try:
            data["base"] = read_yaml_mapping(path)
        except ConfigError as err:
            raise ConfigError(f"base ({path}): {err}") from None


def parse_sweep_spec(
    data: dict[str, Any],
    *,
    spec_dir: Path,
    overrides: Iterable[str] = (),
    source: str | None = None,
) -> SweepSpec:
    """A checked spec from a mapping; `base` paths resolve against `spec_dir`."""
    from orchestration.space import check_space

    data = copy.deepcopy(data)
    _inline_base(data, spec_dir)
    apply_spec_overrides(data, overrides)
    _inline_base(data, spec_dir)  # `--set base=other.yaml`
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(schema_problems(err), source=source) from None
    problems = check_space(spec)
    if problems:
        raise ConfigError(problems, source=source)
    return spec


def load_sweep_spec(path: str | Path, overrides: Iterable[str] = ()) -> SweepSpec:
    """The checked spec in a YAML file, with `--set` overrides applied."""
    data = read_yaml_mapping(path)
    return parse_sweep_spec(
        data, spec_dir=Path(path).resolve().parent, overrides=overrides, source=str(path)
    )


def dump_sweep_spec(spec: SweepSpec) -> str:
    """The resolved spec (base inlined) as YAML that `load_sweep_spec` reads back unchanged."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
