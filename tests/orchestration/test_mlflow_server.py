"""A real sweep against a real `mlflow server` that is down when the sweep starts
(`--mlflow-continue`), comes up, is killed mid-sweep and comes back: the runs, the full curves and
the artifacts are checked through the MLflow client, every log point exactly once.

Slow: one sweep of two tiny trials (plus a skipped one) in sequence, about two minutes. The
server's schema is created first so that it restarts in seconds, and the sweep retries MLflow
every 2 s (`PROJSWEEP_MLFLOW_RETRY_S`), so both outages end while trials still run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow_helpers import MOE_GRID, MlflowServer, write_spec
from safetensors.torch import load_file

from orchestration.cli import main
from orchestration.experiment import Experiment, load_experiment
from orchestration.journal import JOURNAL_FILE
from orchestration.mlflow_sink import IDS_FILE
from orchestration.report import trial_curves
from trainer.config import load_trial_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass
class Sweep:
    experiment: Experiment
    client: MlflowClient
    ids: dict[str, Any]
    log: str
    events: list[str]

    def run(self, key: str) -> Run:
        return self.client.get_run(self.ids["runs"][key])


def journal_counts(experiment_dir: Path) -> tuple[int, int, int]:
    """(acknowledged trial metric entries, unsent trial metric entries, unsent entries of any
    kind) in the sweep's MLflow journal. Only Tune's callbacks journal trial metrics while
    trials run."""
    path = experiment_dir / JOURNAL_FILE
    if not path.is_file():
        return 0, 0, 0
    entries, metrics, acked = set(), set(), set()
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "ack" in record:
            acked.add(record["ack"])
            continue
        entries.add(record["id"])
        if record["op"] == "metrics" and record["run"] != "sweep":
            metrics.add(record["id"])
    return len(metrics & acked), len(metrics - acked), len(entries - acked)


def wait_until(proc: subprocess.Popen[bytes], what: str, check: Any, timeout: float = 400) -> bool:
    """Poll `check()`; False if the sweep ended first."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)
    return True


def _outage_sweep(tmp: Path, server: MlflowServer, proc: subprocess.Popen[bytes]) -> list[str]:
    """Down at start → up → killed mid-sweep → up again; returns what happened, in order."""
    experiment_dir = tmp / "runs" / "outage"
    events = []
    if wait_until(proc, "points journaled while down", lambda: journal_counts(experiment_dir)[1]):
        events.append("journaled while down at start")
        server.start()
        events.append("server started")

    def replayed() -> bool:  # all of it: a kill during the replay would only prolong the outage
        sent, _, unsent = journal_counts(experiment_dir)
        return sent > 0 and unsent == 0

    if wait_until(proc, "replay", replayed):
        events.append("replayed")
        server.kill()
        events.append("server killed mid-sweep")
        if wait_until(
            proc, "points journaled mid-outage", lambda: journal_counts(experiment_dir)[1]
        ):
            events.append("journaled mid-sweep")
        server.start()
        events.append("server restarted")
    return events


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sweep]:
    tmp = tmp_path_factory.mktemp("mlflow-server")
    spec = write_spec(tmp, "outage", MOE_GRID | {"max_concurrent": 1}, max_steps=100)
    server = MlflowServer(tmp / "server")
    (tmp / "server").mkdir()
    MlflowClient(server.backend).search_experiments()  # create the schema: restarts take ~5 s
    command = [
        sys.executable, "-m", "orchestration", "run", str(spec), "--storage", str(tmp / "runs"),
        "--mlflow-uri", server.uri, "--mlflow-continue",
    ]  # fmt: skip
    log_path = tmp / "run.log"
    env = {**os.environ, "PROJSWEEP_MLFLOW_RETRY_S": "2"}  # retry soon after the server is back
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    try:
        events = _outage_sweep(tmp, server, proc)
        assert proc.wait(timeout=600) == 0, log_path.read_text()[-4000:]
        if not server.healthy():  # the sweep ended before anything was killed
            server.start()
        experiment_dir = tmp / "runs" / "outage"
        yield Sweep(
            experiment=load_experiment(experiment_dir),
            client=MlflowClient(server.uri),
            ids=json.loads((experiment_dir / IDS_FILE).read_text()),
            log=log_path.read_text(),
            events=events,
        )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        server.kill()


def test_the_outage_happened_and_the_sweep_went_on(sweep: Sweep) -> None:
    assert sweep.events == [
        "journaled while down at start",
        "server started",
        "replayed",
        "server killed mid-sweep",
        "journaled mid-sweep",
        "server restarted",
    ], sweep.events
    assert sweep.log.count("unreachable") == 3  # at the start check, at setup, mid-sweep
    assert sweep.log.count("is back; sent") == 2
    assert journal_counts(sweep.experiment.path)[2] == 0  # everything sent in the end


