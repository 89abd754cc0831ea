"""MLflow tracking for a sweep: one parent run, one nested run per trial, full curves, artifacts.

The only MLflow writer of a sweep is `SweepTracker`, a Tune callback in the driver: trials never
talk to MLflow, so the default SQLite store never sees concurrent writers and a remote server sees
one client. Each write is journaled first (`orchestration.journal`) and sent by the `Recorder`;
while MLflow is away the sweep goes on, and the journal is replayed on later callbacks, at the end
of `run`, and by `resume`.

Use from the runner:

    tracking = open_tracking(spec, experiment_dir, mlflow_uri, keep_going=...)   # before Ray
    Tuner(..., run_config=RunConfig(callbacks=[tracking.callback(address)]))
    ...
    exit_code = tracking.finish(exit_code)     # after `finish_sweep`: states, report, best config
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback

from orchestration import run_records
from orchestration.mlflow_sink import SWEEP, Recorder, say
from orchestration.mlflow_store import (
    default_tracking_uri,
    resolve_tracking_uri,
    sqlite_path,
    unreachable_reason,
)
from orchestration.spec import SweepSpec
from trainer.overrides import ConfigError

PARETO_DIR, REPORT_ARTIFACT = "pareto", "report"
FINAL_WAITS = (0.0, 5.0, 15.0)
"""Pauses between the last attempts to send the journal when a sweep ends."""


@dataclass(frozen=True)
class Tracking:
    """A sweep's MLflow settings, checked before Ray starts."""

    spec: SweepSpec
    experiment_dir: Path
    uri: str

    def callback(self, ray_address: str | None) -> SweepTracker:
        return SweepTracker(self, ray_address)

    def finish(self, exit_code: int) -> int:
        """After the sweep: settle every trial's run, log the report and best config on the
        parent, and send the journal (the exit code stays the sweep's)."""
        try:
            finish_tracking(self.spec, self.experiment_dir, self.uri, exit_code=exit_code)
        except Exception as err:  # the sweep's results are safe in its directory either way
            say(f"finishing the MLflow runs failed ({type(err).__name__}: {err})")
        return exit_code


def open_tracking(
    spec: SweepSpec, experiment_dir: Path, uri: str | None, *, keep_going: bool
) -> Tracking:
    """Resolve the tracking URI and check it answers; unreachable is bad input (exit 2) unless
    `keep_going`, in which case everything is journaled for a later replay."""
    uri = resolve_tracking_uri(uri)
    reason = unreachable_reason(uri)
    if reason is not None:
        if not keep_going:
            raise ConfigError(
                f"MLflow tracking store {uri} is unreachable: {reason}. Start it, pass another "
                f"--mlflow-uri, or add --mlflow-continue to run anyway (metrics are then "
                f"journaled under the experiment directory and sent when it is back)"
            )
        say(f"{uri} unreachable ({reason}); continuing, metrics are journaled")
    return Tracking(spec.model_copy(), experiment_dir.resolve(), uri)


