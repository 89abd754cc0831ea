"""Applying journaled ops to MLflow: the experiment, the parent run, nested trial runs.

Every op is idempotent, because a journal entry may be sent twice (sent, then the driver died
before the acknowledgement was written). Run ids are kept in `<experiment>/mlflow.json`; a run is
found again by its tags (`projsweep.sweep_uid`, `projsweep.run`) if that file lost it, so a replay
or a `resume` never creates a second run for the same sweep or trial.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from orchestration.journal import JOURNAL_FILE, Journal
from orchestration.mlflow_store import artifact_root, quick_http_env, sqlite_path

IDS_FILE = "mlflow.json"
SWEEP = "sweep"
"""The journal's run key of the parent run (trial runs are keyed by trial id)."""
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100
"""MLflow's `log_batch` limits per call."""
PERMANENT = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE"}
"""Errors that no retry can fix: the op is dropped with a warning instead of blocking the rest."""
TAG_UID, TAG_RUN, TAG_STATE = "projsweep.sweep_uid", "projsweep.run", "projsweep.state"
RETRY_SECONDS = 15.0
"""After MLflow failed, journal only for this long before trying again (keeps Tune's loop fast);
`PROJSWEEP_MLFLOW_RETRY_S` overrides it."""
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""MLflow 3's UI opens GenAI views for experiments of unknown kind; a sweep is model training."""


class PermanentError(Exception):
    """An op MLflow will never accept."""


