"""Running a sweep on Ray Tune: Optuna search, ASHA, concurrency, resources, failures, resume.

`run_sweep` writes `<storage>/<name>/` (Ray Tune's experiment directory, plus `spec.yaml`, the
resolved spec, and `run.json`, how it was started) so that `resume`, `status` and `export` work from
the directory alone. The encoder-feature cache is built once in the driver before trials start.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestration.experiment import finish_sweep, load_experiment_spec
from orchestration.layout import LOG_POINTS, RUN_FILE, SPEC_FILE, STEP
from orchestration.space import trial_count
from orchestration.spec import AshaScheduler, SweepSpec, dump_sweep_spec
from orchestration.trial import TrialSetup, run_trial, trial_dirname
from trainer.config import TrialConfig
from trainer.overrides import ConfigError

FORWARDED_ENV = ("PROJSWEEP_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
"""Environment the trials need as the driver has it (cluster workers do not inherit it)."""
DRIVER_MEMORY = 512 * 1024**2
"""Memory reserved for a data-parallel trial's driver (its workers reserve their own)."""


# --- Ray ---------------------------------------------------------------------------------------


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Connect to `address` (or the job's cluster), else start a local Ray in a private temp dir."""
    import ray

    if ray.is_initialized():
        yield
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    temp_dir = None
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init()  # inside a Ray job: the job's runtime env (working dir, env vars) applies
    else:
        # A short private path: Ray's socket paths must stay under ~107 characters, and
        # concurrent sweeps on one machine must not share /tmp/ray.
        temp_dir = tempfile.mkdtemp(prefix="psray-", dir="/tmp")
        ray.init(include_dashboard=False, _temp_dir=temp_dir, runtime_env=runtime_env)
    try:
        yield
    finally:
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


# --- search, scheduler, trainable --------------------------------------------------------------


def _tpe_startup_trials(num_samples: int) -> int:
    # Optuna's default (10 random trials) would make a 12-trial sweep almost pure random search.
    return max(2, min(10, num_samples // 4))


def build_searcher(spec: SweepSpec) -> Any:
    """OptunaSearch over the define-by-run space, behind a ConcurrencyLimiter."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from orchestration.space import grid_points, searcher_points, suggest_flat_config

    search = spec.search
    seed = search.seed
    points = searcher_points(search) or None
    if search.algorithm == "grid":
        # Every grid point is enqueued in order (a conditional grid is not a product, so
        # Optuna's GridSampler cannot hold it); the sampler is never consulted.
        points = grid_points(search) * (search.num_samples or 1)
        sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)
    elif search.algorithm == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    elif search.algorithm == "cmaes":
        sampler = optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    else:
        with warnings.catch_warnings():  # multivariate/group/constant_liar are "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(
                seed=seed, multivariate=True, group=True, constant_liar=True,
                n_startup_trials=_tpe_startup_trials(search.num_samples or 1),
            )  # fmt: skip
    multi = search.is_multi_objective
    searcher = OptunaSearch(
        space=functools.partial(suggest_flat_config, search=search),
        metric=search.metrics if multi else search.metrics[0],
        mode=search.modes if multi else search.modes[0],
        sampler=sampler,
        points_to_evaluate=points,
    )
    if search.max_concurrent:
        return ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent)
    return searcher


def build_scheduler(spec: SweepSpec) -> Any:
    """ASHA on the optimiser step, stopping on its own metric or the search's first; None for
    FIFO."""
    from ray.tune.schedulers import ASHAScheduler

    scheduler = spec.search.scheduler
    if not isinstance(scheduler, AshaScheduler):
        return None
    return ASHAScheduler(
        time_attr=STEP,
        metric=scheduler.metric or spec.search.metrics[0],
        mode=scheduler.mode or spec.search.modes[0],
        max_t=spec.max_steps,
        grace_period=scheduler.grace_period,
        reduction_factor=scheduler.reduction_factor,
    )


def build_trainable(spec: SweepSpec, experiment_dir: Path) -> Any:
    """`run_trial` with the sweep's shared setup and per-trial resources."""
    from ray import tune

    res = spec.resources
    setup = TrialSetup(
        base=spec.base,
        metrics=tuple(spec.search.metrics),
        modes=tuple(spec.search.modes),
        experiment_dir=str(experiment_dir),
        workers=res.workers_per_trial,
        cpus_per_worker=res.cpus_per_trial,
        gpus_per_worker=res.gpus_per_trial,
    )
    trainable = tune.with_parameters(run_trial, setup=setup)
    if res.workers_per_trial > 1:
        # The trial only drives a Ray Train run whose workers hold the CPUs/GPUs; it takes no
        # CPU itself, or a 2-core machine could never place its 2 one-CPU workers. (Ray wants
        # some resource in a bundle: the driver's memory.)
        return tune.with_resources(trainable, {"cpu": 0, "memory": DRIVER_MEMORY})
    return tune.with_resources(trainable, {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial})


def build_tuner(spec: SweepSpec, experiment_dir: Path, tracker: Any = None) -> Any:
    from ray import tune

    return tune.Tuner(
        build_trainable(spec, experiment_dir),
        tune_config=tune.TuneConfig(
            search_alg=build_searcher(spec),
            scheduler=build_scheduler(spec),
            num_samples=trial_count(spec),
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=str(experiment_dir.parent),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            # The latest checkpoint is all a restart needs (and holds a finished trial's
            # weights); keeping two lets Tune snapshot its state less often.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=1,
            callbacks=build_callbacks(tracker),
        ),
    )


def build_callbacks(tracker: Any = None) -> list[Any]:
    """Driver-side Tune callbacks: the sweep's MLflow tracker (`orchestration.tracking`), the
    only MLflow writer, which sees every result with its `log_points`; and Tune's TensorBoard
    logger without `log_points` (a list of dicts it would warn about on every result)."""
    callbacks = [tracker] if tracker is not None else []
    callbacks.append(_local_first_json_logger())
    with contextlib.suppress(ImportError):  # no tensorboardX: Tune would only warn too
        callbacks.append(_scalar_tensorboard_logger())
    return callbacks


def _local_first_json_logger() -> Any:
    from ray.tune.logger import JsonLoggerCallback

    class LocalFirstJsonLogger(JsonLoggerCallback):
        """Tune's `result.json` writer, except that a trial restarted by the same driver keeps
        what it logged. Tune's own copies the experiment directory's `result.json` over the
        driver's before the restart, and that copy is synced only every few checkpoints: a
        trial SIGKILLed three times kept 3 of its 6 results. A resumed sweep's driver has no
        local copy yet and still starts from the experiment directory's."""

        def _restore_from_remote(self, file_name: str, trial: Any) -> None:
            if not Path(trial.local_path, file_name).is_file():
                super()._restore_from_remote(file_name, trial)

    return LocalFirstJsonLogger()


def _scalar_tensorboard_logger() -> Any:
    from ray.tune.logger import TBXLoggerCallback

    class ScalarTBXLogger(TBXLoggerCallback):
        def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
            scalars = {k: v for k, v in result.items() if k != LOG_POINTS}
            super().log_trial_result(iteration, trial, scalars)

    return ScalarTBXLogger()


# --- run / resume ------------------------------------------------------------------------------


def _build_features(base: TrialConfig) -> None:
    from trainer.features import load_features

    load_features(base)


def cache_cpus(spec: SweepSpec, nodes: list[dict[str, float]]) -> float:
    """CPUs for the caching task: the sweep's concurrent trials' worth, within one node (one with
    the GPUs a trial asks for), at least one trial's. `nodes`: each live node's resources."""
    res, concurrent = spec.resources, spec.search.max_concurrent
    fit = [n for n in nodes if n.get("GPU", 0.0) >= res.gpus_per_trial]
    largest = max((n.get("CPU", 0.0) for n in fit), default=res.cpus_per_trial)
    per_trial = res.cpus_per_trial * res.workers_per_trial
    wanted = largest if concurrent is None else per_trial * concurrent
    return max(res.cpus_per_trial, min(wanted, largest))


def prepare_features(spec: SweepSpec) -> None:
    """Build the base's encoder-feature cache once, before trials start (they then only read it).

    It runs as a Ray task with one trial's GPUs, so on a cluster the encoder runs where the GPUs
    are (the driver's node may have none); the cache directory must be shared by all nodes. Nothing
    else runs yet, so it takes the CPUs of all the concurrent trials one node can hold.
    """
    import ray

    res = spec.resources
    started = time.perf_counter()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus = cache_cpus(spec, nodes)
    task = ray.remote(num_cpus=cpus, num_gpus=res.gpus_per_trial)(_build_features)
    ray.get(task.remote(spec.base))
    print(f"projsweep: encoder features ready ({time.perf_counter() - started:.0f} s)", flush=True)


def _check_new_experiment(experiment_dir: Path) -> None:
    if experiment_dir.exists() and any(experiment_dir.iterdir()):
        raise ConfigError(
            f"experiment directory {experiment_dir} already exists: continue it with "
            f"`projsweep resume {experiment_dir}`, or pick another --storage or name"
        )


def run_sweep(
    spec: SweepSpec,
    *,
    storage: Path,
    address: str | None = None,
    mlflow_uri: str | None = None,
    mlflow_continue: bool = False,
) -> int:
    """Run the sweep into `<storage>/<name>`; print the best trial. Exit code."""
    from orchestration.tracking import open_tracking

    experiment_dir = storage / spec.name
    _check_new_experiment(experiment_dir)
    tracking = open_tracking(spec, experiment_dir, mlflow_uri, keep_going=mlflow_continue)
    with ray_session(address):
        prepare_features(spec)
        experiment_dir.mkdir(parents=True, exist_ok=True)
        (experiment_dir / SPEC_FILE).write_text(dump_sweep_spec(spec), encoding="utf-8")
        settings = {"address": address, "mlflow_uri": tracking.uri, "started": time.time()}
        (experiment_dir / RUN_FILE).write_text(json.dumps(settings, indent=1), encoding="utf-8")
        started = time.perf_counter()
        build_tuner(spec, experiment_dir, tracking.callback(address)).fit()
    return tracking.finish(finish_sweep(experiment_dir, time.perf_counter() - started))


def resume_sweep(
    experiment_dir: Path,
    *,
    address: str | None = None,
    mlflow_uri: str | None = None,
    mlflow_continue: bool = False,
    retry_failed: bool = False,
) -> int:
    """Continue an interrupted sweep: unfinished trials resume from their checkpoints, finished
    ones are kept as they are; failed ones run again from their checkpoint if `retry_failed`."""
    from ray import tune

    from orchestration.tracking import open_tracking, use_tracker

    experiment_dir = experiment_dir.resolve()
    spec = load_experiment_spec(experiment_dir)
    if not tune.Tuner.can_restore(str(experiment_dir)):
        raise ConfigError(f"{experiment_dir}: no Tune state to resume (did the sweep start?)")
    settings = json.loads((experiment_dir / RUN_FILE).read_text(encoding="utf-8"))
    address = address or settings.get("address")
    mlflow_uri = mlflow_uri or settings.get("mlflow_uri")
    tracking = open_tracking(spec, experiment_dir, mlflow_uri, keep_going=mlflow_continue)
    started = time.perf_counter()
    with ray_session(address):
        tuner = tune.Tuner.restore(
            str(experiment_dir),
            trainable=build_trainable(spec, experiment_dir),
            resume_unfinished=True,
            resume_errored=retry_failed,
        )
        use_tracker(tuner, tracking.callback(address))
        tuner.fit()
    return tracking.finish(finish_sweep(experiment_dir, time.perf_counter() - started))
