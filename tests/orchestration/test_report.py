"""`projsweep report` over an experiment directory (no Ray, no MLflow): plots and the HTML page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mlflow_helpers import MOE_GRID, fake_experiment, tune_results, write_spec

from orchestration.cli import main
from orchestration.experiment import load_experiment
from orchestration.report import pareto_front, trial_curves, write_report

MOE = {"model.projector.type": "moe", "model.projector.num_experts@moe": 2}
SKIP = {"eval/wer": 1e9, "step": 0, "trial_status": "skipped", "skip_reason": "top_k (4) > 2"}


@pytest.fixture
def experiment_dir(tmp_path: Path) -> Path:
    spec = write_spec(tmp_path, "rep", MOE_GRID)
    trials = {
        "mlp_1": ({"model.projector.type": "mlp"}, tune_results(range(10, 41, 10), 20)),
        "moe_2": (MOE | {"model.projector.top_k@moe": 1}, tune_results(range(10, 41, 10), 20, 2)),
        "moe_3": (MOE | {"model.projector.top_k@moe": 4}, [SKIP]),
        "mlp_4": ({"model.projector.type": "mlp"}, tune_results(range(10, 21, 10), 20)),
    }
    return fake_experiment(tmp_path / "runs" / "rep", spec, trials)


def test_report_writes_every_plot_and_a_self_contained_page(experiment_dir: Path) -> None:
    experiment = load_experiment(experiment_dir)
    assert sorted(t.state for t in experiment.trials) == [
        "completed", "completed", "skipped", "stopped early",
    ]  # fmt: skip
    out = write_report(experiment, experiment_dir / "report")
    plots = sorted(p.name for p in out.glob("*.png"))
    assert plots == [
        "router_curves.png",
        "wer_curves.png",
        "wer_vs_projector.num_experts.png",
        "wer_vs_projector.top_k.png",
        "wer_vs_projector.type.png",
        "wer_vs_throughput.png",
    ]
    page = (out / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(plots)
    assert not re.search(r'(src|href)="(https?:|/|\.)', page)  # nothing outside the page
    for trial in experiment.trials:
        assert f"<td>{trial.trial_id}</td>" in page
    assert "<td>stopped early</td>" in page and "top_k (4) &gt; 2" in page


def test_curves_keep_each_step_once_and_the_front_is_non_dominated(experiment_dir: Path) -> None:
    trial = next(t for t in load_experiment(experiment_dir).trials if t.trial_id == "moe_2")
    trial.results.append(trial.results[-1])  # a restarted trial repeats its last steps
    curves = trial_curves(trial)
    assert [s for s, _ in curves["train/loss"]] == [10, 20, 30, 40]
    assert [s for s, _ in curves["router/load/expert_1"]] == [10, 20, 30, 40]
    points = [(100.0, 0.5), (200.0, 0.6), (150.0, 0.7), (50.0, 0.4)]
    assert pareto_front(points) == [(50.0, 0.4), (100.0, 0.5), (200.0, 0.6)]


def test_report_verb_works_without_mlflow(
    experiment_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["report", str(experiment_dir), "-o", str(out)]) == 0
    assert (out / "index.html").is_file() and len(list(out.glob("*.png"))) == 6
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "the report stays local" in captured.err
    assert main(["report", str(tmp_path / "nope"), "-o", str(out)]) == 2
