"""The same loop under `accelerate launch --num_processes 2` on CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from trial_toy import toy_config

from trainer.config import dump_trial_config

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.parametrize("projector", ["mlp", "moe"])  # moe: experts unused in a step under DDP
def test_two_cpu_processes_train_and_only_rank_0_writes(tmp_path: Path, projector: str) -> None:
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(dump_trial_config(toy_config(max_steps=10, eval_every=5, log_every=5)))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        # `--cpu` would start one process (or need MPI); on a machine without GPUs the loop
        # tells Accelerate to use the CPU, so the torchrun launcher gives MULTI_CPU over gloo.
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(HERE / "launch_toy.py"),
        str(cfg),
        str(out),
        "--set",
        f"model.projector.type={projector}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["status"] == "completed"
    assert [p["step"] for p in doc["history"]] == [5, 10]
    assert proc.stdout.count("step  5/10  loss") == 1  # rank 0 prints, rank 1 does not
    ckpt = out / "checkpoints" / "step_10"
    assert {"rng_state_0.pt", "rng_state_1.pt", "projector.safetensors"} <= {
        p.name for p in ckpt.iterdir()
    }
    if projector == "moe":
        assert "router/entropy" in doc["final"]
