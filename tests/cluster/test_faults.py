"""Faults survived by real sweeps on a real `ray start` head with a real `mlflow server`:

- a trial process SIGKILLed three times goes on each time from its last checkpoint;
- a trial whose loss turns NaN ends `diverged` and the sweep goes on (same sweep);
- a trial that raises ends `failed`, its traceback kept as an MLflow artifact, the sweep goes on;
- the driver SIGKILLed mid-sweep, and `projsweep resume` finishes it (same sweep).

In each: no finished trial lost or run again, every log point in MLflow once, and `status` /
`export` agree with MLflow (`mlflow_audit.audit`). Slow: two sweeps of two tiny trials.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_cases import GOOD_LR, NAN_LR, FaultRun, Lab, lab, trial_raises, trial_sigkills
from mlflow import MlflowClient
from mlflow_audit import Audit, audit

from orchestration.experiment import TrialRecord, load_experiment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def faults_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with lab(tmp_path_factory.mktemp("faults")) as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def kills(faults_lab: Lab) -> tuple[FaultRun, Audit]:
    run = trial_sigkills(faults_lab, kills=3, nan=True)
    return run, audit(run.experiment_dir, MlflowClient(faults_lab.mlflow_uri))


@pytest.fixture(scope="module")
def raises(faults_lab: Lab) -> tuple[FaultRun, Audit]:
    run = trial_raises(faults_lab, kill_driver=True)
    client = MlflowClient(faults_lab.mlflow_uri)
    return run, audit(run.experiment_dir, client, run.finished_before)


def trial_where(run: FaultRun, path: str, value: object) -> TrialRecord:
    (trial,) = [t for t in load_experiment(run.experiment_dir).trials if t.params[path] == value]
    return trial


def test_a_trial_killed_three_times_goes_on_from_its_checkpoints(
    kills: tuple[FaultRun, Audit],
) -> None:
    run, result = kills
    assert len(run.events) == 3, run.events
    killed = trial_where(run, "train.lr", GOOD_LR)
    assert killed.state == "completed"
    assert result.attempts[killed.trial_id] == 4  # three restarts, each a new process
    # Each attempt started at the checkpoint the previous one reported: every evaluation once
    # (the closing result repeats the last), no log point trained and reported twice.
    assert [r["step"] for r in killed.evaluations] == [20, 40, 60, 80, 80]
    result.assert_clean()


def test_a_nan_loss_ends_its_trial_diverged_and_the_sweep_goes_on(
    kills: tuple[FaultRun, Audit],
) -> None:
    run, result = kills
    nan = trial_where(run, "train.lr", NAN_LR)
    assert nan.state == "diverged"
    assert "diverged" in nan.results[-1]["skip_reason"]
    assert result.attempts[nan.trial_id] == 1  # a divergence is an ending, not a crash
    assert sorted(result.states.values()) == ["completed", "diverged"]
    assert "projsweep: best trial" in run.log  # the sweep went on and ended normally


def test_a_raising_trial_ends_failed_with_its_traceback_in_mlflow(
    raises: tuple[FaultRun, Audit], faults_lab: Lab, tmp_path: Path
) -> None:
    run, result = raises
    failed = trial_where(run, "data.dataset", str(faults_lab.root / "datasets" / "digits-not-here"))
    assert failed.state == "failed"
    assert failed.error is not None and "Failure # 2" in failed.error  # retried once, then failed
    assert result.attempts[failed.trial_id] == 2
    client = MlflowClient(faults_lab.mlflow_uri)
    run_id = json.loads((run.experiment_dir / "mlflow.json").read_text())["runs"][failed.trial_id]
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FAILED"
    assert "digits-not-here" in mlflow_run.data.tags["projsweep.note"]
    kept = Path(client.download_artifacts(run_id, "error.txt", str(tmp_path))).read_text()
    assert "in open_split" in kept and "FileNotFoundError" in kept and "\x1b[" not in kept
    assert sorted(result.states.values()) == ["completed", "failed"]


def test_resume_after_the_driver_was_killed_runs_no_finished_trial_again(
    raises: tuple[FaultRun, Audit],
) -> None:
    run, result = raises
    assert run.events == ["driver SIGKILLed", "projsweep resume"]
    assert run.finished_before  # the failed trial had ended before the kill
    # The failed trial was not run again; the other one went on from the last checkpoint Tune
    # had saved its state with (it may train a few steps again: `redone_ok`).
    result.assert_clean(redone_ok=True)
    completed = [t for t in load_experiment(run.experiment_dir).trials if t.state == "completed"]
    (trial,) = completed
    assert sorted({r["step"] for r in trial.evaluations}) == list(range(20, 121, 20))
