"""Real Ray clusters on this machine, sweeps driven as a user drives them, faults injected, and
the audit each fault case ends with. Shared by the tests here and `bench/faults.py`.

Nothing here runs `ray stop`: it stops every Ray on the machine, other people's too. A head
started here is stopped by signalling the processes it started (its process tree, and any process
that names its private temp dir).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml
from mlflow_helpers import free_port  # tests/orchestration (see conftest.py)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "sweeps" / "trials" / "tiny-digits.yaml"
SHORT = {"max_steps": 40, "eval_every": 20, "log_every": 10, "warmup_steps": 5}
"""Tiny trials: a few seconds of training each (tests/orchestration use the same)."""
BIN = Path(sys.executable).parent
"""The environment's console scripts (`ray`, `projsweep`), as a user's PATH has them."""


# --- environment and processes ---------------------------------------------------------------


@contextlib.contextmanager
def env_vars(**values: str) -> Iterator[None]:
    """Set environment variables in this process (and what it starts) for a while."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def short_temp_dir(prefix: str) -> Path:
    """A private Ray temp dir: short, as Ray's socket paths must stay under ~107 characters."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def stop_processes(processes: list[psutil.Process], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is left after `grace_s`."""
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


def processes_of(pid: int | None, marker: Path | None) -> list[psutil.Process]:
    """The process tree under `pid`, and every process whose command line names `marker`."""
    found: dict[int, psutil.Process] = {}
    if pid is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                found[proc.pid] = proc
    if marker is not None:
        for proc in psutil.process_iter(["cmdline"]):
            if any(str(marker) in arg for arg in proc.info["cmdline"] or []):
                found[proc.pid] = proc
    found.pop(os.getpid(), None)
    return list(found.values())


class RayHead:
    """`ray start --head --block` on 127.0.0.1 with its own temp dir and ports, token auth on
    with its own token file (the user's `~/.ray/auth_token` is not touched)."""

    def __init__(self, root: Path, *, num_cpus: int = 2, env: Mapping[str, str] | None = None):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.temp_dir = short_temp_dir("psh-")
        self.token_path = root / "ray-auth-token"
        self.token_path.write_text(secrets.token_hex(32))
        self.num_cpus = num_cpus
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, **(env or {}), **self.auth_env()}
        self.log = root / "ray-head.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def auth_env(self) -> dict[str, str]:
        """What every client of this cluster sets for its token auth."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def command(self) -> list[str]:
        ports = [
            "--port", self.port, "--dashboard-port", self.dashboard_port,
            "--ray-client-server-port", free_port(), "--node-manager-port", free_port(),
            "--object-manager-port", free_port(), "--metrics-export-port", free_port(),
            "--dashboard-agent-listen-port", free_port(),
            "--dashboard-agent-grpc-port", free_port(), "--runtime-env-agent-port", free_port(),
        ]  # fmt: skip
        return [
            str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
            "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
            "--num-cpus", str(self.num_cpus), "--temp-dir", str(self.temp_dir),
            "--disable-usage-stats", *map(str, ports),
        ]  # fmt: skip

    def start(self, timeout: float = 120) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.ready():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "ray start did not come up"
            time.sleep(0.5)

    def job_client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        token = self.token_path.read_text().strip()
        return JobSubmissionClient(self.dashboard, headers={"Authorization": f"Bearer {token}"})

    def ready(self) -> bool:
        try:
            self.job_client().list_jobs()
        except Exception:  # not listening yet, or the dashboard not serving jobs yet
            return False
        return True

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_processes(processes_of(self.proc.pid, self.temp_dir))
        self.proc.wait(timeout=30)
        self.proc = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass
class Driver:
    """A `projsweep` command as a user runs it: its own process group, output in a log file."""

    proc: subprocess.Popen[bytes]
    log: Path
    started: float

    @classmethod
    def start(cls, args: list[str], log: Path, env: Mapping[str, str] | None = None) -> Driver:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(BIN / "projsweep"), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(env or os.environ),
            )
        return cls(proc, log, time.monotonic())

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the driver and whatever it started in its process group, at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def wait_for(what: str, check: Callable[[], Any], driver: Driver | None, timeout: float) -> Any:
    """Poll `check()` until it returns something true; fail if the driver ends first."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if driver is not None and driver.proc.poll() is not None:
            raise AssertionError(f"the sweep ended before {what}:\n{driver.tail()}")
        if time.monotonic() > deadline:
            tail = driver.tail() if driver else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.2)
    return value


