"""The search space: checked against the trial schema, sampled define-by-run, resolved to a trial.

A sampled config is a flat dict keyed by dotted trial-config paths, e.g.
`{"model.projector.type": "moe", "train.lr": 1e-3, "model.projector.top_k@moe": 2}`. Fields from a
`when:` entry carry `@<type>` so the searcher keeps one distribution per (field, type) — the same
field means different things for different projectors. `resolve_trial_config` turns such a dict
into a `TrialConfig`: the only place where Tune's untyped samples become typed.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, get_args

from pydantic import BaseModel, ValidationError

from orchestration.spec import (
    TYPE_PATH,
    AshaScheduler,
    Choice,
    Grid,
    LogUniform,
    RandInt,
    SearchSpec,
    SweepSpec,
    Uniform,
    format_loc,
    is_contract_metric,
    kind_of,
)
from projectors.config import PROJECTOR_TYPES, MLPConfig, MoEConfig, MOSAConfig, QFormerConfig
from trainer.config import TrialConfig
from trainer.overrides import ConfigError, set_path, validate_model

Dist = Choice | Uniform | LogUniform | RandInt | Grid
PROJECTOR_CLASSES: dict[str, type[BaseModel]] = {
    "mlp": MLPConfig, "mosa": MOSAConfig, "moe": MoEConfig, "qformer": QFormerConfig,
}  # fmt: skip
MAX_GRID_POINTS = 10_000
FEASIBILITY_SAMPLES = 32
_SCALARS = (str, int, float, bool, type(None))


class Suggester(Protocol):
    """The part of `optuna.Trial` the define-by-run space uses."""

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any: ...
    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...
    def suggest_int(self, name: str, low: int, high: int) -> int: ...


# --- sampling ----------------------------------------------------------------------------------


def _suggest_value(trial: Suggester, name: str, dist: Dist) -> Any:
    if isinstance(dist, Choice | Grid):
        return trial.suggest_categorical(name, dist.values)
    if isinstance(dist, Uniform):
        return trial.suggest_float(name, *dist.bounds)
    if isinstance(dist, LogUniform):
        return trial.suggest_float(name, *dist.bounds, log=True)
    return trial.suggest_int(name, *dist.bounds)


def _type_first(space: Mapping[str, Dist]) -> list[tuple[str, Dist]]:
    return sorted(space.items(), key=lambda item: item[0] != TYPE_PATH)


def suggest_flat_config(trial: Suggester, search: SearchSpec) -> dict[str, Any]:
    """Define-by-run: the projector type first, then only that type's `when` fields."""
    sampled: dict[str, Any] = {}
    for path, dist in _type_first(search.space):
        sampled[path] = _suggest_value(trial, path, dist)
    ptype = sampled.get(TYPE_PATH)
    for path, dist in search.when.get(ptype, {}).items():
        name = f"{path}@{ptype}"
        sampled[name] = _suggest_value(trial, name, dist)
    return sampled


class RandomSuggester:
    """Uniform random sampling with optuna's suggest API (used by `validate`, no study needed);
    names in `fixed` take their given value, as in an enqueued Optuna trial."""

    def __init__(self, rng: random.Random, fixed: Mapping[str, Any] | None = None) -> None:
        self.rng = rng
        self.fixed = dict(fixed or {})

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return self.fixed[name] if name in self.fixed else self.rng.choice(choices)

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        if name in self.fixed:
            return self.fixed[name]
        if log:
            return math.exp(self.rng.uniform(math.log(low), math.log(high)))
        return self.rng.uniform(low, high)

    def suggest_int(self, name: str, low: int, high: int) -> int:
        return self.fixed[name] if name in self.fixed else self.rng.randint(low, high)


def grid_points(search: SearchSpec) -> list[dict[str, Any]]:
    """Every point of a grid space; a type's `when` grid only multiplies that type's points."""
    ordered = _type_first(search.space)
    names = [name for name, _ in ordered]
    points = []
    for combo in itertools.product(*(dist.values for _, dist in ordered)):
        point = dict(zip(names, combo, strict=True))
        ptype = point.get(TYPE_PATH)
        when = search.when.get(ptype, {})
        when_names = [f"{path}@{ptype}" for path in when]
        for when_combo in itertools.product(*(dist.values for dist in when.values())):
            points.append({**point, **dict(zip(when_names, when_combo, strict=True))})
    return points


