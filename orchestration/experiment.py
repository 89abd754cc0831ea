"""Reading an experiment directory without Ray: trial states, the best trial, the Pareto set.

Per trial, Tune writes `trial_<id>/params.json` (the sampled flat config), `result.json` (one JSON
line per result) and `error.txt` when it raised. A trial's state follows from these files and the
`trial_status` its last result carries (see `orchestration.trial`):

| state | meaning |
|---|---|
| completed | trained to its `train.max_steps` |
| stopped early | ASHA stopped it (last result `done`, no `trial_status`) |
| skipped | the sampled combination broke a rule; never trained |
| diverged | the training loss went non-finite |
| failed | raised (or its process died) more often than `max_failures` allows (`error.txt`) |
| unfinished | started, no end recorded (running, or the driver died: `projsweep resume`) |
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestration.layout import BEST_FILE, SKIP_REASON, SPEC_FILE, STEP, TRIAL_STATUS
from orchestration.space import display_params, resolve_trial_config
from orchestration.spec import SweepSpec, parse_sweep_spec
from orchestration.table import format_table
from trainer.config import dump_trial_config
from trainer.overrides import ConfigError, read_yaml_mapping

EXIT_INTERRUPTED = 130
RANKED_STATES = ("completed", "stopped early", "unfinished")
"""States whose metrics are real evaluations and can be ranked."""


@dataclass
class TrialRecord:
    trial_id: str
    params: dict[str, Any]
    results: list[dict[str, Any]]
    max_steps: int
    """The trial's training budget (its resolved `train.max_steps`)."""
    error: str | None = None
    """Tune's `error.txt`: one `Failure # n` entry per crash, restarted ones included."""
    max_failures: int = 0
    """Restarts the sweep allows (`max_failures`): a trial that crashed no more often than
    this was restarted from its checkpoint, and did not fail."""
    evaluations: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        # Results that hold real evaluations (not a skipped/diverged trial's stand-in values).
        ending = self.results[-1].get(TRIAL_STATUS) if self.results else None
        real = self.results if ending in (None, "completed") else self.results[:-1]
        self.evaluations = [r for r in real if "eval/wer" in r]

    @property
    def state(self) -> str:
        last = self.results[-1] if self.results else {}
        if last.get(TRIAL_STATUS):
            return str(last[TRIAL_STATUS])
        if self.evaluations and self.evaluations[-1].get(STEP, 0) >= self.max_steps:
            return "completed"  # ASHA stops every trial at max_t, before its closing result
        if self.error is not None and self.failures > self.max_failures:
            return "failed"
        return "stopped early" if last.get("done") else "unfinished"

    @property
    def failures(self) -> int:
        """Crashes Tune counted (`Failure # n` in `error.txt`; a lost node does not count)."""
        if self.error is None:
            return 0
        counts = [int(n) for n in re.findall(r"^Failure # (\d+)", self.error, re.MULTILINE)]
        return max(counts) if counts else 1 << 30  # an error without Tune's count is final

    @property
    def steps(self) -> int:
        return max((int(r.get(STEP, 0)) for r in self.results), default=0)

    def last_value(self, metric: str) -> float | None:
        """The metric at the trial's last evaluation (what its final weights score)."""
        for result in reversed(self.evaluations):
            value = result.get(metric)
            if isinstance(value, int | float) and math.isfinite(value):
                return float(value)
        return None

    def best_value(self, metric: str, mode: str) -> float | None:
        values = [
            float(r[metric])
            for r in self.evaluations
            if isinstance(r.get(metric), int | float) and math.isfinite(r[metric])
        ]
        if not values:
            return None
        return min(values) if mode == "min" else max(values)