# --- sweeps ------------------------------------------------------------------------------------


def tiny_base(data: Mapping[str, Any] | None = None, **train: Any) -> dict[str, Any]:
    """The offline preset, shortened to a few seconds of training per trial."""
    base = yaml.safe_load(TINY.read_text())
    base["train"] |= SHORT | train
    base["data"]["max_eval_samples"] = 40
    if data is not None:
        base["data"] = {**{k: v for k, v in base["data"].items() if k != "synthetic"}, **data}
    return base


def write_spec(
    directory: Path,
    name: str,
    space: Mapping[str, Any],
    *,
    base: Mapping[str, Any] | None = None,
    max_concurrent: int = 2,
    max_failures: int = 2,
) -> Path:
    """A grid sweep over `space` (dotted paths → `{grid: [...]}`), no early stopping."""
    spec = {
        "name": name,
        "base": dict(base or tiny_base()),
        "search": {
            "metric": "eval/wer",
            "mode": "min",
            "algorithm": "grid",
            "max_concurrent": max_concurrent,
            "space": dict(space),
        },
        "max_failures": max_failures,
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _read_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


@dataclass
class LiveTrial:
    trial_id: str
    params: dict[str, Any]
    results: list[dict[str, Any]]

    @property
    def last(self) -> dict[str, Any]:
        return self.results[-1] if self.results else {}

    @property
    def ended(self) -> bool:
        return bool(self.last.get("trial_status"))


def live_trials(ray_temp_dir: Path, name: str) -> list[LiveTrial]:
    """Each trial's results as the sweep's driver has logged them so far: its staging copy of
    the experiment in Ray's session dir (Tune copies it to the experiment directory only every
    few checkpoints or ~10 s). The newest copy wins (`resume` makes a new one)."""
    newest: dict[str, Path] = {}
    pattern = f"session_*/artifacts/*/{name}/driver_artifacts/trial_*"
    for trial_dir in ray_temp_dir.glob(pattern):
        if not (trial_dir / "result.json").is_file():
            continue
        tid = trial_dir.name.removeprefix("trial_")
        if tid not in newest or trial_dir.stat().st_mtime > newest[tid].stat().st_mtime:
            newest[tid] = trial_dir
    trials = []
    for tid, trial_dir in sorted(newest.items()):
        params_file = trial_dir / "params.json"
        params = json.loads(params_file.read_text()) if params_file.is_file() else {}
        trials.append(LiveTrial(tid, params, _read_lines(trial_dir / "result.json")))
    return trials


def finished_files(experiment_dir: Path) -> dict[str, bytes]:
    """What each trial the experiment directory shows as finished must keep unchanged: its
    `result.json` and its `error.txt` (a failed trial run again would add a failure)."""
    from orchestration.experiment import load_experiment

    out = {}
    for trial in load_experiment(experiment_dir).trials:
        if trial.state == "unfinished":
            continue
        trial_dir = experiment_dir / f"trial_{trial.trial_id}"
        files = [trial_dir / "result.json", trial_dir / "error.txt"]
        out[trial.trial_id] = b"".join(f.read_bytes() for f in files if f.is_file())
    return out


def run_cli(*args: str) -> str:
    """`projsweep ARGS` in this process (as quick as a library call); its stdout."""
    from orchestration.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    assert code == 0, (args, code, out.getvalue())
    return out.getvalue()


# --- the audit ---------------------------------------------------------------------------------


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