def _point_names(search: SearchSpec, point: Mapping[str, Any]) -> dict[str, str]:
    """Each key of a `points_to_evaluate` entry → the searcher's parameter name (`path@type` for
    a `when` field); a key that names no dimension maps to ''."""
    ptype = point.get(TYPE_PATH)
    when = search.when.get(ptype, {}) if isinstance(ptype, str) else {}
    return {
        key: key if key in search.space else f"{key}@{ptype}" if key in when else ""
        for key in point
    }


def searcher_points(search: SearchSpec) -> list[dict[str, Any]]:
    """`search.points_to_evaluate` keyed by the searcher's parameter names (checked first)."""
    return [
        {_point_names(search, point)[key]: value for key, value in point.items()}
        for point in search.points_to_evaluate
    ]


def _value_outside(dist: Dist, value: Any) -> str | None:
    if isinstance(dist, Choice | Grid):
        return None if value in dist.values else f"not one of {dist.values}"
    low, high = dist.bounds
    if isinstance(dist, RandInt):
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        return None if ok else f"not an integer in [{low}, {high}]"
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return None if number and low <= value <= high else f"not a number in [{low}, {high}]"


def _point_problems(spec: SweepSpec) -> list[str]:
    """Each start point: known paths, values inside their distributions, feasible when whole."""
    search, problems = spec.search, []
    if search.points_to_evaluate and search.algorithm == "grid":
        return ["search.points_to_evaluate: not with algorithm grid (it enumerates every point)"]
    budget = search.num_samples or 1
    if len(search.points_to_evaluate) > budget:
        problems.append(
            f"search.points_to_evaluate: {len(search.points_to_evaluate)} points but "
            f"num_samples is {budget}"
        )
    for i, point in enumerate(search.points_to_evaluate):
        where = f"search.points_to_evaluate[{i}]"
        if not point:
            problems.append(f"{where}: empty; give at least one path")
        for key, name in _point_names(search, point).items():
            if not name:
                hint = (
                    f" (a `when` field needs {TYPE_PATH} in the point)"
                    if any(key in space for space in search.when.values())
                    else ""
                )
                problems.append(f"{where}.{key}: not a dimension of search.space{hint}")
                continue
            ptype = point.get(TYPE_PATH)
            dist = search.space[key] if key in search.space else search.when[ptype][key]
            if why := _value_outside(dist, point[key]):
                problems.append(f"{where}.{key}: value {point[key]!r} is {why}")
    if problems:
        return problems
    for i, named in enumerate(searcher_points(search)):
        whole = all(name in named for name in _point_dimensions(search, named))
        if not whole:
            continue
        try:
            resolve_trial_config(spec.base, named)
        except ConfigError as err:
            problems.append(f"search.points_to_evaluate[{i}]: breaks a rule: {err}")
    return problems


def _point_dimensions(search: SearchSpec, named: Mapping[str, Any]) -> list[str]:
    """The searcher parameter names a point must give to be a whole configuration."""
    ptype = named.get(TYPE_PATH)
    return list(search.space) + [f"{path}@{ptype}" for path in search.when.get(ptype, {})]


def sample_flat_configs(spec: SweepSpec, count: int) -> list[dict[str, Any]]:
    """`count` sampled configs: grid points in order for `grid`, random samples otherwise."""
    if spec.search.algorithm == "grid":
        return grid_points(spec.search)[:count]
    rng = random.Random(spec.search.seed)
    points = searcher_points(spec.search)[:count]
    points += [{}] * (count - len(points))
    return [suggest_flat_config(RandomSuggester(rng, point), spec.search) for point in points]


def trial_count(spec: SweepSpec) -> int:
    """Trials the sweep runs: grid points × repeats for `grid`, else `num_samples`."""
    if spec.search.algorithm == "grid":
        return len(grid_points(spec.search)) * (spec.search.num_samples or 1)
    assert spec.search.num_samples is not None  # check_space requires it
    return spec.search.num_samples


# --- resolving ---------------------------------------------------------------------------------


def resolve_trial_config(base: TrialConfig, sampled: Mapping[str, Any]) -> TrialConfig:
    """The trial config for one sample: the base, the sampled type, then every sampled field.

    A projector type other than the base's starts from that type's defaults; the base's fields
    belong to its own type. Raises `ConfigError` when the combination breaks a rule.
    """
    data = base.model_dump(mode="json")
    ptype = sampled.get(TYPE_PATH)
    if ptype is not None and ptype != data["model"]["projector"]["type"]:
        data["model"]["projector"] = {"type": ptype}
    for key, value in sampled.items():
        set_path(data, key.partition("@")[0], value)
    return validate_model(TrialConfig, data)