def is_permanent(err: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(err, PermanentError):
        return True
    if isinstance(err, MlflowException):
        return err.error_code in PERMANENT
    # Connection errors, timeouts, a locked SQLite file, an unwritable artifact dir: retry later.
    return not isinstance(err, OSError | ConnectionError | TimeoutError) and not _is_db_error(err)


def _is_db_error(err: BaseException) -> bool:
    return type(err).__module__.startswith("sqlalchemy")


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class RunIds:
    """`mlflow.json`: the sweep's uid, its tracking URI, experiment id and run ids."""

    def __init__(self, experiment_dir: Path) -> None:
        self.path = experiment_dir / IDS_FILE
        data = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        self.uid: str = data.get("uid") or uuid.uuid4().hex
        self.tracking_uri: str | None = data.get("tracking_uri")
        self.experiment_id: str | None = data.get("experiment_id")
        self.runs: dict[str, str] = dict(data.get("runs", {}))

    def save(self) -> None:
        data = {
            "uid": self.uid,
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "runs": self.runs,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)


class MlflowSink:
    """Sends journal entries to one tracking URI."""

    def __init__(self, uri: str, ids: RunIds, experiment_name: str) -> None:
        quick_http_env()
        from mlflow import MlflowClient

        self.uri, self.ids, self.name = uri, ids, experiment_name
        db = sqlite_path(uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(uri)
        if ids.tracking_uri != uri:  # another store (resume --mlflow-uri): its own ids
            ids.tracking_uri, ids.experiment_id, ids.runs = uri, None, {}
            ids.save()

    def apply(self, entry: dict[str, Any]) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._apply(entry)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            # The store lost the run or the experiment (deleted, or a fresh database at the
            # same URI): forget what mlflow.json says about them and try once more.
            self._forget(entry["run"])
            try:
                self._apply(entry)
            except MlflowException as again:
                if again.error_code == "RESOURCE_DOES_NOT_EXIST":
                    raise PermanentError(str(again).splitlines()[0]) from again
                raise

    def _forget(self, run: str) -> None:
        from mlflow.exceptions import MlflowException

        self.ids.runs.pop(run, None)
        if self.ids.experiment_id is not None:
            try:
                self.client.get_experiment(self.ids.experiment_id)
            except MlflowException:
                self.ids.experiment_id, self.ids.runs = None, {}
        self.ids.save()

    def _apply(self, entry: dict[str, Any]) -> None:
        op = entry["op"]
        if op == "start":
            self._start(entry)
        elif op == "metrics":
            self._metrics(entry)
        elif op == "log":
            self._log(self._known_run(entry["run"]), entry)
        elif op == "end":
            self._end(entry)
        else:
            raise PermanentError(f"unknown journal op {op!r}")

    # --- experiment and runs ---------------------------------------------------------------

    def experiment_id(self) -> str:
        if self.ids.experiment_id is None:
            self.ids.experiment_id = self._find_or_create_experiment()
            self.ids.save()
        return self.ids.experiment_id

    def _find_or_create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.name)
        if found is None:
            root = artifact_root(self.uri)
            location = (root / self.name).as_uri() if root is not None else None
            try:
                return self.client.create_experiment(
                    self.name, artifact_location=location, tags=EXPERIMENT_KIND
                )
            except MlflowException as err:  # another sweep of that name created it just now
                found = self.client.get_experiment_by_name(self.name)
                if found is None:
                    raise err from None
        if found.lifecycle_stage == "deleted":
            self.client.restore_experiment(found.experiment_id)
        return found.experiment_id

    def run_id(self, run: str) -> str | None:
        """The MLflow run of `run`, from `mlflow.json` or found by its tags."""
        if run in self.ids.runs:
            return self.ids.runs[run]
        query = f"tags.`{TAG_UID}` = '{self.ids.uid}' and tags.`{TAG_RUN}` = '{run}'"
        found = self.client.search_runs([self.experiment_id()], query, max_results=1)
        if not found:
            return None
        self.ids.runs[run] = found[0].info.run_id
        self.ids.save()
        return self.ids.runs[run]

    def _create_run(self, run: str, name: str) -> str:
        tags = {TAG_UID: self.ids.uid, TAG_RUN: run}
        if run != SWEEP:
            parent = self.run_id(SWEEP)
            if parent is None:
                raise PermanentError(f"trial {run}: the sweep's parent run was never created")
            tags["mlflow.parentRunId"] = parent
        created = self.client.create_run(self.experiment_id(), run_name=name, tags=tags)
        self.ids.runs[run] = created.info.run_id
        self.ids.save()
        return created.info.run_id

    def _known_run(self, run: str) -> str:
        run_id = self.run_id(run)
        if run_id is None:
            raise PermanentError(f"no MLflow run for {run!r} (its start was never sent)")
        return run_id

    # --- ops ---------------------------------------------------------------------------------

    def _start(self, entry: dict[str, Any]) -> None:
        """Create (or find) the run; log params, tags and text artifacts; mark it running."""
        from mlflow.entities import Param, RunTag

        run = entry["run"]
        run_id = self.run_id(run) or self._create_run(run, entry["name"])
        params = [Param(k, v) for k, v in entry.get("params", {}).items()]
        for chunk in _chunks(params, MAX_PARAMS):
            self.client.log_batch(run_id, params=list(chunk))
        tags = [RunTag(k, v) for k, v in entry.get("tags", {}).items()]
        for chunk in _chunks(tags, MAX_TAGS):
            self.client.log_batch(run_id, tags=list(chunk))
        self._texts(run_id, entry.get("texts", {}))
        if self.client.get_run(run_id).info.status != "RUNNING":  # a failed trial run again
            self.client.update_run(run_id, status="RUNNING")

    def _metrics(self, entry: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        run_id = self._known_run(entry["run"])
        metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in entry["metrics"]]
        for chunk in _chunks(metrics, MAX_METRICS):
            self.client.log_batch(run_id, metrics=list(chunk))

    def _end(self, entry: dict[str, Any]) -> None:
        """Log the run's last artifacts and tags, its final state, and terminate it."""
        run_id = self._known_run(entry["run"])
        self._log(run_id, {**entry, "tags": {TAG_STATE: entry["state"], **entry.get("tags", {})}})
        self.client.set_terminated(run_id, status=entry["status"])

    def _log(self, run_id: str, entry: dict[str, Any]) -> None:
        """Text artifacts, files or directories, and tags."""
        self._texts(run_id, entry.get("texts", {}))
        for local, artifact_path in entry.get("files", []):
            path = Path(local)
            if not path.exists():
                print(f"projsweep: MLflow: {local} is gone; not logged", flush=True)
            elif path.is_dir():
                self.client.log_artifacts(run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(run_id, str(path), artifact_path)
        for key, value in entry.get("tags", {}).items():
            self.client.set_tag(run_id, key, value)

    def _texts(self, run_id: str, texts: dict[str, str]) -> None:
        for artifact_file, text in texts.items():
            self.client.log_text(run_id, text, artifact_file)


# --- journal, then send --------------------------------------------------------------------


def say(message: str) -> None:
    print(f"projsweep: MLflow: {message}", file=sys.stderr, flush=True)


class Recorder:
    """Journal first, then send what MLflow has not accepted yet, in order."""

    def __init__(self, experiment_dir: Path, uri: str, experiment_name: str) -> None:
        self.experiment_dir, self.uri, self.name = experiment_dir, uri, experiment_name
        self.journal = Journal(experiment_dir / JOURNAL_FILE)
        self.ids = RunIds(experiment_dir)
        self.ids.save()  # the sweep's uid exists before anything reaches MLflow
        self._sink: MlflowSink | None = None
        self._retry_at = 0.0
        self._down = False

    def record(self, op: str, run: str, **fields: Any) -> None:
        self.journal.append(op, run, **fields)

    def flush(self, *, force: bool = False) -> bool:
        """Send pending entries; False if MLflow failed (they stay journaled for later)."""
        if not force and time.monotonic() < self._retry_at:
            return False
        sent = 0
        for entry_id, entry in self.journal.pending():
            try:
                if self._sink is None:
                    self._sink = MlflowSink(self.uri, self.ids, self.name)
                self._sink.apply(entry)
            except Exception as err:
                if not is_permanent(err):
                    self._went_down(err)
                    return False
                say(f"refused `{entry['op']}` for {entry['run']}, dropped: {_first_line(err)}")
            self.journal.ack(entry_id)
            sent += 1
        if self._down:
            say(f"{self.uri} is back; sent {sent} journaled entries")
            self._down = False
        return True

    def _went_down(self, err: BaseException) -> None:
        pause = float(os.environ.get("PROJSWEEP_MLFLOW_RETRY_S", RETRY_SECONDS))
        self._retry_at = time.monotonic() + pause
        if not self._down:
            say(
                f"{self.uri} unreachable ({_first_line(err)}); the sweep goes on, metrics are "
                f"journaled in {self.journal.path} and sent when it is back"
            )
        self._down = True

    def run_id(self, run: str) -> str | None:
        return self.ids.runs.get(run)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def log_report(experiment_dir: Path, report_dir: Path, experiment_name: str) -> bool:
    """Log a report directory to the sweep's parent run (journaled like everything else)."""
    ids = RunIds(experiment_dir)
    if ids.tracking_uri is None:
        say(f"{experiment_dir} has no MLflow run ({IDS_FILE}); the report stays local")
        return False
    recorder = Recorder(experiment_dir, ids.tracking_uri, experiment_name)
    recorder.record("log", SWEEP, files=[[str(report_dir.resolve()), "report"]])
    if recorder.flush(force=True):
        say(f"report logged to run {recorder.run_id(SWEEP)} at {ids.tracking_uri}")
        return True
    return False