@dataclass
class Experiment:
    path: Path
    spec: SweepSpec
    trials: list[TrialRecord]

    def ranked(self) -> list[TrialRecord]:
        """Trials with a value of the first metric at their last evaluation, best first."""
        metric, mode = self.spec.search.metrics[0], self.spec.search.modes[0]
        scored = [
            t for t in self.trials if t.state in RANKED_STATES and t.last_value(metric) is not None
        ]
        # On a tie, a completed trial ranks first: its value is its final one.
        return sorted(
            scored, key=lambda t: (_signed(t.last_value(metric), mode), t.state != "completed")
        )


def _signed(value: float | None, mode: str) -> float:
    assert value is not None
    return value if mode == "min" else -value


def _read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    results = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a killed driver
    return results


def _trial_max_steps(spec: SweepSpec, params: dict[str, Any]) -> int:
    try:
        return resolve_trial_config(spec.base, params).train.max_steps
    except ConfigError:  # a skipped trial: it has no budget
        return spec.max_steps


def _read_trial(spec: SweepSpec, trial_dir: Path) -> TrialRecord:
    params_file = trial_dir / "params.json"
    params = json.loads(params_file.read_text(encoding="utf-8")) if params_file.is_file() else {}
    error_file = trial_dir / "error.txt"
    return TrialRecord(
        trial_id=trial_dir.name.removeprefix("trial_"),
        params=params,
        results=_read_results(trial_dir / "result.json"),
        max_steps=_trial_max_steps(spec, params),
        error=error_file.read_text(encoding="utf-8") if error_file.is_file() else None,
        max_failures=spec.max_failures,
    )


def load_experiment_spec(experiment_dir: Path) -> SweepSpec:
    """The spec a sweep was started with (its `spec.yaml`, base inlined)."""
    path = experiment_dir / SPEC_FILE
    if not path.is_file():
        raise ConfigError(
            f"{experiment_dir}: not a projsweep experiment directory (no {SPEC_FILE})"
        )
    return parse_sweep_spec(read_yaml_mapping(path), spec_dir=experiment_dir, source=str(path))


def load_experiment(path: Path) -> Experiment:
    """The spec and every trial of an experiment directory."""
    path = path.resolve()
    if not path.is_dir():
        raise ConfigError(f"experiment directory not found: {path}")
    spec = load_experiment_spec(path)
    trials = [_read_trial(spec, d) for d in sorted(path.glob("trial_*")) if d.is_dir()]
    return Experiment(path, spec, trials)


# --- status ------------------------------------------------------------------------------------


def _note(trial: TrialRecord) -> str | None:
    """Why a trial did not train to the end: the rule it broke, the divergence, the error."""
    if trial.state in ("skipped", "diverged"):
        return str(trial.results[-1].get(SKIP_REASON, ""))
    if trial.state == "failed" and trial.error:
        return trial.error.strip().splitlines()[-1]
    return None


def status_rows(experiment: Experiment) -> list[dict[str, Any]]:
    """One row per trial, ranked ones first (best first): id, state, sampled values, metrics."""
    search = experiment.spec.search
    first, first_mode = search.metrics[0], search.modes[0]
    ranked = experiment.ranked()
    rows = []
    for trial in ranked + [t for t in experiment.trials if t not in ranked]:
        row: dict[str, Any] = {"trial": trial.trial_id, "state": trial.state}
        row |= display_params(trial.params)
        row |= {m: trial.last_value(m) for m in search.metrics}
        row[f"best {first}"] = trial.best_value(first, first_mode)
        row["steps"] = trial.steps
        row["note"] = _note(trial)
        rows.append(row)
    return rows


def status_table(experiment: Experiment) -> str:
    rows = status_rows(experiment)
    if not rows:
        return f"{experiment.spec.name}: no trials yet in {experiment.path}"
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    head = ", ".join(f"{n} {state}" for state, n in counts.items())
    search = experiment.spec.search
    tail = [*search.metrics, f"best {search.metrics[0]}", "steps"]
    params = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in tail]
    params = sorted(
        (k for k in params if k not in ("trial", "state", "note")),
        key=lambda k: k != "projector.type",  # the type first: the other fields depend on it
    )
    columns = ["trial", "state", *params, *tail]
    if any(row["note"] for row in rows):
        columns.append("note")
    return f"{experiment.spec.name}: {len(rows)} trials ({head})\n" + format_table(rows, columns)