def display_params(sampled: Mapping[str, Any]) -> dict[str, Any]:
    """Sampled values keyed by field path, short: `projector.top_k`, `train.lr`."""
    return {key.partition("@")[0].removeprefix("model."): value for key, value in sampled.items()}


# --- checks ------------------------------------------------------------------------------------


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside `X`, `X | None` or `Annotated[X, …]`; None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _section_model(arg)
        if found is not None:
            return found
    return None


def field_problem(path: str, ptype: str) -> str | None:
    """Why `path` is not a field of the trial schema (projector fields as of type `ptype`)."""
    model: type[BaseModel] = TrialConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the trial config"
        if part not in model.model_fields:
            return f"no field `{part}` in {where}"
        here = ".".join(parts[: i + 1])
        if here == "model.projector":
            section: type[BaseModel] | None = PROJECTOR_CLASSES[ptype]
        else:
            section = _section_model(model.model_fields[part].annotation)
        if i == len(parts) - 1:
            return f"`{here}` is a section; search its fields" if section else None
        if section is None:
            return f"`{here}` is a value, not a section"
        model = section
    return None


def _candidates(dist: Dist) -> list[Any]:
    """Values that stand for the whole distribution when checking it against a field."""
    if isinstance(dist, Choice | Grid):
        return list(dist.values)
    low, high = dist.bounds
    if isinstance(dist, RandInt):
        return [low, high]
    middle = math.sqrt(low * high) if isinstance(dist, LogUniform) else (low + high) / 2
    return [low, high, middle]


def _value_problem(base: dict[str, Any], path: str, value: Any, ptype: str) -> str | None:
    """The schema's complaint about `value` at `path` itself (cross-field rules are the trial's)."""
    data = copy.deepcopy(base)
    if data["model"]["projector"]["type"] != ptype:
        data["model"]["projector"] = {"type": ptype}
    set_path(data, path, value)
    try:
        TrialConfig.model_validate(data)
    except ValidationError as err:
        for e in err.errors(include_url=False):
            if format_loc(e["loc"]) == path:
                return f"value {value!r}: {e['msg'].removeprefix('Value error, ')}"
    return None


def _dimensions(spec: SweepSpec) -> Iterator[tuple[str, str, Dist, list[str]]]:
    """(where, path, distribution, projector types it applies to) for every dimension."""
    search = spec.search
    type_dist = search.space.get(TYPE_PATH)
    types = list(type_dist.values) if isinstance(type_dist, Choice | Grid) else []
    base_type = spec.base.model.projector.type
    for path, dist in search.space.items():
        if path != TYPE_PATH:
            yield f"search.space.{path}", path, dist, types or [base_type]
    for ptype, space in search.when.items():
        for path, dist in space.items():
            yield f"search.when.{ptype}.{path}", path, dist, [ptype]


def _type_problems(search: SearchSpec) -> list[str]:
    dist = search.space.get(TYPE_PATH)
    where = f"search.space.{TYPE_PATH}"
    if dist is None:
        return ["search.when: needs `model.projector.type` in search.space"] if search.when else []
    if not isinstance(dist, Choice | Grid):
        return [f"{where}: must be a choice (or grid) of projector types, got {kind_of(dist)}"]
    problems = [
        f"{where}: unknown projector type {t!r} (one of {', '.join(PROJECTOR_TYPES)})"
        for t in dist.values
        if t not in PROJECTOR_TYPES
    ]
    for ptype, space in search.when.items():
        if ptype not in dist.values:
            problems.append(f"search.when.{ptype}: `{ptype}` is not among {where}'s values")
        elif not space:
            problems.append(f"search.when.{ptype}: empty; drop it or give it fields")
        elif TYPE_PATH in space:
            problems.append(f"search.when.{ptype}.{TYPE_PATH}: the type is sampled in search.space")
    return problems


def _dimension_problem(
    search: SearchSpec, base: dict[str, Any], where: str, path: str, dist: Dist, types: list[str]
) -> str | None:
    """What is wrong with one dimension: a duplicate, a field the schema lacks, a bad value."""
    if where.startswith("search.when.") and path in search.space:
        return f"{where}: also in search.space; keep one"
    missing = [t for t in types if field_problem(path, t)]
    if missing:
        hint = " (sample it under search.when.<type>)" if len(missing) < len(types) else ""
        return f"{where}: {field_problem(path, missing[0])}{hint}"
    if isinstance(dist, Choice | Grid) and not all(isinstance(v, _SCALARS) for v in dist.values):
        return f"{where}.{kind_of(dist)}: values must be numbers, strings, booleans or null"
    for ptype in types:
        for value in _candidates(dist):
            if problem := _value_problem(base, path, value, ptype):
                return f"{where}: {problem}"
    return None


