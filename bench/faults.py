"""Fault table: each fault case of `tests/cluster` as its own small real sweep, on a real
`ray start` head with a real `mlflow server` (the node case on `ray.cluster_utils.Cluster`).

    python bench/faults.py [--cases kills,nan,raises,driver,nodes] [--keep DIR]

Prints, per case: trials finished / all, restarts seen (trial processes beyond the first),
trials re-run (finished before the fault, results changed after it), steps redone (log steps an
unfinished trial trained and reported twice: it went back behind its last report), metric
points lost and duplicated (in MLflow or the experiment directory, against the trainer's log
schedule), disagreements between `status` / `export` and MLflow, and wall time (the sweep's
start to its end, `resume` included). It prints what it measured; it asserts nothing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# sys.path[0] is this folder, whose trainer.py / projectors.py would shadow the packages: replace
# it with the project root and the test helpers the cases live in.
sys.path[0:1] = [str(ROOT), str(ROOT / "tests" / "cluster"), str(ROOT / "tests" / "orchestration")]

from fault_cases import (  # noqa: E402
    FaultRun,
    Lab,
    lab,
    node_loss,
    trial_raises,
    trial_sigkills,
)
from mlflow import MlflowClient  # noqa: E402
from mlflow_audit import Audit, audit  # noqa: E402

from orchestration.table import format_table  # noqa: E402

CASES: dict[str, tuple[str, Callable[[Lab], FaultRun]]] = {
    "kills": ("trial process SIGKILLed ×3", lambda lb: trial_sigkills(lb, "kills", 3, nan=False)),
    "nan": ("loss turns NaN", lambda lb: trial_sigkills(lb, "nan", 0, nan=True)),
    "raises": ("trial raises", lambda lb: trial_raises(lb, "raises", kill_driver=False)),
    "driver": (
        "driver SIGKILLed, then resume",
        lambda lb: trial_raises(lb, "driver", kill_driver=True),
    ),
}


def row(label: str, run: FaultRun, result: Audit) -> dict[str, Any]:
    return {
        "case": label,
        "trials finished": f"{result.finished}/{len(result.states)}",
        "states": ", ".join(sorted(result.states.values())),
        "restarts": result.restarts,
        "trials re-run": len(result.rerun),
        "steps redone": sum(len(steps) for steps in result.redone.values()),
        "metric points lost": len(result.lost),
        "duplicated": len(result.duplicated),
        "disagreements": len(result.disagreements),
        "wall s": round(run.wall_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="kills,nan,raises,driver,nodes")
    parser.add_argument("--keep", default=None, help="keep the experiments and logs here")
    args = parser.parse_args()
    wanted = args.cases.split(",")
    root = Path(args.keep or tempfile.mkdtemp(prefix="projsweep-faults-"))
    rows, details = [], []
    lab_cases = [c for c in wanted if c in CASES]
    if lab_cases:
        with lab(root / "lab") as the_lab:
            client = MlflowClient(the_lab.mlflow_uri)
            for case in lab_cases:
                label, run_case = CASES[case]
                run = run_case(the_lab)
                result = audit(run.experiment_dir, client, run.finished_before)
                rows.append(row(label, run, result))
                details.append((label, run, result))
    if "nodes" in wanted:
        run = node_loss(root / "nodes")
        client = MlflowClient(f"sqlite:///{run.shared / 'mlflow.db'}")
        result = audit(run.experiment_dir, client, run.finished_before)
        rows.append(row("worker node removed", run, result))
        details.append(("worker node removed", run, result))
    print(format_table(rows, list(rows[0])))
    for label, run, result in details:
        redone = [f"{tid} trained steps {steps} twice" for tid, steps in result.redone.items()]
        problems = result.rerun + redone + result.lost[:5] + result.duplicated[:5]
        problems += result.disagreements
        print(f"\n{label}: {'; '.join(run.events) or 'no fault injected'}")
        for problem in problems:
            print(f"  {problem}")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"\nexperiments and logs in {root}")


if __name__ == "__main__":
    main()
