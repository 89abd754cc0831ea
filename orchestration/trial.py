"""The Tune trial function: a sampled config in, the trainer run, results out to Tune.

`run_trial(config, setup)` is what every Tune trial executes. It makes the config typed at entry
(`resolve_trial_config`), reports a rule-breaking combination as `skipped` without training, and
otherwise calls `trainer.loop.train_trial` with a `TuneReporter`, resuming from Tune's checkpoint
after a crash. With `workers_per_trial > 1` the loop runs data-parallel in a Ray Train
`TorchTrainer` (`orchestration.distributed`).

What Tune sees: one result per evaluation, not per log point. ASHA and the searcher compare
`eval/*` values, which exist only at evaluations; each result carries the latest training metrics
too, and every log point since the previous result under `log_points` (for a driver-side logger
that wants full curves). A last result marks how the trial ended (`trial_status`) — unless ASHA
stops the trial at its last evaluation (it stops everything that reaches `max_t`), in which case
the reader tells "completed" from the step.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import tune

from orchestration.layout import (
    LOG_POINTS,
    NODE_ID,
    SKIP_REASON,
    STEP,
    TRIAL_STATUS,
    trial_dirname_for,
)
from orchestration.space import resolve_trial_config
from trainer.config import TrialConfig
from trainer.overrides import ConfigError

if TYPE_CHECKING:
    from trainer.loop import TrialResult

INFEASIBLE = 1e9
"""Objective value told to the searcher for a skipped or diverged trial (signed by mode)."""


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep shares (sent once through the object store)."""

    base: TrialConfig
    metrics: tuple[str, ...]
    modes: tuple[str, ...]
    experiment_dir: str
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def worst(self) -> dict[str, float]:
        """The worst value of every objective: what a trial that did not train scores."""
        return {
            m: INFEASIBLE if mode == "min" else -INFEASIBLE
            for m, mode in zip(self.metrics, self.modes, strict=True)
        }

    def trial_dir(self, trial_id: str) -> Path:
        return Path(self.experiment_dir, trial_dirname_for(trial_id))


def trial_dirname(trial: Any) -> str:
    """Tune's `trial_dirname_creator`: short names, no sampled values with odd characters."""
    return trial_dirname_for(trial.trial_id)


class TuneReporter:
    """The trainer's `report` callable for a Tune trial: forwards evaluations to `tune.report`."""

    def __init__(self, first: tuple[str, ...] = ()) -> None:
        # Tune's progress table shows the first few metrics of a result: these go first.
        self.first = tuple(dict.fromkeys((STEP, *first, "eval/wer", "eval/loss", "train/loss")))
        self.latest: dict[str, float] = {}
        self.pending: list[dict[str, float]] = []
        self.step = 0

    def __call__(
        self, metrics: dict[str, float], step: int, checkpoint: Path | None = None
    ) -> None:
        self.latest.update(metrics)
        self.pending.append({STEP: step, **metrics})
        self.step = step
        if checkpoint is None and "eval/wer" not in metrics:
            return  # a training log point: no eval metric for ASHA or the searcher yet
        saved = tune.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None
        tune.report(self.result(), checkpoint=saved)  # copies the checkpoint to storage now

    def result(self, **extra: Any) -> dict[str, Any]:
        """The latest value of every metric, the step, the log points not yet sent, and the
        node reporting (Tune's own `node_ip` cannot tell apart nodes that share a host)."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        out = {**self.latest, STEP: self.step, LOG_POINTS: self.pending, NODE_ID: node, **extra}
        self.pending = []
        return {k: out[k] for k in self.first if k in out} | out


@contextmanager
def restored_checkpoint() -> Iterator[Path | None]:
    """The directory of this trial's last Tune checkpoint (after a restart), or None."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as path:
        yield Path(path)


@dataclass(frozen=True)
class TrialEnd:
    """How the trainer ended: its status and message, and the last value of every metric over
    the trial's whole history (a trial restored at its last step reports nothing new)."""

    status: str
    message: str
    final: dict[str, float]
    step: int

    @classmethod
    def of(cls, result: TrialResult) -> TrialEnd:
        step = int(result.history[-1][STEP]) if result.history else 0
        return cls(result.status, result.message, dict(result.final), step)


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """One Tune trial: skip an infeasible sample, otherwise train and report."""
    try:
        cfg = resolve_trial_config(setup.base, config)
    except ConfigError as err:
        tune.report({**setup.worst(), STEP: 0, TRIAL_STATUS: "skipped", SKIP_REASON: str(err)})
        return
    cfg = with_trial_threads(cfg, setup.cpus_per_worker)
    reporter = TuneReporter(setup.metrics)
    with restored_checkpoint() as resume_from:
        if setup.workers > 1:
            from orchestration.distributed import train_data_parallel

            trial_dir = setup.trial_dir(tune.get_context().get_trial_id())
            end = train_data_parallel(cfg, reporter, setup, trial_dir, resume_from)
        else:
            end = _train_here(cfg, reporter, resume_from)
    if resume_from is not None and not reporter.latest:
        # Restored at its last step (it had finished when the driver died): its results are
        # all in Tune already; reporting the ending again would only duplicate it.
        return
    ending = {**end.final, STEP: end.step, TRIAL_STATUS: end.status}
    if end.status != "completed":
        ending |= {**setup.worst(), SKIP_REASON: end.message}
    tune.report(reporter.result(**ending))


def with_trial_threads(cfg: TrialConfig, cpus: float) -> TrialConfig:
    """`train.cpu_threads: null` in a sweep means the CPUs Ray gave each worker of the trial
    (at least 1), not every core of the node: concurrent trials must not oversubscribe it."""
    if cfg.train.cpu_threads is not None:
        return cfg
    train = cfg.train.model_copy(update={"cpu_threads": max(1, int(cpus))})
    return cfg.model_copy(update={"train": train})


def _train_here(cfg: TrialConfig, reporter: TuneReporter, resume_from: Path | None) -> TrialEnd:
    """Train in this process, in a scratch directory inside Tune's local trial directory (a
    trial that ASHA stops mid-step leaves nothing behind once Ray's session is cleaned up).

    The final weights need no copy of their own: the trainer evaluates and checkpoints at
    `max_steps`, and Tune keeps that checkpoint (`checkpoint_*/projector.safetensors`).
    """
    from trainer.loop import train_trial

    workdir = Path(tune.get_context().get_trial_dir(), "work")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    result = train_trial(cfg, reporter, workdir=workdir, resume_from=resume_from)
    shutil.rmtree(workdir, ignore_errors=True)
    return TrialEnd.of(result)