def test_one_parent_and_one_nested_run_per_trial(sweep: Sweep) -> None:
    parent = sweep.run("sweep")
    assert parent.info.status == "FINISHED" and parent.info.run_name == "outage"
    tags, params = parent.data.tags, parent.data.params
    assert {"projsweep.spec_hash", "projsweep.version", "projsweep.ray_address"} <= set(tags)
    assert tags.get("mlflow.source.git.commit") or not (Path.cwd() / ".git").exists()
    assert params["search.space.model.projector.type"] == '{"grid": ["mlp", "moe"]}'
    assert params["search.algorithm"] == "grid" and params["search.max_concurrent"] == "1"
    experiment_id = sweep.ids["experiment_id"]
    runs = sweep.client.search_runs([experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == len(children) + 1 == len(sweep.experiment.trials) + 1  # no duplicates
    states = {r.data.tags["projsweep.trial_id"]: r.data.tags["projsweep.state"] for r in children}
    assert states == {t.trial_id: t.state for t in sweep.experiment.trials}
    assert sorted(states.values()) == ["completed", "completed", "skipped"]
    for trial in sweep.experiment.trials:
        run = sweep.run(trial.trial_id)
        assert run.info.run_name == f"trial_{trial.trial_id}"
        assert run.info.status == ("FINISHED" if trial.state == "completed" else "KILLED")
        assert run.data.params["model.projector.type"] == trial.params["model.projector.type"]


def test_every_log_point_is_in_mlflow_exactly_once_at_its_optimizer_step(sweep: Sweep) -> None:
    for trial in sweep.experiment.trials:
        expected = trial_curves(trial)  # every log point Tune saw, from result.json
        run_id = sweep.ids["runs"][trial.trial_id]
        for key, points in expected.items():
            logged = sweep.client.get_metric_history(run_id, key)
            steps = Counter(m.step for m in logged)
            assert steps == Counter(s for s, _ in points), (trial.trial_id, key, steps)
            by_step = {m.step: m.value for m in logged}
            assert all(by_step[s] == v or v != v for s, v in points), key  # NaN != NaN
        if trial.state == "completed":
            assert [s for s, _ in expected["eval/wer"]] == [20, 40, 60, 80, 100]
            assert [s for s, _ in expected["train/loss"]] == list(range(10, 101, 10))
            keys = {"train/lr", "train/samples_per_s", "eval/cer", "eval/loss", "train/grad_norm"}
            assert keys <= set(expected)
            if trial.params["model.projector.type"] == "moe":
                assert {"train/aux_loss", "router/entropy", "router/load/expert_1"} <= set(expected)


def test_trial_and_sweep_artifacts(sweep: Sweep, tmp_path: Path) -> None:
    for trial in sweep.experiment.trials:
        run_id = sweep.ids["runs"][trial.trial_id]
        names = {a.path for a in sweep.client.list_artifacts(run_id)}
        if trial.state == "skipped":
            assert "projector.safetensors" not in names
            continue
        assert {"config.yaml", "projector.safetensors"} <= names
        config = Path(sweep.client.download_artifacts(run_id, "config.yaml", str(tmp_path)))
        assert (
            load_trial_config(config).model.projector.type == trial.params["model.projector.type"]
        )
        weights = sweep.client.download_artifacts(run_id, "projector.safetensors", str(tmp_path))
        checkpoint = sorted((sweep.experiment.path / f"trial_{trial.trial_id}").glob("checkp*"))
        final = load_file(checkpoint[-1] / "projector.safetensors")
        assert load_file(weights).keys() == final.keys()
        table = sweep.client.download_artifacts(run_id, "transcripts.tsv", str(tmp_path))
        lines = Path(table).read_text(encoding="utf-8").splitlines()
        assert lines[0] == "reference\thypothesis\twer"
        wers = [float(line.rsplit("\t", 1)[1]) for line in lines[1:]]
        assert wers and wers == sorted(wers, reverse=True)  # worst first
    parent = sweep.ids["runs"]["sweep"]
    names = {a.path for a in sweep.client.list_artifacts(parent)}
    assert {"best.yaml", "spec.yaml", "report"} <= names
    report = {a.path for a in sweep.client.list_artifacts(parent, "report")}
    assert {"report/index.html", "report/wer_curves.png", "report/wer_vs_throughput.png"} <= report


def test_report_verb_writes_the_page_and_logs_it_to_the_parent_run(
    sweep: Sweep, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    assert main(["report", str(sweep.experiment.path), "-o", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert 'src="http' not in page and page.count("data:image/png;base64,") >= 4
    for trial in sweep.experiment.trials:
        assert trial.trial_id in page
    assert "report logged to run" in capsys.readouterr().err
