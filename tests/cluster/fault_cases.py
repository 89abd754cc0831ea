"""The fault cases, each a small real sweep with a fault injected while it runs; shared by
`test_faults.py`, `test_nodes.py` and `bench/faults.py` (which prints their table).

A case returns a `FaultRun`; `mlflow_audit.audit` then compares what the experiment directory
says with MLflow. Trials are tiny (`SHORT`): seconds each.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster_helpers import (
    Driver,
    LiveTrial,
    RayHead,
    env_vars,
    finished_files,
    live_trials,
    processes_of,
    short_temp_dir,
    stop_processes,
    tiny_base,
    wait_for,
    write_spec,
)
from mlflow_helpers import MlflowServer, free_port

NAN_LR = 1.0e30
"""A learning rate that makes the loss non-finite within the first log interval."""
GOOD_LR = 2.0e-3
REGISTER_S = 0.5
"""Tune logs a result before it registers the result's checkpoint; a process killed in between
restarts from the checkpoint before (and trains and reports those steps again). The kills wait
this long after the result, as a real crash would rarely come within milliseconds of one."""
SWEEP_TIMEOUT = 420


@dataclass
class Lab:
    """Where fault sweeps run: a Ray head started with `ray start`, an MLflow server, a scratch
    directory (the experiments go to `root/runs`)."""

    head: RayHead
    mlflow_uri: str
    root: Path

    @property
    def storage(self) -> Path:
        return self.root / "runs"

    def run(self, spec: Path, name: str) -> Driver:
        args = ["run", str(spec), "--address", self.head.address, "--storage", str(self.storage)]
        args += ["--mlflow-uri", self.mlflow_uri]
        return Driver.start(args, self.root / f"{name}.log", self.head.env)

    def live(self, name: str) -> list[LiveTrial]:
        return live_trials(self.head.temp_dir, name)


@contextmanager
def lab(root: Path, num_cpus: int = 2, env: dict[str, str] | None = None) -> Iterator[Lab]:
    """A Ray head (its environment updated by `env`) and an MLflow server on 127.0.0.1, both
    stopped whatever happens."""
    head = RayHead(root / "head", num_cpus=num_cpus, env=env)
    server = MlflowServer(root / "mlflow")
    try:
        head.start()
        server.start()
        yield Lab(head, server.uri, root)
    finally:
        server.kill()
        head.stop()


@dataclass
class FaultRun:
    case: str
    experiment_dir: Path
    wall_s: float
    events: list[str] = field(default_factory=list)
    finished_before: dict[str, bytes] = field(default_factory=dict)
    """`result.json` (+ `error.txt`) of the trials finished when the fault struck."""
    log: str = ""


def _finish(driver: Driver, what: str) -> str:
    code = driver.wait(timeout=SWEEP_TIMEOUT)
    log = driver.tail(6000)
    assert code == 0, f"{what} exited {code}:\n{log}"
    return log


def checkpointed(trial: LiveTrial, after_step: int = 0) -> dict[str, Any] | None:
    """The trial's latest result if it carries a checkpoint past `after_step` (its process has
    saved it to storage before reporting it) and the trial has not ended."""
    last = trial.last
    if trial.ended or not last.get("checkpoint_dir_name") or last.get("step", 0) <= after_step:
        return None
    return last


# --- a trial process SIGKILLed, a loss that turns NaN -------------------------------------------


def trial_sigkills(lab: Lab, name: str = "kills", kills: int = 3, nan: bool = True) -> FaultRun:
    """Two trials at once: one SIGKILLed `kills` times, each time right after it reported a
    checkpoint (its next attempt must go on from there), and, with `nan`, one whose absurd
    learning rate makes the loss non-finite (it must end `diverged`, the sweep go on)."""
    lrs = [GOOD_LR, NAN_LR] if nan else [GOOD_LR]
    spec = write_spec(
        lab.root,
        name,
        {"train.lr": {"grid": lrs}},
        base=tiny_base(max_steps=20 * (kills + 1)),
        max_failures=kills,
    )
    started = time.monotonic()
    run = FaultRun(name, lab.storage / name, 0.0)
    with lab.run(spec, name) as driver:
        step = 0
        for n in range(kills):

            def target(after: int = step) -> dict[str, Any] | None:
                for trial in lab.live(name):
                    if trial.params.get("train.lr") == GOOD_LR:
                        return checkpointed(trial, after)
                return None

            result = wait_for(f"checkpoint #{n + 1} of the trial to kill", target, driver, 300)
            step = int(result["step"])
            time.sleep(REGISTER_S)
            os.kill(int(result["pid"]), signal.SIGKILL)
            run.events.append(f"trial process {result['pid']} SIGKILLed after step {step}")
        run.log = _finish(driver, "the sweep")
    run.wall_s = time.monotonic() - started
    return run


# --- a trial that raises; the driver SIGKILLed; `projsweep resume` --------------------------------


def local_corpus() -> Path:
    """The preset's spoken-digits corpus as a `save_to_disk` directory (made on first use), to
    stand for a user's own local dataset."""
    from trainer.config import SyntheticDigitsConfig
    from trainer.synth import ensure_synthetic_corpus

    return ensure_synthetic_corpus(SyntheticDigitsConfig(**tiny_base()["data"]["synthetic"]))


