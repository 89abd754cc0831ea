"""The MLflow tracker without Ray: the journal, the Tune callback driven by hand against a SQLite
store, replay after an outage, resume, and `run` refusing an unreachable server."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow_helpers import fake_experiment, free_port, tune_results, write_spec
from safetensors.torch import save_file

from orchestration import mlflow_sink
from orchestration.cli import main
from orchestration.journal import JOURNAL_FILE, Journal
from orchestration.mlflow_sink import SWEEP, RunIds
from orchestration.mlflow_store import resolve_tracking_uri
from orchestration.run_records import curve_points, transcripts_worst_first
from orchestration.spec import load_sweep_spec
from orchestration.tracking import Tracking, finish_tracking, open_tracking

KEYS = ("train/loss", "train/lr", "train/samples_per_s")


@dataclass
class FakeTrial:
    """What the callback reads from Tune's `Trial`."""

    trial_id: str
    config: dict[str, Any] = field(default_factory=dict)
    error_file: str | None = None


def checkpoint(experiment_dir: Path, trial_id: str, n: int, transcripts: bool = True) -> Path:
    path = experiment_dir / f"trial_{trial_id}" / f"checkpoint_{n:06d}"
    path.mkdir(parents=True)
    import torch

    save_file({"linear_1.weight": torch.zeros(2, 2)}, path / "projector.safetensors")
    if transcripts:
        rows = ["reference\thypothesis\twer", "one two\tone two\t0.0", "three\tfour\t1.0"]
        (path / "transcripts.tsv").write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating its schema takes seconds); each test has its
    own experiment in it."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def tracking(tmp_path: Path, store_uri: str, request: pytest.FixtureRequest) -> Tracking:
    name = request.node.name.removeprefix("test_")[:60]
    spec = load_sweep_spec(write_spec(tmp_path, name))
    experiment_dir = tmp_path / "runs" / name
    experiment_dir.mkdir(parents=True)
    return open_tracking(spec, experiment_dir, store_uri, keep_going=False)


