"""The audit each cluster test and fault case ends with: what the experiment directory says
(as `projsweep status` and `export` read it) against what MLflow holds, and against the log
schedule the trainer follows. Shared by `tests/cluster` and `bench/faults.py`."""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster_helpers import finished_files, run_cli


@dataclass
class Audit:
    """What a sweep left behind, checked against MLflow."""

    states: dict[str, str]
    """Per trial, as `projsweep status` reads the experiment directory."""
    attempts: dict[str, int]
    """Per trial: processes that reported for it (1 + restarts seen)."""
    nodes: dict[str, list[str]]
    """Per trial: the Ray nodes it reported from, in order, without repeats."""
    rerun: list[str] = field(default_factory=list)
    """Trials that had finished before the fault and whose results or errors changed since."""
    redone: dict[str, list[int]] = field(default_factory=dict)
    """Per trial, steps it trained and reported twice: it went back behind a step it had
    reported (restarted from an older checkpoint than its last report's, or from scratch)."""
    lost: list[str] = field(default_factory=list)
    """`trial key@step` expected but not in MLflow."""
    duplicated: list[str] = field(default_factory=list)
    """`trial key@step` in MLflow more than once."""
    disagreements: list[str] = field(default_factory=list)
    """Where `status` / `export` and MLflow say different things."""

    @property
    def finished(self) -> int:
        return sum(state != "unfinished" for state in self.states.values())

    @property
    def restarts(self) -> int:
        return sum(n - 1 for n in self.attempts.values() if n > 1)

    def assert_clean(self, *, redone_ok: bool = False) -> None:
        """Nothing lost, nothing finished run again, MLflow agrees; with `redone_ok`, trials
        may have trained steps again (a driver killed before Tune saved its state)."""
        assert not self.rerun, f"trials re-run: {self.rerun}"
        assert redone_ok or not self.redone, f"steps trained twice: {self.redone}"
        assert not self.lost, f"metric points lost: {self.lost[:20]}"
        assert not self.duplicated, f"metric points duplicated: {self.duplicated[:20]}"
        assert not self.disagreements, "\n".join(self.disagreements)
        assert "unfinished" not in self.states.values(), self.states


def _attempts(trial: Any) -> int:
    """Processes that ran the trial: those that reported, or the crashes Tune counted (a trial
    that failed before reporting anything), whichever says more."""
    reported = len({r["pid"] for r in trial.results if "pid" in r})
    if trial.error is None or trial.failures >= 1 << 30:  # no error, or one without Tune's count
        return reported
    crashed = trial.failures if trial.state == "failed" else trial.failures + 1
    return max(reported, crashed)


def _in_order(values: list[str]) -> list[str]:
    return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]


def expected_steps(trial: Any, spec: Any) -> dict[str, set[int]]:
    """The log points the trainer must have produced by the trial's last step: `train/loss` at
    every `log_every` and evaluation step, `eval/wer` at every evaluation (none at or after a
    divergence)."""
    from orchestration.space import resolve_trial_config

    points = [p for r in trial.results for p in r.get("log_points") or []]
    if not points:
        return {}
    tc = resolve_trial_config(spec.base, trial.params).train
    last = max(int(p["step"]) for p in points)
    evals = {s for s in range(1, last + 1) if s % tc.eval_every == 0 or s == tc.max_steps}
    logs = evals | set(range(tc.log_every, last + 1, tc.log_every))
    if trial.state == "diverged":
        evals = {s for s in evals if s < last}
    return {"train/loss": logs, "eval/wer": evals}