def trial_raises(lab: Lab, name: str = "raises", kill_driver: bool = True) -> FaultRun:
    """Two trials at once on a local dataset; one points `data.dataset` at a directory that is
    not there, so it raises (and raises again on its one retry) and must end `failed` with its
    traceback kept. With `kill_driver`, the driver is then SIGKILLed while the other trial runs,
    and `projsweep resume` must finish the sweep without running the failed one again."""
    good, missing = local_corpus(), lab.root / "datasets" / "digits-not-here"
    base = tiny_base(data={"dataset": str(good)}, max_steps=120)
    spec = write_spec(
        lab.root, name, {"data.dataset": {"grid": [str(good), str(missing)]}}, base=base,
        max_failures=1,
    )  # fmt: skip
    experiment_dir = lab.storage / name
    run = FaultRun(name, experiment_dir, 0.0)
    started = time.monotonic()
    with lab.run(spec, name) as driver:
        if kill_driver:

            def failed_and_other_running() -> bool:
                from orchestration.experiment import load_experiment

                if not experiment_dir.is_dir() or not (experiment_dir / "spec.yaml").is_file():
                    return False
                states = [t.state for t in load_experiment(experiment_dir).trials]
                if "failed" not in states:
                    return False
                live = lab.live(name)
                return any(
                    t.params.get("data.dataset") == str(good) and checkpointed(t) for t in live
                )

            wait_for("a failed trial and a running one", failed_and_other_running, driver, 300)
            run.finished_before = finished_files(experiment_dir)
            driver.kill()
            run.events.append("driver SIGKILLed")
            resume = Driver.start(
                ["resume", str(experiment_dir)], lab.root / f"{name}-resume.log", lab.head.env
            )
            run.events.append("projsweep resume")
            with resume:
                run.log = _finish(resume, "projsweep resume")
        else:
            run.log = _finish(driver, "the sweep")
    run.wall_s = time.monotonic() - started
    return run


# --- a worker node removed mid-sweep -------------------------------------------------------------


@dataclass
class NodeLossRun(FaultRun):
    worker_ids: list[str] = field(default_factory=list)
    removed: str = ""
    shared: Path = Path()


def node_loss(root: Path, name: str = "nodes") -> NodeLossRun:
    """`ray.cluster_utils.Cluster`: a head (no CPUs: it only drives) and two 1-CPU worker nodes
    on this machine, a shared directory holding the experiment storage and the feature cache
    (`PROJSWEEP_CACHE`), three trials two at a time; the worker running a trial that has
    checkpointed is removed, and that trial must go on from its checkpoint on the other node."""
    from ray.cluster_utils import Cluster

    shared = root / "shared"
    cache, storage = shared / "cache", shared / "runs"
    temp_dir = short_temp_dir("psc-")
    # A corpus of its own (small: it is built in the run) so that the shared cache starts empty.
    base = tiny_base(max_steps=60)
    base["data"]["synthetic"]["num_utterances"] = 600
    spec = write_spec(root, name, {"train.seed": {"grid": [0, 1, 2]}}, base=base, max_failures=2)
    # Token auth off here: this process's own client of the cluster (`Cluster` keeps one) reads
    # Ray's auth mode once per process, at import. Token auth is what test_jobs.py runs with.
    env = {"PROJSWEEP_CACHE": str(cache), "RAY_AUTH_MODE": "disabled"}
    # `Cluster` writes the head's address to `<RAY_TMPDIR or /tmp>/ray/ray_current_cluster`
    # whatever the head's temp_dir, and fails where that directory does not exist (a fresh
    # machine): point it into the private temp dir, away from a developer's own Ray.
    (temp_dir / "ray").mkdir()
    env["RAY_TMPDIR"] = str(temp_dir)
    run = NodeLossRun(name, storage / name, 0.0, shared=shared)
    cluster = None
    driver = None
    started = time.monotonic()
    with env_vars(**env):  # every node (and the driver) sees the shared cache
        try:
            cluster = Cluster(
                initialize_head=True,
                head_node_args={
                    "num_cpus": 0, "temp_dir": str(temp_dir), "include_dashboard": False,
                    "gcs_server_port": free_port(), "dashboard_agent_listen_port": free_port(),
                },
            )  # fmt: skip
            workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
            run.worker_ids = [w.node_id for w in workers]
            args = ["run", str(spec), "--address", cluster.address, "--storage", str(storage)]
            args += ["--mlflow-uri", f"sqlite:///{shared / 'mlflow.db'}"]
            driver = Driver.start(args, root / f"{name}.log")

            def checkpointed_on_a_worker() -> tuple[Any, LiveTrial] | None:
                for trial in live_trials(temp_dir, name):
                    result = checkpointed(trial)
                    if result and result.get("step", 0) < 60:
                        for worker in workers:
                            if result.get("node_id") == worker.node_id:
                                return worker, trial
                return None

            worker, trial = wait_for(
                "a checkpoint on a worker", checkpointed_on_a_worker, driver, 300
            )
            run.finished_before = (
                finished_files(run.experiment_dir) if run.experiment_dir.is_dir() else {}
            )
            time.sleep(REGISTER_S)
            cluster.remove_node(worker)
            run.removed = worker.node_id
            run.events.append(f"worker node removed while trial {trial.trial_id} ran on it")
            run.log = _finish(driver, "the sweep")
        finally:
            if driver is not None and driver.proc.poll() is None:
                driver.kill()
            if cluster is not None:
                cluster.shutdown()
            stop_processes(processes_of(None, temp_dir))
            shutil.rmtree(temp_dir, ignore_errors=True)
    run.wall_s = time.monotonic() - started
    return run