class SweepTracker(Callback):
    """Tune callback (driver side): journals and sends runs, curves, states and artifacts.

    It is pickled into Tune's `tuner.pkl`, so only its settings are kept there; the journal and
    the MLflow client are made in `setup` (and `resume` installs a fresh tracker).
    """

    def __init__(self, tracking: Tracking, ray_address: str | None) -> None:
        self.tracking = tracking
        self.ray_address = ray_address
        self._recorder: Recorder | None = None
        self._results: dict[str, list[dict[str, Any]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking": self.tracking, "ray_address": self.ray_address}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tracking"], state["ray_address"])  # type: ignore[misc]

    @property
    def recorder(self) -> Recorder:
        if self._recorder is None:
            t = self.tracking
            self._recorder = Recorder(t.experiment_dir, t.uri, t.spec.name)
        return self._recorder

    @contextmanager
    def _sweep_goes_on(self, where: str) -> Iterator[None]:
        """A tracking bug must not stop the sweep: say it, and go on (the experiment directory
        keeps every result; `finish` settles the trial runs from it)."""
        try:
            yield
        except Exception as err:
            say(f"tracking failed in {where} ({type(err).__name__}: {err}); the sweep goes on")

    def setup(self, **info: Any) -> None:
        with self._sweep_goes_on("setup"):
            t = self.tracking
            address = _ray_address(self.ray_address)
            self.recorder.record(
                "start", SWEEP, **run_records.sweep_start(t.spec, t.experiment_dir, address)
            )
            self.recorder.flush(force=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._sweep_goes_on("on_trial_start"):
            self._start(trial)
            self.recorder.flush()

    def _start(self, trial: Any) -> None:
        start = run_records.trial_start(self.tracking.spec, trial.trial_id, trial.config)
        self.recorder.record("start", trial.trial_id, **start)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        with self._sweep_goes_on("on_trial_result"):
            if not self.recorder.journal.started(trial.trial_id):  # Tune skipped its start
                self._start(trial)
            self.log_result(trial.trial_id, result)
            self.recorder.flush()

    def log_result(self, trial_id: str, result: Mapping[str, Any]) -> None:
        """Journal the result's log points (steps already journaled are not repeated)."""
        journal = self.recorder.journal
        now_ms = int(time.time() * 1000)
        points = run_records.curve_points(result, journal.last_step(trial_id), now_ms)
        if points:
            self.recorder.record("metrics", trial_id, metrics=points)
        compact = {k: v for k, v in result.items() if k != run_records.LOG_POINTS}
        self._results.setdefault(trial_id, []).append(compact)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._sweep_goes_on("on_trial_complete"):
            self._end(trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._sweep_goes_on("on_trial_error"):
            self._end(trial, errored=True)

    def _end(self, trial: Any, *, errored: bool) -> None:
        from orchestration.experiment import TrialRecord

        spec, results = self.tracking.spec, self._results.get(trial.trial_id, [])
        record = TrialRecord(
            trial_id=trial.trial_id,
            params=dict(trial.config),
            results=results,
            max_steps=run_records.trial_max_steps(spec, trial.config),
            error="raised" if errored else None,
        )
        state = record.state
        if state == "unfinished":  # Tune says complete and nothing says otherwise: ASHA stopped it
            state = "stopped early"
        note = run_records.ending_note(results) if state in ("skipped", "diverged") else ""
        error = _error_text(trial) if state == "failed" else None
        if error:
            note = error.strip().splitlines()[-1]
        end = run_records.trial_end(
            self.tracking.experiment_dir, trial.trial_id, state, note, error=error
        )
        self.recorder.record("end", trial.trial_id, **end)
        self.recorder.flush()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        with self._sweep_goes_on("on_experiment_end"):
            self.recorder.flush(force=True)


def _error_text(trial: Any) -> str | None:
    """Tune's `error.txt` for the trial (written before `on_trial_error`, in the driver's
    staging copy of the trial directory; synced to the experiment directory later)."""
    path = getattr(trial, "error_file", None)
    if not path or not Path(path).is_file():
        return None
    return Path(path).read_text(encoding="utf-8", errors="replace")


def _ray_address(requested: str | None) -> str:
    import ray

    actual = None
    if ray.is_initialized():  # not in a test driving the callback by hand
        actual = ray.get_runtime_context().gcs_address
    if requested:
        return f"{requested} ({actual})" if actual and actual != requested else requested
    return f"local ({actual})" if actual else "local"


def use_tracker(tuner: Any, tracker: SweepTracker) -> None:
    """After `Tuner.restore`: replace the tracker pickled with the tuner by `tracker` (the
    experiment directory may have moved, `--mlflow-uri` may differ). Ray has no public way to
    change a restored tuner's callbacks, hence the private attribute."""
    local = getattr(tuner, "_local_tuner", None)
    if local is None:
        say("a Ray Client tuner keeps the tracker it was started with")
        return
    run_config = local.get_run_config()
    kept = [c for c in run_config.callbacks or [] if not isinstance(c, SweepTracker)]
    run_config.callbacks = [*kept, tracker]


# --- the end of a sweep --------------------------------------------------------------------------


def finish_tracking(spec: SweepSpec, experiment_dir: Path, uri: str, *, exit_code: int) -> None:
    """An interrupted sweep's parent run stays running (`resume` continues it)."""
    from orchestration.experiment import EXIT_INTERRUPTED, load_experiment

    recorder = Recorder(experiment_dir, uri, spec.name)
    experiment = load_experiment(experiment_dir)
    if not recorder.journal.started(SWEEP):  # no callback ever ran (Tune failed to start)
        start = run_records.sweep_start(spec, experiment_dir, _ray_address(None))
        recorder.record("start", SWEEP, **start)
    settle_trials(recorder, experiment)
    report_dir = write_sweep_report(experiment)
    best = [m for m in _best_values(experiment) if m[3] > recorder.journal.last_step(SWEEP)]
    if best:  # once per step: a resumed sweep that ends again does not repeat the point
        recorder.record("metrics", SWEEP, metrics=best)
    log = {"files": _sweep_files(experiment, report_dir), "tags": _sweep_summary(experiment)}
    if exit_code == EXIT_INTERRUPTED:
        recorder.record("log", SWEEP, **log)
    else:
        state, status = ("completed", "FINISHED") if exit_code == 0 else ("failed", "FAILED")
        recorder.record("end", SWEEP, state=state, status=status, **log)
    send_journal(recorder)


def settle_trials(recorder: Recorder, experiment: Any) -> None:
    """What the callbacks may have missed (a driver killed between a trial's last result and
    its end, a resumed sweep whose finished trials never ran again): every log point in the
    trials' `result.json`, and each finished trial's final state as the reader sees it."""
    journal, spec = recorder.journal, experiment.spec
    now_ms = int(time.time() * 1000)
    for trial in experiment.trials:
        tid = trial.trial_id
        if not journal.started(tid):
            recorder.record("start", tid, **run_records.trial_start(spec, tid, trial.params))
        for result in trial.results:
            points = run_records.curve_points(result, journal.last_step(tid), now_ms)
            if points:
                recorder.record("metrics", tid, metrics=points)
        if trial.state == "unfinished" or journal.ended(tid) == trial.state:
            continue
        note = run_records.ending_note(trial.results) if trial.state != "failed" else ""
        error = trial.error if trial.state == "failed" else None
        if error:
            note = error.strip().splitlines()[-1]
        end = run_records.trial_end(experiment.path, tid, trial.state, note, error=error)
        recorder.record("end", tid, **end)


def write_sweep_report(experiment: Any) -> Path | None:
    """The comparison report into `<experiment>/report/` (a failure here fails no sweep)."""
    from orchestration.report import REPORT_DIR, write_report

    try:
        out = write_report(experiment, experiment.path / REPORT_DIR)
        print(f"projsweep: report: {out / 'index.html'}", flush=True)
        return out
    except Exception as err:
        say(f"the report failed ({_short(err)}); `projsweep report` can retry it")
        return None


def _short(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def _best_values(experiment: Any) -> list[list[Any]]:
    ranked = experiment.ranked()
    if not ranked:
        return []
    best, now_ms = ranked[0], int(time.time() * 1000)
    values = ((m, best.last_value(m)) for m in experiment.spec.search.metrics)
    return [[m, v, now_ms, best.steps] for m, v in values if v is not None]


def _sweep_files(experiment: Any, report_dir: Path | None) -> list[list[Any]]:
    from orchestration.experiment import export_pareto
    from orchestration.layout import BEST_FILE

    files: list[list[Any]] = []
    if (experiment.path / BEST_FILE).is_file():
        files.append([str(experiment.path / BEST_FILE), None])
    if experiment.spec.search.is_multi_objective:
        try:
            written = export_pareto(experiment, experiment.path / PARETO_DIR)
            files += [[str(path), PARETO_DIR] for path in written]
        except ConfigError:
            pass  # no trial evaluated: no front
    if report_dir is not None:
        files.append([str(report_dir), REPORT_ARTIFACT])
    return files


def _sweep_summary(experiment: Any) -> dict[str, str]:
    counts: dict[str, int] = {}
    for trial in experiment.trials:
        counts[trial.state] = counts.get(trial.state, 0) + 1
    tags = {"projsweep.trials": ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))}
    ranked = experiment.ranked()
    if ranked:
        tags["projsweep.best_trial"] = ranked[0].trial_id
    return tags


def send_journal(recorder: Recorder) -> bool:
    """Send what is journaled, retrying a few times; say where the rest waits if MLflow is away."""
    for wait in FINAL_WAITS:
        time.sleep(wait)
        if recorder.flush(force=True):
            parent = recorder.run_id(SWEEP)
            say(f"sweep run {parent} in experiment `{recorder.name}` at {recorder.uri}")
            say(f"look at it: {_look_hint(recorder.uri)}")
            return True
    say(
        f"{recorder.journal.unsent()} entries wait in {recorder.journal.path}; "
        f"`projsweep resume {recorder.experiment_dir}` sends them when {recorder.uri} is back"
    )
    return False


def _look_hint(uri: str) -> str:
    if uri == default_tracking_uri():
        return "projsweep ui"
    if sqlite_path(uri) is not None:
        return f"MLFLOW_TRACKING_URI={uri} projsweep ui"
    return uri
