"""Helpers for the MLflow tests: tiny sweep specs and a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from orchestration.mlflow_store import server_command, server_env

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "sweeps" / "trials" / "tiny-digits.yaml"
SHORT = {"max_steps": 40, "eval_every": 20, "log_every": 10, "warmup_steps": 5}
MOE_GRID = {
    "max_concurrent": 2,
    "space": {"model.projector.type": {"grid": ["mlp", "moe"]}},
    "when": {
        "moe": {
            "model.projector.num_experts": {"grid": [2]},
            "model.projector.top_k": {"grid": [1, 4]},
        }
    },
}
"""Two trials that train (MLP, a 2-expert MoE) and one that breaks a rule (top_k 4 > 2)."""


def write_spec(
    tmp_path: Path, name: str, search: dict[str, Any] | None = None, **train: Any
) -> Path:
    base = yaml.safe_load(TINY.read_text())
    base["train"] |= SHORT | train
    base["data"]["max_eval_samples"] = 40
    spec = {
        "name": name,
        "base": base,
        "search": {
            "metric": "eval/wer",
            "mode": "min",
            "algorithm": "grid",
            **(search or MOE_GRID),
        },
        "max_failures": 0,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """`mlflow server` with the light settings over its own SQLite file and artifact dir; can be
    killed and started again on the same port and store."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend = f"sqlite:///{root / 'mlflow.db'}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log = (self.root / "server.log").open("ab")
        self.proc = subprocess.Popen(
            server_command(self.backend, port=self.port),
            env=server_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its uvicorn worker goes with it when the group is killed
        )
        deadline = time.monotonic() + timeout
        while not self.healthy():
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(0.3)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:  # refused, reset, timed out (URLError is an OSError)
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(root)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def log_point(step: int, evaluate: bool = False, experts: int = 0) -> dict[str, float]:
    """One trainer log point as `orchestration.trial` forwards it (values made up)."""
    point: dict[str, float] = {"step": step, "train/loss": 3.0 / step, "train/lr": 1e-3}
    point |= {"train/samples_per_s": 100.0 + step, "train/aux_loss": 0.01 * experts}
    for i in range(experts):
        point[f"router/load/expert_{i}"] = 1.0 / experts
    if experts:
        point |= {"router/entropy": 0.5, "train/balance_loss": 0.01, "train/z_loss": 0.001}
    if evaluate:
        point |= {"eval/wer": 1.0 - step / 100, "eval/cer": 0.5 - step / 200, "eval/loss": 1.0}
    return point


def tune_results(
    steps: range, eval_every: int, experts: int = 0, **last: Any
) -> list[dict[str, Any]]:
    """Tune results: one per evaluation with the log points since the previous one; `last` is
    merged into the final result (e.g. `trial_status="completed"`)."""
    out, pending = [], []
    for step in steps:
        pending.append(log_point(step, step % eval_every == 0, experts))
        if step % eval_every == 0:
            out.append({**pending[-1], "log_points": pending})
            pending = []
    if last:
        out.append({**out[-1], "log_points": pending, **last})
    return out


def fake_experiment(experiment_dir: Path, spec_path: Path, trials: dict[str, Any]) -> Path:
    """An experiment directory as a sweep leaves it: `spec.yaml` and, per trial id,
    `trial_<id>/params.json` and `result.json` from `(sampled params, results)` (the last result
    is `done` unless it says otherwise)."""
    import json

    from orchestration.spec import dump_sweep_spec, load_sweep_spec

    experiment_dir.mkdir(parents=True, exist_ok=True)
    spec_text = dump_sweep_spec(load_sweep_spec(spec_path))
    (experiment_dir / "spec.yaml").write_text(spec_text)
    for trial_id, (params, results) in trials.items():
        trial_dir = experiment_dir / f"trial_{trial_id}"
        trial_dir.mkdir()
        (trial_dir / "params.json").write_text(json.dumps(params))
        lines = [json.dumps({"done": i == len(results) - 1, **r}) for i, r in enumerate(results)]
        (trial_dir / "result.json").write_text("\n".join(lines) + "\n")
    return experiment_dir