def history(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def run_trial(tracker: Any, trial: FakeTrial, trial_results: list[dict[str, Any]]) -> None:
    tracker.on_trial_start(0, [], trial)
    for result in trial_results:
        tracker.on_trial_result(0, [], trial, result)


def test_journal_keeps_unsent_entries_across_reloads(tmp_path: Path) -> None:
    journal = Journal(tmp_path / JOURNAL_FILE)
    first = journal.append("metrics", "t1", metrics=[["train/loss", 1.0, 5, 10]])
    second = journal.append("metrics", "t1", metrics=[["train/loss", float("nan"), 6, 20]])
    journal.ack(first)
    with (tmp_path / JOURNAL_FILE).open("a") as f:
        f.write('{"id": 9, "op": "metr')  # a driver killed mid-line
    again = Journal(tmp_path / JOURNAL_FILE)
    assert [i for i, _ in again.pending()] == [second]
    assert again.last_step("t1") == 20 and again.unsent() == 1
    assert again.append("end", "t1", state="completed", status="FINISHED") == second + 1


def test_curve_points_carry_every_log_point_once() -> None:
    result = tune_results(range(10, 41, 10), 20)[1]  # steps 30 and 40
    points = curve_points(result, after_step=30, timestamp_ms=7)
    assert {p[3] for p in points} == {40}
    assert {p[0] for p in points} >= {*KEYS, "eval/wer", "eval/loss"}


def test_transcripts_are_sorted_worst_first(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, "x", 0) / "transcripts.tsv"
    lines = transcripts_worst_first(path).splitlines()
    assert lines[0] == "reference\thypothesis\twer" and lines[1].startswith("three\tfour")


def test_callback_writes_parent_nested_runs_curves_states_and_artifacts(
    tracking: Tracking, tmp_path: Path
) -> None:
    tracker = tracking.callback(None)
    tracker.setup()
    done = FakeTrial("a_00000", {"model.projector.type": "mlp"})
    run_trial(tracker, done, tune_results(range(10, 41, 10), 20))
    checkpoint(tracking.experiment_dir, done.trial_id, 1)
    tracker.on_trial_complete(0, [], done)
    stopped = FakeTrial("a_00001", {"model.projector.type": "mlp", "train.lr": 0.003})
    run_trial(tracker, stopped, tune_results(range(10, 21, 10), 20))
    tracker.on_trial_complete(0, [], stopped)
    bad = {"model.projector.type": "moe", "model.projector.num_experts@moe": 2}
    skipped = FakeTrial("a_00002", bad | {"model.projector.top_k@moe": 4})
    skip = {"eval/wer": 1e9, "step": 0, "trial_status": "skipped", "skip_reason": "top_k"}
    run_trial(tracker, skipped, [skip])
    tracker.on_trial_complete(0, [], skipped)
    error_file = tracking.experiment_dir / "error.txt"  # as Tune writes it before the callback
    traceback = 'Traceback (most recent call last):\n  File "x.py", line 1\nOSError: no data\n'
    coloured = "\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1)\n"  # as Ray writes it
    error_file.write_text(f"Failure # 1 (occurred at 2026-01-01)\n{coloured}{traceback}")
    crashed = FakeTrial(
        "a_00003", {"model.projector.type": "mlp", "train.seed": 3}, str(error_file)
    )
    run_trial(tracker, crashed, tune_results(range(10, 21, 10), 20))
    tracker.on_trial_error(0, [], crashed)
    tracker.on_experiment_end([])

    client = MlflowClient(tracking.uri)
    ids = RunIds(tracking.experiment_dir)
    parent = client.get_run(ids.runs[SWEEP])
    assert parent.data.params["search.space.model.projector.type"] == '{"grid": ["mlp", "moe"]}'
    assert parent.data.tags["projsweep.spec_hash"] and parent.data.tags["projsweep.ray_address"]
    children = client.search_runs(
        [ids.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    states = {r.data.tags["projsweep.trial_id"]: r.data.tags["projsweep.state"] for r in children}
    assert states == {
        "a_00000": "completed",
        "a_00001": "stopped early",
        "a_00002": "skipped",
        "a_00003": "failed",
    }
    run = client.get_run(ids.runs["a_00000"])
    assert run.info.status == "FINISHED" and run.data.params["model.projector.type"] == "mlp"
    assert run.data.params["train.max_steps"] == "40"
    assert history(client, run.info.run_id, "train/loss") == [10, 20, 30, 40]
    assert history(client, run.info.run_id, "eval/wer") == [20, 40]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"config.yaml", "projector.safetensors", "transcripts.tsv"}
    assert "projector.safetensors" not in {
        a.path for a in client.list_artifacts(ids.runs["a_00001"])
    }  # weights only for trials trained to their budget
    assert client.get_run(ids.runs["a_00002"]).data.params["model.projector.top_k"] == "4"
    crashed_run = client.get_run(ids.runs["a_00003"])
    assert crashed_run.data.tags["projsweep.note"] == "OSError: no data"
    kept = client.download_artifacts(crashed_run.info.run_id, "error.txt", str(tmp_path))
    text = Path(kept).read_text()
    assert traceback in text and "ray::ImplicitFunc.train() (pid=1)" in text  # without colours


def test_outage_journals_then_replays_every_point_exactly_once(
    tracking: Tracking, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = tracking.callback(None)
    tracker.setup()
    trial = FakeTrial("b_00000", {"model.projector.type": "mlp"})
    trial_results = tune_results(range(10, 41, 10), 20)
    run_trial(tracker, trial, trial_results[:1])

    real_apply = mlflow_sink.MlflowSink.apply

    def down(self: Any, entry: dict[str, Any]) -> None:
        raise ConnectionError("connection refused")

    monkeypatch.setattr(mlflow_sink.MlflowSink, "apply", down)
    tracker.on_trial_result(0, [], trial, trial_results[1])
    assert tracker.recorder.journal.unsent() == 1
    monkeypatch.setattr(mlflow_sink.MlflowSink, "apply", real_apply)
    # Within the retry pause nothing is sent; a forced flush (end of run) sends it.
    tracker.on_trial_complete(0, [], trial)
    assert tracker.recorder.journal.unsent() == 2
    assert tracker.recorder.flush(force=True)
    # A replay of everything (as if acknowledgements were lost) duplicates nothing.
    journal = Journal(tracking.experiment_dir / JOURNAL_FILE)
    entries = [json.loads(line) for line in journal.path.read_text().splitlines()]
    for entry in entries:
        if entry.get("op") == "metrics":
            tracker.recorder._sink.apply(entry)
    client = MlflowClient(tracking.uri)
    run_id = RunIds(tracking.experiment_dir).runs[trial.trial_id]
    for key in (*KEYS, "eval/wer"):
        steps = history(client, run_id, key)
        assert steps == sorted(set(steps)) and steps[-1] == 40, (key, steps)
    assert history(client, run_id, "train/loss") == [10, 20, 30, 40]


def test_resume_reuses_the_runs_and_repeats_no_step(tracking: Tracking) -> None:
    first = tracking.callback(None)
    first.setup()
    trial = FakeTrial("c_00000", {"model.projector.type": "mlp"})
    trial_results = tune_results(range(10, 41, 10), 20)
    run_trial(first, trial, trial_results[:1])  # then the driver dies
    ids_before = dict(RunIds(tracking.experiment_dir).runs)

    again = tracking.callback("auto")  # `resume`: a new tracker over the same directory
    again.setup()
    # The trial restarts from its step-20 checkpoint and reports 30 and 40 (and 20 again,
    # had it been interrupted after the checkpoint but before Tune saw the result).
    run_trial(again, trial, trial_results)
    again.on_trial_complete(0, [], trial)
    again.on_experiment_end([])
    ids = RunIds(tracking.experiment_dir)
    assert ids.runs == ids_before | {}  # no new parent or trial run
    client = MlflowClient(tracking.uri)
    assert len(client.search_runs([ids.experiment_id])) == 2
    assert history(client, ids.runs[trial.trial_id], "train/loss") == [10, 20, 30, 40]


def test_run_exits_2_before_ray_when_the_tracking_server_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path, "offline")
    dead = f"http://127.0.0.1:{free_port()}"
    storage = tmp_path / "runs"
    argv = ["run", str(spec), "--storage", str(storage), "--mlflow-uri", dead]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert dead in err and "unreachable" in err and "--mlflow-continue" in err
    assert not storage.exists()  # nothing started, nothing written


def test_tracking_uri_precedence_and_absolute_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/projsweep-runs/mlflow.db"
    assert resolve_tracking_uri("sqlite:///x/m.db") == f"sqlite:///{tmp_path}/x/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:1"
    assert resolve_tracking_uri("http://h:5000") == "http://h:5000"


def test_finish_settles_what_no_callback_saw_and_keeps_an_interrupted_parent_running(
    tracking: Tracking,
) -> None:
    """A driver killed before its callbacks ran: `finish` (after `run`, or after `resume`) logs
    the trials from their `result.json`; an interrupted sweep's parent stays running."""
    spec_path = tracking.experiment_dir.parent.parent / f"{tracking.spec.name}.yaml"
    mlp = {"model.projector.type": "mlp"}
    done = tune_results(range(10, 41, 10), 20, trial_status="completed")
    cut = [{**r, "done": False} for r in tune_results(range(10, 21, 10), 20)]
    fake_experiment(tracking.experiment_dir, spec_path, {"d_0": (mlp, done), "u_1": (mlp, cut)})
    checkpoint(tracking.experiment_dir, "d_0", 1, transcripts=False)
    finish_tracking(tracking.spec, tracking.experiment_dir, tracking.uri, exit_code=130)
    client, ids = MlflowClient(tracking.uri), RunIds(tracking.experiment_dir)
    assert client.get_run(ids.runs[SWEEP]).info.status == "RUNNING"
    finished = client.get_run(ids.runs["d_0"])
    assert finished.info.status == "FINISHED"
    assert history(client, ids.runs["d_0"], "train/loss") == [10, 20, 30, 40]
    assert {a.path for a in client.list_artifacts(ids.runs["d_0"])} >= {"projector.safetensors"}
    assert client.get_run(ids.runs["u_1"]).info.status == "RUNNING"

    # `resume` finishes the cut trial (it repeats step 20 from its checkpoint) and ends.
    rest = tune_results(range(10, 41, 10), 20, trial_status="completed")
    fake_experiment(tracking.experiment_dir / "again", spec_path, {"u_1": (mlp, rest)})
    (tracking.experiment_dir / "trial_u_1" / "result.json").write_text(
        (tracking.experiment_dir / "again" / "trial_u_1" / "result.json").read_text()
    )
    finish_tracking(tracking.spec, tracking.experiment_dir, tracking.uri, exit_code=0)
    finish_tracking(tracking.spec, tracking.experiment_dir, tracking.uri, exit_code=0)
    parent = client.get_run(ids.runs[SWEEP])
    assert parent.info.status == "FINISHED" and parent.data.tags["projsweep.best_trial"]
    assert len(client.get_metric_history(parent.info.run_id, "eval/wer")) == 1
    assert client.get_run(ids.runs["u_1"]).data.tags["projsweep.state"] == "completed"
    assert history(client, ids.runs["u_1"], "train/loss") == [10, 20, 30, 40]
    assert len(client.search_runs([ids.experiment_id])) == 3


def test_a_multi_objective_sweep_logs_its_pareto_set_on_the_parent(
    tmp_path: Path, store_uri: str
) -> None:
    search = {"metric": ["eval/wer", "train/samples_per_s"], "mode": ["min", "max"]}
    search |= {"space": {"train.lr": {"grid": [1e-3, 2e-3]}}}
    spec_path = write_spec(tmp_path, "multi", search)
    spec = load_sweep_spec(spec_path)
    assert spec.search.is_multi_objective
    experiment_dir = tmp_path / "runs" / "multi"
    trials = {
        f"m_{i}": ({"train.lr": lr}, tune_results(range(10, 41, 10), 20, trial_status="completed"))
        for i, lr in enumerate([1e-3, 2e-3])
    }
    fake_experiment(experiment_dir, spec_path, trials)
    finish_tracking(spec, experiment_dir, store_uri, exit_code=0)
    client, ids = MlflowClient(store_uri), RunIds(experiment_dir)
    pareto = {a.path for a in client.list_artifacts(ids.runs[SWEEP], "pareto")}
    assert pareto and all(p.startswith("pareto/trial_m_") for p in pareto)