def _dimension_problems(spec: SweepSpec) -> list[str]:
    base = spec.base.model_dump(mode="json")
    return [
        problem
        for dimension in _dimensions(spec)
        if (problem := _dimension_problem(spec.search, base, *dimension))
    ]


def _metric_problems(search: SearchSpec) -> list[str]:
    metrics, modes = search.metrics, search.modes
    problems = [
        f"search.metric: unknown metric {m!r} (contract metrics: eval/wer, eval/cer, eval/loss, "
        "train/samples_per_s, …)"
        for m in metrics
        if not is_contract_metric(m)
    ]
    same_shape = isinstance(search.metric, list) == isinstance(search.mode, list)
    if not same_shape or len(metrics) != len(modes):
        problems.append(
            f"search.mode: give one mode per metric ({len(metrics)} metrics, {len(modes)} modes)"
        )
    if len(set(metrics)) != len(metrics):
        problems.append("search.metric: a metric is listed twice")
    return problems


def _algorithm_problems(search: SearchSpec) -> list[str]:
    dims = [(f"search.space.{p}", d) for p, d in search.space.items()] + [
        (f"search.when.{t}.{p}", d) for t, s in search.when.items() for p, d in s.items()
    ]
    problems = []
    if search.algorithm == "grid":
        problems += [
            f"{where}: algorithm grid needs {{grid: [...]}}, got {kind_of(d)}"
            for where, d in dims
            if not isinstance(d, Grid)
        ]
    else:
        problems += [
            f"{where}: {{grid: [...]}} needs search.algorithm: grid (got {search.algorithm})"
            for where, d in dims
            if isinstance(d, Grid)
        ]
        if search.num_samples is None:
            problems.append(f"search.num_samples: required for algorithm {search.algorithm}")
    if search.algorithm == "cmaes":
        if search.is_multi_objective:
            problems.append("search.algorithm: cmaes cannot search a list of metrics; use tpe")
        if not any(isinstance(d, Uniform | LogUniform | RandInt) for _, d in dims):
            problems.append("search.space: cmaes needs a uniform, loguniform or randint dimension")
    return problems


def _grid_size_problems(spec: SweepSpec) -> list[str]:
    if spec.search.algorithm != "grid":
        return []
    size = len(grid_points(spec.search))
    if size > MAX_GRID_POINTS:
        return [f"search.space: the grid has {size} points (more than {MAX_GRID_POINTS})"]
    return []


def _scheduler_problems(spec: SweepSpec) -> list[str]:
    scheduler = spec.search.scheduler
    if not isinstance(scheduler, AshaScheduler):
        return []
    problems = []
    if scheduler.grace_period >= spec.max_steps:
        problems.append(
            f"search.scheduler.grace_period: {scheduler.grace_period} must be < the trials' "
            f"train.max_steps ({spec.max_steps}), or nothing can be stopped early"
        )
    if scheduler.metric is not None and not is_contract_metric(scheduler.metric):
        problems.append(f"search.scheduler.metric: unknown metric {scheduler.metric!r}")
    return problems


def _feasibility_problems(spec: SweepSpec) -> list[str]:
    """Some sampled configs may break a rule (they are skipped); all of them is a spec error."""
    reasons = []
    for sampled in sample_flat_configs(spec, FEASIBILITY_SAMPLES):
        try:
            resolve_trial_config(spec.base, sampled)
            return []
        except ConfigError as err:
            reasons.append(str(err))
    return [f"search.space: every sampled config breaks a rule, e.g. {reasons[0]}"]


def check_space(spec: SweepSpec) -> list[str]:
    """Every problem with the spec's search against the trial schema, each naming its path."""
    if not spec.search.space:
        return ["search.space: empty; give at least one dimension"]
    problems = _metric_problems(spec.search) + _algorithm_problems(spec.search)
    problems += _type_problems(spec.search) + _scheduler_problems(spec)
    if problems:
        return problems
    problems = _dimension_problems(spec) + _grid_size_problems(spec)
    return problems or _point_problems(spec) or _feasibility_problems(spec)
