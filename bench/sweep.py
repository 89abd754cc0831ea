"""Sweep-engine benchmark on the tiny preset: TPE + ASHA against random search without early
stopping, at equal `num_samples`, and Tune's overhead.

    python -m bench.sweep [--num-samples 8] [--max-concurrent 2] [--set base.train.max_steps=…]

Prints, per sweep: wall time of the Tune run (feature cache built beforehand, outside the timing),
best eval WER, trials by state, and Tune's overhead = sweep wall ÷ (Σ trial time ÷ concurrency),
where a trial's time is the time its trial function ran (Tune's `time_total_s`), and the optimiser
steps trained in all (the work, independent of whatever else loads the machine). Targets: TPE + ASHA
≥ 2× less wall time at equal or better best WER; overhead ≤ 1.15.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this directory would come first on sys.path and its projectors.py and
# trainer.py (the other benchmarks) would shadow the packages of the same names.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from orchestration.experiment import Experiment, load_experiment  # noqa: E402
from orchestration.layout import SPEC_FILE  # noqa: E402
from orchestration.runner import build_tuner, prepare_features, ray_session  # noqa: E402
from orchestration.spec import SweepSpec, dump_sweep_spec, load_sweep_spec  # noqa: E402
from orchestration.table import format_table  # noqa: E402

SMOKE = Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml"


def timed_sweep(spec: SweepSpec, storage: Path) -> tuple[float, Experiment]:
    """Run the sweep on the current Ray session; (wall seconds of `fit`, the experiment)."""
    experiment_dir = storage / spec.name
    experiment_dir.mkdir(parents=True)
    (experiment_dir / SPEC_FILE).write_text(dump_sweep_spec(spec), encoding="utf-8")
    started = time.perf_counter()
    build_tuner(spec, experiment_dir).fit()
    return time.perf_counter() - started, load_experiment(experiment_dir)


def summary(label: str, wall: float, experiment: Experiment, concurrency: int) -> dict[str, Any]:
    trial_seconds = sum(t.results[-1]["time_total_s"] for t in experiment.trials if t.results)
    steps = sum(t.steps or 0 for t in experiment.trials)
    ranked = experiment.ranked()
    states: dict[str, int] = {}
    for trial in experiment.trials:
        states[trial.state] = states.get(trial.state, 0) + 1
    return {
        "sweep": label,
        "wall s": wall,
        "best eval/wer": ranked[0].last_value("eval/wer") if ranked else None,
        "trials": ", ".join(f"{n} {s}" for s, n in states.items()),
        "Σ trial s": trial_seconds,
        "Σ steps": steps,
        "overhead": wall / (trial_seconds / concurrency) if trial_seconds else None,
    }


def variants(args: argparse.Namespace) -> list[tuple[str, SweepSpec]]:
    common = [*args.overrides, f"search.num_samples={args.num_samples}"]
    common.append(f"search.max_concurrent={args.max_concurrent}")
    tpe = load_sweep_spec(SMOKE, [*common, "name=bench-tpe-asha", "search.algorithm=tpe"])
    rand = load_sweep_spec(
        SMOKE,
        [*common, "name=bench-random", "search.algorithm=random", "search.scheduler={type: none}"],
    )
    return [("TPE + ASHA", tpe), ("random, no early stopping", rand)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--storage", default=None, help="keep the experiments here")
    args = parser.parse_args()
    specs = variants(args)
    storage = Path(args.storage or tempfile.mkdtemp(prefix="projsweep-bench-"))
    rows = []
    with ray_session(None):
        prepare_features(specs[0][1])
        for label, spec in specs:
            wall, experiment = timed_sweep(spec, storage)
            rows.append(summary(label, wall, experiment, args.max_concurrent))
    print(format_table(rows, list(rows[0])))
    tpe, rand = rows
    print(
        f"\nwall-time ratio random ÷ TPE+ASHA: {rand['wall s'] / tpe['wall s']:.2f} (target ≥ 2); "
        f"optimiser steps trained, random ÷ TPE+ASHA: {rand['Σ steps'] / tpe['Σ steps']:.2f} "
        "(the work done, whatever else loads the machine); "
        f"best WER {tpe['best eval/wer']} vs {rand['best eval/wer']} (target ≤); "
        f"experiments in {storage}"
    )


if __name__ == "__main__":
    main()
