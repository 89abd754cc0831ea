"""Real sweeps on a local Ray with the real trainer on the tiny preset, shortened by `--set`.

Slow: each starts Ray and trains a few tiny trials (about a minute each on 2 cores).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from orchestration.cli import main
from orchestration.experiment import load_experiment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TINY = Path(__file__).resolve().parents[2] / "sweeps" / "trials" / "tiny-digits.yaml"
SHORT = {"max_steps": 40, "eval_every": 20, "log_every": 10, "warmup_steps": 5}


def write_spec(tmp_path: Path, name: str, search: dict[str, Any], **extra: Any) -> Path:
    base = yaml.safe_load(TINY.read_text())
    base["train"] |= SHORT
    base["data"]["max_eval_samples"] = 40
    spec = {
        "name": name,
        "base": base,
        "search": {"metric": "eval/wer", "mode": "min", "algorithm": "grid", **search},
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_grid_sweep_skips_rule_breakers_and_exports_a_reproducible_best(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(
        tmp_path,
        "e2e",
        {
            "metric": ["eval/wer", "train/samples_per_s"],  # multi-objective: a Pareto front
            "mode": ["min", "max"],
            "max_concurrent": 2,
            "space": {"model.projector.type": {"grid": ["mlp", "moe"]}},
            "when": {
                "moe": {
                    "model.projector.num_experts": {"grid": [2]},
                    "model.projector.top_k": {"grid": [1, 4]},
                }
            },
        },
    )
    storage = tmp_path / "runs"
    assert main(["run", str(spec), "--storage", str(storage)]) == 0
    out = capsys.readouterr().out
    assert "projsweep: best trial" in out and "best config:" in out

    experiment = load_experiment(storage / "e2e")
    states = sorted(t.state for t in experiment.trials)
    assert states == ["completed", "completed", "skipped"]
    skipped = next(t for t in experiment.trials if t.state == "skipped")
    assert "top_k (4) must be <= num_experts (2)" in skipped.results[-1]["skip_reason"]
    for trial in experiment.trials:
        if trial.state == "completed":
            assert [r["step"] for r in trial.evaluations] == [20, 40, 40]
            assert trial.evaluations[0]["log_points"][0]["step"] == 10  # every log point kept
            assert list(
                (storage / "e2e" / f"trial_{trial.trial_id}").glob(
                    "checkpoint_*/projector.safetensors"
                )
            )

    assert main(["status", str(storage / "e2e")]) == 0
    table = capsys.readouterr().out
    assert "completed" in table and "skipped" in table

    best_yaml = tmp_path / "best.yaml"
    assert main(["export", str(storage / "e2e"), "-o", str(best_yaml)]) == 0
    assert main(["export", str(storage / "e2e"), "-o", str(tmp_path / "front"), "--pareto"]) == 0
    assert 1 <= len(list((tmp_path / "front").glob("trial_*.yaml"))) <= 2
    best = experiment.ranked()[0]
    torch.set_num_threads(1)  # as the trial ran (Ray gives a 1-CPU trial one thread)
    assert main(["train", str(best_yaml), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert math.isclose(again["final"]["eval/wer"], best.last_value("eval/wer"), abs_tol=1e-9)


def _completed_and_checkpointed(experiment_dir: Path) -> bool:
    done = running_with_checkpoint = False
    for trial_dir in experiment_dir.glob("trial_*"):
        lines = (
            (trial_dir / "result.json").read_text().splitlines()
            if (trial_dir / "result.json").exists()
            else []
        )
        if lines and json.loads(lines[-1]).get("trial_status") == "completed":
            done = True
        elif list(trial_dir.glob("checkpoint_*")):
            running_with_checkpoint = True
    return done and running_with_checkpoint


def _interrupt(proc: subprocess.Popen[bytes], how: signal.Signals) -> None:
    if how == signal.SIGINT:
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: Tune saves its state and exits
        proc.wait(timeout=120)
        return
    proc.kill()  # the driver dies at once; the Ray processes it started are cleaned up below
    proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_resume_after_driver_interrupt_reruns_no_finished_trial(
    tmp_path: Path, how: signal.Signals
) -> None:
    spec = write_spec(
        tmp_path,
        "resume",
        {"max_concurrent": 1, "space": {"train.seed": {"grid": [0, 1, 2]}}},
        max_failures=0,
    )
    storage = tmp_path / "runs"
    experiment_dir = storage / "resume"
    cmd = [sys.executable, "-m", "orchestration", "run", str(spec), "--storage", str(storage)]
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not _completed_and_checkpointed(experiment_dir):
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.5)
        _interrupt(proc, how)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = {
        t.trial_id: (experiment_dir / f"trial_{t.trial_id}" / "result.json").read_bytes()
        for t in load_experiment(experiment_dir).trials
        if t.state == "completed"
    }
    assert before

    resume = subprocess.run(
        [sys.executable, "-m", "orchestration", "resume", str(experiment_dir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    after = load_experiment(experiment_dir)
    assert sorted(t.state for t in after.trials) == ["completed"] * 3
    for trial_id, results in before.items():  # finished trials were not run again
        assert (experiment_dir / f"trial_{trial_id}" / "result.json").read_bytes() == results
    for trial in after.trials:  # the interrupted one went on from its checkpoint, not step 0
        steps = [r["step"] for r in trial.evaluations]
        assert steps.count(20) == 1, steps


def test_two_workers_per_trial_run_data_parallel_under_asha(tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path,
        "ddp",
        {
            "space": {"train.seed": {"grid": [0]}},
            # ASHA stops every trial that reaches max_t: the trial still reads as completed.
            "scheduler": {"type": "asha", "grace_period": 20, "reduction_factor": 2},
        },
        resources={"cpus_per_trial": 1, "workers_per_trial": 2},
    )
    storage = tmp_path / "runs"
    assert main(["run", str(spec), "--storage", str(storage)]) == 0
    (trial,) = load_experiment(storage / "ddp").trials
    assert trial.state == "completed"
    assert [r["step"] for r in trial.evaluations] == [20, 40]
    assert list(
        (storage / "ddp" / f"trial_{trial.trial_id}").glob("checkpoint_*/projector.safetensors")
    )