# --- export ------------------------------------------------------------------------------------


def _provenance(experiment: Experiment, trial: TrialRecord) -> str:
    metrics = ", ".join(
        f"{m}={v:.4g}"
        for m in experiment.spec.search.metrics
        if (v := trial.last_value(m)) is not None
    )
    sampled = ", ".join(f"{k}={v}" for k, v in trial.params.items())
    return (
        f"# projsweep export: sweep `{experiment.spec.name}`, trial {trial.trial_id} "
        f"({trial.state}, step {trial.steps})\n"
        f"# metrics at its last evaluation: {metrics}\n"
        f"# sampled: {sampled}\n"
        f"# experiment: {experiment.path}\n"
    )


def write_trial_config(experiment: Experiment, trial: TrialRecord, out: Path) -> Path:
    """The trial's resolved config, runnable by `projsweep train` and usable as a sweep base."""
    cfg = resolve_trial_config(experiment.spec.base, trial.params)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_provenance(experiment, trial) + dump_trial_config(cfg), encoding="utf-8")
    return out


def best_trial(experiment: Experiment) -> TrialRecord:
    ranked = experiment.ranked()
    if not ranked:
        raise ConfigError(f"{experiment.path}: no trial has been evaluated yet")
    return ranked[0]


def export_best(experiment: Experiment, out: Path) -> Path:
    return write_trial_config(experiment, best_trial(experiment), out)


def pareto_trials(experiment: Experiment) -> list[TrialRecord]:
    """Trials no other trial beats on every metric (at their last evaluations)."""
    search = experiment.spec.search
    points = []
    for trial in experiment.ranked():
        values = [trial.last_value(m) for m in search.metrics]
        if all(v is not None for v in values):
            points.append(
                (trial, [_signed(v, mode) for v, mode in zip(values, search.modes, strict=True)])
            )

    def dominated(a: list[float]) -> bool:
        return any(all(x <= y for x, y in zip(b, a, strict=True)) and b != a for _, b in points)

    return [trial for trial, values in points if not dominated(values)]


def export_pareto(experiment: Experiment, out_dir: Path) -> list[Path]:
    """One config per Pareto-optimal trial, `OUT_DIR/trial_<id>.yaml`."""
    if not experiment.spec.search.is_multi_objective:
        raise ConfigError("--pareto: the sweep has one metric; use export without --pareto")
    front = pareto_trials(experiment)
    if not front:
        raise ConfigError(f"{experiment.path}: no trial has been evaluated yet")
    return [write_trial_config(experiment, t, out_dir / f"trial_{t.trial_id}.yaml") for t in front]


def finish_sweep(experiment_dir: Path, seconds: float) -> int:
    """After `fit`: the table, the best trial, its exported config and where to look next."""
    experiment = load_experiment(experiment_dir)
    print(status_table(experiment), flush=True)
    ranked = experiment.ranked()
    print(f"\nprojsweep: sweep `{experiment.spec.name}` took {seconds:.0f} s")
    if not ranked:
        print("projsweep: no trial was evaluated; see the errors above and `projsweep status`")
        return 1
    best = ranked[0]
    best_path = export_best(experiment, experiment.path / BEST_FILE)
    values = ", ".join(
        f"{m} {v:.4f}"
        for m in experiment.spec.search.metrics
        if (v := best.last_value(m)) is not None
    )
    print(f"projsweep: best trial {best.trial_id}: {values} (step {best.steps})")
    print(f"projsweep: best config: {best_path}  (run it: projsweep train {best_path})")
    print(f"projsweep: look at the results: projsweep status {experiment.path}")
    if any(t.state == "unfinished" for t in experiment.trials):
        print(f"projsweep: interrupted; continue it with: projsweep resume {experiment.path}")
        return EXIT_INTERRUPTED
    return 0
