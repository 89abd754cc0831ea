"""`status` and `export` read an experiment directory in Tune's file layout, without Ray.

The directories here are written by hand in the layout Tune writes (`trial_<id>/params.json`,
`result.json` lines, `error.txt`) with the results `orchestration.trial` reports; the Ray tests
(`test_run.py`) check the same verbs on real sweeps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestration.cli import main
from orchestration.experiment import load_experiment, pareto_trials
from orchestration.layout import SPEC_FILE
from orchestration.spec import dump_sweep_spec, parse_sweep_spec
from trainer.config import load_trial_config

INFEASIBLE = 1e9


def write_spec(path: Path, metric: Any = "eval/wer", mode: Any = "min") -> None:
    spec = parse_sweep_spec(
        {
            "name": "fake",
            "base": {"train": {"max_steps": 100, "eval_every": 50, "warmup_steps": 10}},
            "search": {
                "metric": metric,
                "mode": mode,
                "num_samples": 6,
                "space": {
                    "model.projector.type": {"choice": ["mlp", "moe"]},
                    "train.lr": {"loguniform": [1e-4, 1e-2]},
                },
                "when": {"moe": {"model.projector.top_k": {"choice": [1, 2, 4]}}},
            },
        },
        spec_dir=path,
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / SPEC_FILE).write_text(dump_sweep_spec(spec))


def write_trial(
    root: Path,
    trial_id: str,
    params: dict[str, Any],
    results: list[dict[str, Any]],
    error: str | None = None,
) -> None:
    d = root / f"trial_{trial_id}"
    d.mkdir()
    (d / "params.json").write_text(json.dumps(params))
    (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in results))
    if error:
        (d / "error.txt").write_text(error)


def ev(step: int, wer: float, sps: float = 100.0, **extra: Any) -> dict[str, Any]:
    return {"step": step, "eval/wer": wer, "eval/cer": wer / 2, "train/samples_per_s": sps} | extra


MLP = {"model.projector.type": "mlp", "train.lr": 1e-3}
MOE = {"model.projector.type": "moe", "train.lr": 2e-3, "model.projector.top_k@moe": 2}


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    root = tmp_path / "fake"
    write_spec(root)
    write_trial(
        root,
        "aaaa",
        MOE,
        [ev(50, 0.5), ev(100, 0.2), ev(100, 0.2, trial_status="completed", done=True)],
    )
    write_trial(root, "asha", MLP, [ev(50, 0.5), ev(100, 0.25, done=True)])  # stopped at max_t
    write_trial(root, "bbbb", MLP, [ev(50, 0.6, done=True)])
    write_trial(
        root,
        "cccc",
        {**MOE, "model.projector.top_k@moe": 4},
        [
            {
                "step": 0,
                "eval/wer": INFEASIBLE,
                "trial_status": "skipped",
                "skip_reason": "model.projector: top_k (4) must be <= num_experts (4)",
                "done": True,
            }
        ],
    )
    write_trial(
        root, "dddd", MLP, [ev(50, 0.4), ev(60, INFEASIBLE, trial_status="diverged", done=True)]
    )
    write_trial(root, "eeee", MLP, [ev(50, 0.1)], error="Traceback …\nRuntimeError: boom")
    write_trial(root, "ffff", MLP, [ev(50, 0.3)])
    return root


def test_states_and_ranking(experiment: Path) -> None:
    loaded = load_experiment(experiment)
    states = {t.trial_id: t.state for t in loaded.trials}
    assert states == {
        "aaaa": "completed",
        "asha": "completed",
        "bbbb": "stopped early",
        "cccc": "skipped",
        "dddd": "diverged",
        "eeee": "failed",
        "ffff": "unfinished",
    }
    assert [t.trial_id for t in loaded.ranked()] == ["aaaa", "asha", "ffff", "bbbb"]
    diverged = next(t for t in loaded.trials if t.trial_id == "dddd")
    assert diverged.last_value("eval/wer") == 0.4  # the stand-in value is not an evaluation


def test_a_restarted_trial_has_not_failed_until_its_restarts_are_used_up(tmp_path: Path) -> None:
    root = tmp_path / "fake"
    write_spec(root)  # max_failures: 2 (the default)
    once = "Failure # 1 (occurred at 2026-01-01_00-00-00)\nray::ImplicitFunc.train() …\n"
    thrice = once + once.replace("# 1", "# 2") + once.replace("# 1", "# 3")
    write_trial(root, "runs", MLP, [ev(50, 0.5)], error=once)  # restarted, running again
    write_trial(root, "asha", MLP, [ev(50, 0.5, done=True)], error=once)  # restarted, then stopped
    write_trial(root, "done", MLP, [ev(50, 0.5), ev(100, 0.3)], error=once)  # restarted, done
    write_trial(root, "gone", MLP, [ev(50, 0.5, done=True)], error=thrice)  # 3 > 2: failed
    states = {t.trial_id: t.state for t in load_experiment(root).trials}
    assert states == {
        "runs": "unfinished",
        "asha": "stopped early",
        "done": "completed",
        "gone": "failed",
    }


def test_status_prints_a_table(experiment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", str(experiment)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("fake: 7 trials")
    header = lines[1].split()
    for column in ("trial", "state", "projector.type", "train.lr", "eval/wer", "steps"):
        assert column in header
    body = "\n".join(lines[2:])
    for state in ("completed", "stopped early", "skipped", "diverged", "failed", "unfinished"):
        assert state in body
    assert "top_k (4) must be <= num_experts" in body
    assert lines[2].startswith("aaaa")


def test_export_writes_a_runnable_config_with_provenance(experiment: Path, tmp_path: Path) -> None:
    out = tmp_path / "best.yaml"
    assert main(["export", str(experiment), "-o", str(out)]) == 0
    text = out.read_text()
    assert "sweep `fake`, trial aaaa" in text and "eval/wer=0.2" in text
    cfg = load_trial_config(out)
    assert cfg.model.projector.type == "moe" and cfg.model.projector.top_k == 2
    assert cfg.train.lr == 2e-3
    as_base = parse_sweep_spec(
        {"name": "again", "base": "best.yaml", "search": {"metric": "eval/wer", "mode": "min",
         "num_samples": 1, "space": {"train.seed": {"choice": [0, 1]}}}},
        spec_dir=tmp_path,
    )  # fmt: skip
    assert as_base.base == cfg


def test_pareto_front_of_two_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "multi"
    write_spec(root, metric=["eval/wer", "train/samples_per_s"], mode=["min", "max"])
    end = {"trial_status": "completed", "done": True}
    write_trial(root, "fast", MLP, [ev(100, 0.3, sps=300, **end)])
    write_trial(root, "good", MOE, [ev(100, 0.1, sps=100, **end)])
    write_trial(root, "both", MLP, [ev(100, 0.2, sps=200, **end)])
    write_trial(root, "dominated", MLP, [ev(100, 0.3, sps=150, **end)])
    front = {t.trial_id for t in pareto_trials(load_experiment(root))}
    assert front == {"fast", "good", "both"}
    out_dir = tmp_path / "front"
    assert main(["export", str(root), "-o", str(out_dir), "--pareto"]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "trial_both.yaml",
        "trial_fast.yaml",
        "trial_good.yaml",
    ]
    for path in out_dir.iterdir():
        load_trial_config(path)


def test_pareto_needs_a_metric_list(experiment: Path, tmp_path: Path) -> None:
    assert main(["export", str(experiment), "-o", str(tmp_path / "x"), "--pareto"]) == 2


def test_status_of_a_directory_that_is_no_experiment(tmp_path: Path) -> None:
    assert main(["status", str(tmp_path)]) == 2
    assert main(["resume", str(tmp_path)]) == 2


def test_spec_in_the_experiment_round_trips(experiment: Path) -> None:
    data = yaml.safe_load((experiment / SPEC_FILE).read_text())
    assert data["name"] == "fake" and isinstance(data["base"], dict)


def test_a_trial_without_cpu_threads_gets_the_cpus_ray_gave_it() -> None:
    from orchestration.trial import with_trial_threads

    base = load_trial_config({})
    assert base.train.cpu_threads is None
    assert with_trial_threads(base, 1.0).train.cpu_threads == 1
    assert with_trial_threads(base, 3.0).train.cpu_threads == 3
    assert with_trial_threads(base, 0.5).train.cpu_threads == 1  # a fraction still runs
    pinned = load_trial_config({}, ["train.cpu_threads=2"])
    assert with_trial_threads(pinned, 8.0).train.cpu_threads == 2  # the config's own choice wins
