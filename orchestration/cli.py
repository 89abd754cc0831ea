"""`projsweep VERB …` — the command line. Exit codes: 0 ok · 1 run-time failure · 2 bad input.

Each verb's work lives in a function elsewhere; this module only parses arguments and maps errors to
exit codes. Heavy imports (torch, ray, mlflow) happen inside the verbs so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field by dotted path (value parsed as YAML); repeatable",
    )


def _add_mlflow_continue(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mlflow-continue",
        action="store_true",
        help="run even if the MLflow tracking server is unreachable (metrics are journaled "
        "under the experiment directory and sent when it is back)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="projsweep",
        description="Sweeps over speech-LLM audio projectors on Ray Tune, tracked in MLflow.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    data = verbs.add_parser("data", help="datasets: `data synth` makes the spoken-digits corpus")
    data_verbs = data.add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    synth = data_verbs.add_parser("synth", help="write a spoken-digits corpus with espeak-ng")
    synth.add_argument("--out", required=True, help="directory for the `datasets` DatasetDict")
    synth.add_argument("--num", type=int, default=2000, help="utterances in all splits together")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--noise", type=float, default=0.0, help="white-noise std (0 for none)")
    synth.set_defaults(run="trainer.synth:synth_command")

    train = verbs.add_parser("train", help="one trial, no Ray")
    train.add_argument("config", help="trial config YAML (see sweeps/trials/)")
    _add_set(train)
    train.add_argument(
        "--out", default=None, help="output directory (default: ./projsweep-runs/train/<time>)"
    )
    train.add_argument(
        "--resume", action="store_true", help="continue from --out's last checkpoint"
    )
    train.set_defaults(run="trainer.entry:train_command")

    validate = verbs.add_parser("validate", help="check sweep specs and sample a few configs")
    validate.add_argument("specs", nargs="+", metavar="SWEEP.yaml")
    validate.add_argument("--samples", type=int, default=3, help="configs sampled per spec")
    _add_set(validate)
    validate.set_defaults(run="orchestration.commands:validate_command")

    run = verbs.add_parser("run", help="run a sweep on Ray Tune")
    run.add_argument("spec", metavar="SWEEP.yaml")
    run.add_argument(
        "--address", default=None, help="Ray address: `auto`, `ray://HOST:10001`; default local"
    )
    run.add_argument(
        "--storage", default=None, help="experiment storage root (default ./projsweep-runs)"
    )
    run.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI")
    _add_mlflow_continue(run)
    _add_set(run)
    run.set_defaults(run="orchestration.commands:run_command")

    resume = verbs.add_parser("resume", help="continue an interrupted sweep")
    resume.add_argument("experiment_dir")
    resume.add_argument("--address", default=None)
    resume.add_argument("--mlflow-uri", default=None, help="default: the one the sweep used")
    _add_mlflow_continue(resume)
    resume.add_argument(
        "--retry-failed", action="store_true", help="run failed trials again from their checkpoint"
    )
    resume.set_defaults(run="orchestration.commands:resume_command")

    status = verbs.add_parser("status", help="table of a sweep's trials")
    status.add_argument("experiment_dir")
    status.set_defaults(run="orchestration.commands:status_command")

    export = verbs.add_parser("export", help="write the best trial's config")
    export.add_argument("experiment_dir")
    export.add_argument("-o", "--output", required=True, metavar="BEST.yaml")
    export.add_argument(
        "--pareto", action="store_true", help="the non-dominated set (multi-objective)"
    )
    export.set_defaults(run="orchestration.commands:export_command")

    report = verbs.add_parser("report", help="plots and an HTML page comparing trials")
    report.add_argument("experiment_dir")
    report.add_argument("-o", "--output", required=True, metavar="REPORT_DIR")
    report.set_defaults(run="orchestration.commands:report_command")

    submit = verbs.add_parser("submit", help="submit `run` as a Ray job")
    submit.add_argument("spec", metavar="SWEEP.yaml")
    submit.add_argument("--address", required=True, help="Ray dashboard, e.g. http://HEAD:8265")
    submit.add_argument(
        "--storage", default=None, help="experiment storage root on the cluster (~/projsweep-runs)"
    )
    submit.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI for the job")
    _add_set(submit)
    submit.set_defaults(run="orchestration.commands:submit_command")

    ui = verbs.add_parser("ui", help="MLflow UI on 127.0.0.1 over the default store")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(run="orchestration.commands:ui_command")
    return parser


def _resolve(target: str) -> Callable[[argparse.Namespace], int]:
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from trainer.overrides import ConfigError

    try:
        return int(_resolve(args.run)(args) or EXIT_OK)
    except ConfigError as err:
        print(f"projsweep: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("projsweep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
