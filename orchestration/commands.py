"""The sweep verbs: `validate run resume status export submit` (+ `report`, `ui` of issue 5).

Each takes the parsed arguments and returns an exit code; bad input raises `ConfigError` (exit 2)
before Ray starts or anything is written. Ray, Optuna and MLflow are imported inside the verbs
that need them so `validate`, `status` and `export` stay quick.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestration.spec import AshaScheduler, SweepSpec, load_sweep_spec
from orchestration.table import format_table, union_keys
from trainer.overrides import ConfigError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_STORAGE = "projsweep-runs"


def describe_spec(spec: SweepSpec) -> str:
    """One line: algorithm, budget, scheduler, objective, resources."""
    from orchestration.space import trial_count

    search = spec.search
    objective = ", ".join(f"{m} ({o})" for m, o in zip(search.metrics, search.modes, strict=False))
    if isinstance(search.scheduler, AshaScheduler):
        asha = search.scheduler
        on = f" on {asha.metric}" if asha.metric else ""
        sched = (
            f"ASHA{on} (grace {asha.grace_period}, ×{asha.reduction_factor:g}, "
            f"max {spec.max_steps} steps)"
        )
    else:
        sched = f"no early stopping ({spec.max_steps} steps)"
    res = spec.resources
    return (
        f"{spec.name}: {search.algorithm}, {trial_count(spec)} trials, {sched}; {objective}; "
        f"{search.max_concurrent or 'unlimited'} concurrent; per trial {res.cpus_per_trial:g} CPU, "
        f"{res.gpus_per_trial:g} GPU, {res.workers_per_trial} worker(s)"
    )


def sample_table(spec: SweepSpec, count: int) -> str:
    from orchestration.space import display_params, resolve_trial_config, sample_flat_configs

    rows = []
    for i, sampled in enumerate(sample_flat_configs(spec, count)):
        try:
            resolve_trial_config(spec.base, sampled)
            check = "ok"
        except ConfigError as err:
            check = f"skipped: {err}"
        rows.append({"#": i, **display_params(sampled), "check": check})
    columns = [c for c in union_keys(rows) if c != "check"] + ["check"]
    return format_table(rows, columns)


def validate_command(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.specs:
        try:
            spec = load_sweep_spec(path, args.overrides)
        except ConfigError as err:
            print(f"projsweep: error: {err}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: ok — {describe_spec(spec)}")
        print(sample_table(spec, args.samples), end="\n\n")
    return EXIT_BAD_INPUT if failed else EXIT_OK


def run_command(args: argparse.Namespace) -> int:
    from orchestration.runner import run_sweep

    spec = load_sweep_spec(args.spec, args.overrides)
    storage = Path(args.storage or DEFAULT_STORAGE).expanduser().resolve()
    return run_sweep(
        spec,
        storage=storage,
        address=args.address,
        mlflow_uri=args.mlflow_uri,
        mlflow_continue=args.mlflow_continue,
    )


def resume_command(args: argparse.Namespace) -> int:
    from orchestration.runner import resume_sweep

    return resume_sweep(
        Path(args.experiment_dir),
        address=args.address,
        mlflow_uri=args.mlflow_uri,
        mlflow_continue=args.mlflow_continue,
        retry_failed=args.retry_failed,
    )


def status_command(args: argparse.Namespace) -> int:
    from orchestration.experiment import load_experiment, status_table

    print(status_table(load_experiment(Path(args.experiment_dir))))
    return EXIT_OK


def export_command(args: argparse.Namespace) -> int:
    from orchestration.experiment import export_best, export_pareto, load_experiment

    experiment = load_experiment(Path(args.experiment_dir))
    out = Path(args.output)
    written = export_pareto(experiment, out) if args.pareto else [export_best(experiment, out)]
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK


def submit_command(args: argparse.Namespace) -> int:
    from orchestration.submit import submit_sweep

    load_sweep_spec(args.spec, args.overrides)  # bad input fails here, before anything is sent
    return submit_sweep(
        args.spec,
        address=args.address,
        overrides=args.overrides,
        storage=args.storage,
        mlflow_uri=args.mlflow_uri,
    )


def report_command(args: argparse.Namespace) -> int:
    from orchestration.experiment import load_experiment
    from orchestration.mlflow_sink import log_report
    from orchestration.report import write_report

    experiment = load_experiment(Path(args.experiment_dir))
    out = write_report(experiment, Path(args.output))
    print(f"wrote {out / 'index.html'} and {len(list(out.glob('*.png')))} plots")
    log_report(experiment.path, out, experiment.spec.name)
    return EXIT_OK


def ui_command(args: argparse.Namespace) -> int:
    from orchestration.mlflow_store import run_ui

    return run_ui(args.port)