def audit(
    experiment_dir: Path, client: Any, finished_before: Mapping[str, bytes] | None = None
) -> Audit:
    """Compare the experiment directory (as `status` and `export` read it) with MLflow."""
    from orchestration.experiment import load_experiment, status_rows

    experiment = load_experiment(experiment_dir)
    ids = json.loads((experiment_dir / "mlflow.json").read_text())
    result = Audit(
        states={t.trial_id: t.state for t in experiment.trials},
        attempts={t.trial_id: _attempts(t) for t in experiment.trials},
        nodes={
            t.trial_id: _in_order([r["node_id"] for r in t.results if "node_id" in r])
            for t in experiment.trials
        },
    )
    now = finished_files(experiment_dir)
    for tid, before in (finished_before or {}).items():
        if now.get(tid) != before:
            result.rerun.append(f"{tid} (finished before the fault; its results changed)")
    for trial in experiment.trials:
        _audit_trial(result, trial, experiment.spec, client, ids["runs"].get(trial.trial_id))
    _audit_agreement(result, experiment, status_rows(experiment), client, ids)
    return result


def _audit_trial(result: Audit, trial: Any, spec: Any, client: Any, run_id: str | None) -> None:
    tid = trial.trial_id
    steps = [int(p["step"]) for r in trial.results for p in r.get("log_points") or []]
    again = sorted(s for s, n in Counter(steps).items() if n > 1)
    if again:
        result.redone[tid] = again
    if run_id is None:
        result.disagreements.append(f"{tid}: no MLflow run")
        return
    expected = {key: set(s) for key, s in expected_steps(trial, spec).items()}
    for key, want in expected.items():  # the experiment directory (`status`, `report`) too
        have = {
            int(p["step"]) for r in trial.results for p in r.get("log_points") or [] if key in p
        }
        result.lost += [f"{tid} {key}@{s} (result.json)" for s in sorted(want - have)]
    for r in trial.results:  # every other logged key at the steps it was logged at
        for point in r.get("log_points") or []:
            for key, value in point.items():
                if key != "step" and isinstance(value, int | float):
                    expected.setdefault(key, set()).add(int(point["step"]))
    for key, want in expected.items():
        logged = Counter(m.step for m in client.get_metric_history(run_id, key))
        result.lost += [f"{tid} {key}@{s}" for s in sorted(want - set(logged))]
        result.duplicated += [f"{tid} {key}@{s}" for s, n in sorted(logged.items()) if n > 1]


def _audit_agreement(
    result: Audit, experiment: Any, rows: list[dict[str, Any]], client: Any, ids: dict[str, Any]
) -> None:
    problems = result.disagreements
    parent = client.get_run(ids["runs"]["sweep"])
    children = client.search_runs(
        [ids["experiment_id"]], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    in_mlflow = {
        r.data.tags["projsweep.trial_id"]: r.data.tags["projsweep.state"] for r in children
    }
    in_status = {row["trial"]: row["state"] for row in rows}
    if in_mlflow != in_status:
        problems.append(f"trial states: status {in_status} != MLflow {in_mlflow}")
    table = run_cli("status", str(experiment.path))
    for tid, state in in_status.items():
        if not re.search(rf"^{re.escape(tid)}\s+{re.escape(state)}\b", table, re.MULTILINE):
            problems.append(f"`projsweep status` does not show {tid} as {state}:\n{table}")
    if not experiment.ranked():
        return
    with tempfile.TemporaryDirectory() as tmp:
        best = Path(tmp) / "best.yaml"
        run_cli("export", str(experiment.path), "-o", str(best))
        exported = best.read_text()
        logged = Path(client.download_artifacts(parent.info.run_id, "best.yaml", tmp)).read_text()
    trial = re.search(r"trial (\S+) \(", exported)
    best_tag = parent.data.tags.get("projsweep.best_trial")
    if trial is None or trial.group(1) != best_tag:
        problems.append(f"export's best trial {trial and trial.group(1)} != MLflow's {best_tag}")
    if _body(exported) != _body(logged):
        problems.append("the exported best config differs from the parent run's best.yaml")
    if parent.info.status != "FINISHED":
        problems.append(f"the parent run is {parent.info.status}")


def _body(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))
