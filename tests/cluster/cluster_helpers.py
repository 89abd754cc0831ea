"""Real Ray clusters on this machine, sweeps driven as a user drives them, and what the fault
cases need to watch them. Shared by the tests here and `bench/faults.py`.

Nothing here runs `ray stop`: it stops every Ray on the machine, other people's too. A head
started here is stopped by signalling the processes it started (its process tree, and any process
that names its private temp dir).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
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

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        """Whatever happened in the block, a driver still running is killed."""
        if self.proc.poll() is None:
            self.kill()


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
