"""Job submission as a user does it: `ray start --head` on 127.0.0.1 (own temp dir and ports,
token auth on), an `mlflow server` on 127.0.0.1, and the smoke sweep, shortened by `--set`,
submitted twice side by side — with `ray job submit --working-dir . -- projsweep run …` and with
`projsweep submit`. The second job's driver is SIGKILLed mid-sweep and the sweep resumed as a
job (`ray job submit … -- projsweep resume DIR`). Both sweeps must end SUCCEEDED with MLflow,
`status` and the exported best config in agreement; Ray is stopped whatever the outcome.

Slow: two sweeps of two tiny trials each on a 2-CPU head, and a resume.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from cluster_helpers import BIN, ROOT, finished_files, processes_of, wait_for
from fault_cases import Lab, checkpointed, lab
from mlflow import MlflowClient
from mlflow_audit import audit

from orchestration.experiment import load_experiment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SHORTEN = [
    "base.train.max_steps=40", "base.train.eval_every=20", "base.train.log_every=10",
    "base.train.warmup_steps=5", "base.data.max_eval_samples=40", "search.num_samples=2",
    "search.scheduler.grace_period=20",
]  # fmt: skip
"""The smoke sweep, two trials of a few seconds each."""
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class Job:
    how: str
    job_id: str
    status: str
    logs: str
    experiment_dir: Path
    finished_before: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Jobs:
    lab: Lab
    jobs: list[Job]
    killed_status: str = ""


def sweep_args(the_lab: Lab, name: str) -> list[str]:
    args = ["--storage", str(the_lab.storage), "--mlflow-uri", the_lab.mlflow_uri]
    return args + [a for item in [f"name={name}", *SHORTEN] for a in ("--set", item)]


def submit(command: list[str], env: dict[str, str], pattern: str) -> str:
    """Run a submit command from the project directory; the job id it printed."""
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    found = re.search(pattern, output)
    assert found, output[-3000:]
    return found.group(1)


def ray_job_submit(the_lab: Lab, *entrypoint: str) -> str:
    return submit(
        [str(BIN / "ray"), "job", "submit", "--address", the_lab.head.dashboard,
         "--working-dir", ".", "--no-wait", "--", *entrypoint],
        the_lab.head.env, r"Job '(\S+)' submitted successfully",
    )  # fmt: skip


def wait_for_job(the_lab: Lab, job_id: str, timeout: float = 600) -> str:
    client = the_lab.head.job_client()
    deadline = time.monotonic() + timeout
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        assert time.monotonic() < deadline, f"job {job_id} still {status}"
        time.sleep(1)
    return status


def kill_job_driver(the_lab: Lab, name: str) -> None:
    """SIGKILL the sweep's driver inside its job (as the OOM killer would), once a trial of
    it has checkpointed."""
    wait_for(
        f"a checkpoint of {name}",
        lambda: any(checkpointed(t) for t in the_lab.live(name)),
        None,
        400,
    )
    for proc in processes_of(the_lab.head.proc.pid if the_lab.head.proc else None, None):
        with contextlib.suppress(psutil.Error):
            cmdline = proc.cmdline()
            if "orchestration" in cmdline and "run" in cmdline and f"name={name}" in cmdline:
                proc.kill()
                return
    raise AssertionError(f"no driver process of {name}")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobs]:
    """Two jobs side by side; the second one's driver is killed mid-sweep and the sweep is
    resumed as a third job (`ray job submit … -- projsweep resume DIR`)."""
    root = tmp_path_factory.mktemp("jobs")
    # As a user who activated the environment before `ray start`: jobs find `projsweep` on PATH.
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    with lab(root, env={"PATH": path}) as the_lab:
        env = the_lab.head.env  # what a client sets: PATH, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH
        ray_job = ray_job_submit(
            the_lab, "projsweep", "run", "sweeps/smoke.yaml", *sweep_args(the_lab, "smoke-ray-job")
        )
        projsweep_job = submit(
            [str(BIN / "projsweep"), "submit", "sweeps/smoke.yaml", "--address",
             the_lab.head.dashboard, *sweep_args(the_lab, "smoke-projsweep-job")],
            env, r"job (\S+) submitted to",
        )  # fmt: skip
        resumed_dir = the_lab.storage / "smoke-projsweep-job"
        kill_job_driver(the_lab, "smoke-projsweep-job")
        finished_before = finished_files(resumed_dir)
        killed_status = wait_for_job(the_lab, projsweep_job)
        resume_job = ray_job_submit(the_lab, "projsweep", "resume", str(resumed_dir))
        client = the_lab.head.job_client()
        done = []
        for how, job_id, name in [
            ("ray job submit", ray_job, "smoke-ray-job"),
            ("projsweep submit, killed, resumed", resume_job, "smoke-projsweep-job"),
        ]:
            status = wait_for_job(the_lab, job_id)
            logs = client.get_job_logs(job_id)
            done.append(Job(how, job_id, status, logs, the_lab.storage / name))
        done[1].finished_before = finished_before
        yield Jobs(the_lab, done, killed_status)


def test_both_submissions_succeed_and_a_killed_one_resumes_as_a_job(jobs: Jobs) -> None:
    assert jobs.killed_status == "FAILED"  # its driver was SIGKILLed mid-sweep
    for job in jobs.jobs:
        assert job.status == "SUCCEEDED", (job.how, job.logs[-4000:])
        assert "projsweep: best trial" in job.logs, job.logs[-2000:]


@pytest.mark.parametrize("index", [0, 1], ids=["ray-job-submit", "projsweep-submit"])
def test_mlflow_status_and_export_agree(jobs: Jobs, index: int) -> None:
    job = jobs.jobs[index]
    experiment = load_experiment(job.experiment_dir)
    assert len(experiment.trials) == 2
    assert {t.state for t in experiment.trials} <= {"completed", "stopped early"}
    assert "completed" in {t.state for t in experiment.trials}
    result = audit(job.experiment_dir, MlflowClient(jobs.lab.mlflow_uri), job.finished_before)
    # The killed job's unfinished trials may train again from before their last report (back to
    # the last checkpoint Tune had saved its state with); nothing finished runs again.
    result.assert_clean(redone_ok=index == 1)
    parent = MlflowClient(jobs.lab.mlflow_uri).get_experiment_by_name(experiment.spec.name)
    assert parent is not None  # the job tracked into the server the user named


def test_the_cluster_refuses_a_submission_without_its_token(jobs: Jobs) -> None:
    env = {**jobs.lab.head.env, "RAY_AUTH_MODE": "disabled"}  # sends no token
    done = subprocess.run(
        [str(BIN / "projsweep"), "submit", "sweeps/smoke.yaml", "--address",
         jobs.lab.head.dashboard, *sweep_args(jobs.lab, "smoke-no-token")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "RAY_AUTH_TOKEN" in done.stderr  # the hint says what to set
