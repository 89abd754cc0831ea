"""Data-parallel trials: the trainer's loop on N Ray Train workers inside one Tune trial.

The Tune trial starts a `TorchTrainer` (Ray Train sets up the process group; Accelerate inside
`train_trial` joins it) and stays the one place that talks to Tune. The trainer reports from its
main process only, while `ray.train.report` is a barrier every worker must reach — so the workers
do not use it: rank 0's reporter puts each log point on a Ray queue, with a copy of the checkpoint
staged in the trial's directory (shared storage on a cluster), and the trial function forwards
them to its `TuneReporter`. A worker that dies fails `fit`; the Tune trial then fails and Tune
restarts it from its last checkpoint, as for a single-process trial.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config import TrialConfig

if TYPE_CHECKING:
    from orchestration.trial import TrialEnd, TrialSetup, TuneReporter

STAGING = "staging"


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the trainer's loop; rank 0 forwards reports to the trial."""
    import ray.train

    from orchestration.trial import TrialEnd
    from trainer.loop import train_trial

    cfg: TrialConfig = config["cfg"]
    queue, trial_dir = config["queue"], Path(config["trial_dir"])
    staging = trial_dir / STAGING

    def forward(metrics: dict[str, float], step: int, checkpoint: Path | None = None) -> None:
        staged = None
        if checkpoint is not None:  # the trainer deletes it at the next checkpoint: copy it now
            staged = staging / f"step_{step}"
            shutil.copytree(checkpoint, staged, dirs_exist_ok=True)
        queue.put({"metrics": metrics, "step": step, "checkpoint": str(staged) if staged else None})

    result = train_trial(cfg, forward, workdir=config["workdir"], resume_from=config["resume_from"])
    if ray.train.get_context().get_world_rank() == 0:
        queue.put({"end": TrialEnd.of(result)})


def _forward(item: dict[str, Any], reporter: TuneReporter) -> None:
    checkpoint = Path(item["checkpoint"]) if item["checkpoint"] else None
    reporter(item["metrics"], item["step"], checkpoint)
    if checkpoint is not None:
        shutil.rmtree(checkpoint, ignore_errors=True)  # tune.report has copied it to storage


def _pump(queue: Any, fit: Future[Any], reporter: TuneReporter) -> TrialEnd | None:
    """Forward queued reports until `fit` ends; the last item is how the trainer ended."""
    from ray.util.queue import Empty

    end = None
    while True:
        try:
            item = queue.get(timeout=0.5)
        except Empty:
            if fit.done() and queue.empty():
                return end
            continue
        if "end" in item:
            end = item["end"]
        else:
            _forward(item, reporter)


def train_data_parallel(
    cfg: TrialConfig,
    reporter: TuneReporter,
    setup: TrialSetup,
    trial_dir: Path,
    resume_from: Path | None,
) -> TrialEnd:
    """Run the trial on `setup.workers` Ray Train workers; how the trainer ended."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    attempt = time.strftime("%Y%m%d-%H%M%S")
    # One working directory for all ranks: every rank writes its RNG state into the checkpoint
    # the main process creates (so, on a cluster, it lies on the shared storage).
    workdir = trial_dir / f"work-{attempt}"
    workdir.mkdir(parents=True)
    queue = Queue(actor_options={"num_cpus": 0})
    per_worker = {"CPU": setup.cpus_per_worker, "GPU": setup.gpus_per_worker}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "cfg": cfg,
            "queue": queue,
            "trial_dir": str(trial_dir),
            "workdir": workdir,
            "resume_from": resume_from,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=setup.workers,
            use_gpu=setup.gpus_per_worker > 0,
            resources_per_worker={k: v for k, v in per_worker.items() if v > 0},
        ),
        run_config=ray.train.RunConfig(
            # Each attempt is its own Train run: restarts resume from Tune's checkpoint instead.
            name=f"attempt-{attempt}",
            storage_path=str(trial_dir / "train"),
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    )
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            fit = pool.submit(trainer.fit)
            end = _pump(queue, fit, reporter)
            fit.result()  # a worker's error fails the trial here
    finally:
        shutil.rmtree(trial_dir / STAGING, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    if end is None:
        raise RuntimeError("the Ray Train workers ended without saying how the trial ended")
    return end
