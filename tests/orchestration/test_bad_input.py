"""Bad sweep input: exit 2 and one message naming the field, before Ray starts or a file appears.

Every case goes through `projsweep run` in-process; starting Ray or building features would fail
the test (they are replaced by tripwires), and the storage directory must not appear.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestration import runner
from orchestration.cli import main

GOOD: dict[str, Any] = {
    "name": "bad-input",
    "base": {"train": {"max_steps": 100, "eval_every": 50, "warmup_steps": 10}},
    "search": {
        "metric": "eval/wer",
        "mode": "min",
        "algorithm": "tpe",
        "num_samples": 4,
        "max_concurrent": 2,
        "scheduler": {"type": "asha", "grace_period": 50, "reduction_factor": 2},
        "space": {
            "model.projector.type": {"choice": ["mlp", "moe"]},
            "train.lr": {"loguniform": [1e-4, 1e-2]},
        },
        "when": {"moe": {"model.projector.top_k": {"choice": [1, 2]}}},
    },
    "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
}


def edit(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set a value by path; `|` separates the parts (space keys contain dots)."""

    def apply(spec: dict[str, Any]) -> None:
        *parents, last = path.split("|")
        node = spec
        for part in parents:
            node = node[part]
        node[last] = value

    return apply


def drop(path: str) -> Callable[[dict[str, Any]], None]:
    def apply(spec: dict[str, Any]) -> None:
        *parents, last = path.split("|")
        node = spec
        for part in parents:
            node = node[part]
        del node[last]

    return apply


SPACE = "search|space"
LR = "search|space|train.lr"

# (id, edit of the good spec, --set overrides, text the message must contain)
CASES: list[tuple[str, Callable[[dict[str, Any]], None] | None, list[str], str]] = [
    ("unknown-top-level-key", edit("nme", "x"), [], "nme: unknown field"),
    ("missing-name", drop("name"), [], "name: Field required"),
    ("bad-name", edit("name", "a/b"), [], "name:"),
    ("missing-base-file", edit("base", "nowhere.yaml"), [], "base: file not found"),
    ("base-unknown-field", edit("base", {"train": {"lrr": 1}}), [], "base.train.lrr"),
    ("base-bad-value", None, ["base.train.lr=-1"], "base.train.lr"),
    ("base-bad-projector", None, ["base.model.projector.type=foo"], "base.model.projector"),
    ("missing-search", drop("search"), [], "search: Field required"),
    ("unknown-metric", edit("search|metric", "eval/accuracy"), [], "search.metric"),
    ("metric-list-mode-str", edit("search|metric", ["eval/wer", "train/samples_per_s"]), [],
     "search.mode"),
    ("metric-mode-lengths", None,
     ["search.metric=[eval/wer, train/samples_per_s]", "search.mode=[min]"], "search.mode"),
    ("duplicate-metric", None, ["search.metric=[eval/wer, eval/wer]", "search.mode=[min, min]"],
     "search.metric"),
    ("bad-mode", edit("search|mode", "minimize"), [], "search.mode"),
    ("bad-algorithm", edit("search|algorithm", "bayes"), [], "search.algorithm"),
    ("zero-samples", None, ["search.num_samples=0"], "search.num_samples"),
    ("missing-samples", drop("search|num_samples"), [], "search.num_samples"),
    ("zero-concurrency", None, ["search.max_concurrent=0"], "search.max_concurrent"),
    ("unknown-scheduler", edit("search|scheduler", {"type": "hyperband"}), [], "search.scheduler"),
    ("grace-beyond-budget", None, ["search.scheduler.grace_period=100"],
     "search.scheduler.grace_period"),
    ("reduction-factor-one", None, ["search.scheduler.reduction_factor=1"],
     "search.scheduler.reduction_factor"),
    ("asha-max-t-given", None, ["search.scheduler.max_t=50"], "search.scheduler.max_t"),
    ("asha-unknown-metric", None, ["search.scheduler.metric=loss", "search.scheduler.mode=min"],
     "search.scheduler.metric"),
    ("asha-metric-without-mode", None, ["search.scheduler.metric=eval/loss"], "search.scheduler"),
    ("empty-space", edit(SPACE, {}), [], "search.space: empty"),
    ("unknown-distribution", edit(LR, {"normal": [0, 1]}), [], "search.space.train.lr"),
    ("two-distributions", edit(LR, {"uniform": [0.1, 1], "choice": [1]}), [],
     "search.space.train.lr"),
    ("loguniform-nonpositive", None, ["search.space.train.lr={loguniform: [0, 0.1]}"],
     "search.space.train.lr.loguniform"),
    ("uniform-reversed", edit(LR, {"uniform": [0.1, 0.01]}), [], "search.space.train.lr.uniform"),
    ("empty-choice", edit(LR, {"choice": []}), [], "search.space.train.lr.choice"),
    ("randint-float", edit(LR, {"randint": [0.5, 2]}), [], "search.space.train.lr.randint"),
    ("choice-of-lists", edit(LR, {"choice": [[1e-3], [1e-4]]}), [], "search.space.train.lr.choice"),
    ("no-such-field", edit(f"{SPACE}|train.learning_rate", {"choice": [1]}), [],
     "search.space.train.learning_rate"),
    ("path-through-value", edit(f"{SPACE}|train.lr.x", {"choice": [1]}), [],
     "search.space.train.lr.x"),
    ("path-is-section", edit(f"{SPACE}|model.encoder", {"choice": [1]}), [],
     "search.space.model.encoder"),
    ("value-breaks-field", edit(f"{SPACE}|train.batch_size", {"choice": [0, 8]}), [],
     "search.space.train.batch_size"),
    ("uniform-on-int-field", edit(f"{SPACE}|train.batch_size", {"uniform": [8, 33]}), [],
     "search.space.train.batch_size"),
    ("field-of-another-type", edit(f"{SPACE}|model.projector.num_experts", {"choice": [2]}), [],
     "search.space.model.projector.num_experts"),
    ("unknown-projector-type", edit(f"{SPACE}|model.projector.type", {"choice": ["mlp", "lstm"]}),
     [], "search.space.model.projector.type"),
    ("type-not-categorical", edit(f"{SPACE}|model.projector.type", {"uniform": [0, 1]}), [],
     "search.space.model.projector.type"),
    ("when-type-not-in-choice", edit("search|when|qformer", {"model.projector.window_size":
     {"choice": [10]}}), [], "search.when.qformer"),
    ("when-without-type", drop(f"{SPACE}|model.projector.type"), [], "search.when"),
    ("when-entry-empty", edit("search|when|moe", {}), [], "search.when.moe"),
    ("when-field-not-of-type", edit("search|when|mlp", {"model.projector.num_experts":
     {"choice": [2]}}), [], "search.when.mlp.model.projector.num_experts"),
    ("when-duplicates-space", edit("search|when|moe", {"train.lr": {"choice": [1e-3]}}), [],
     "search.when.moe.train.lr"),
    ("grid-with-tpe", edit(LR, {"grid": [1e-3, 1e-4]}), [], "search.space.train.lr"),
    ("sampled-with-grid", edit("search|algorithm", "grid"), [], "search.space.train.lr"),
    ("cmaes-multi-objective", None, ["search.algorithm=cmaes",
     "search.metric=[eval/wer, train/samples_per_s]", "search.mode=[min, max]"],
     "search.algorithm"),
    ("cmaes-only-choices", None, ["search.algorithm=cmaes",
     "search.space.train.lr={choice: [0.001]}"], "search.space"),
    ("every-sample-infeasible", edit(SPACE, {"model.projector.type": {"choice": ["moe"]},
     "model.projector.num_experts": {"choice": [1]}, "model.projector.top_k": {"choice": [2]}}),
     ["search.when={}"], "search.space: every sampled config breaks a rule"),
    ("point-unknown-path", edit("search|points_to_evaluate", [{"train.wd": 0.1}]), [],
     "search.points_to_evaluate[0].train.wd: not a dimension"),
    ("point-when-field-without-type", edit("search|points_to_evaluate",
     [{"model.projector.top_k": 1}]), [], "needs model.projector.type in the point"),
    ("point-value-outside", edit("search|points_to_evaluate", [{"train.lr": 0.5}]), [],
     "search.points_to_evaluate[0].train.lr: value 0.5 is not a number in"),
    ("point-choice-outside", edit("search|points_to_evaluate",
     [{"model.projector.type": "mosa"}]), [], "search.points_to_evaluate[0].model.projector.type"),
    ("point-empty", edit("search|points_to_evaluate", [{}]), [],
     "search.points_to_evaluate[0]: empty"),
    ("points-beyond-budget", None, ["search.num_samples=1",
     "search.points_to_evaluate=[{train.lr: 0.001}, {train.lr: 0.002}]"],
     "search.points_to_evaluate: 2 points but num_samples is 1"),
    ("point-breaks-rule", None, ["search.when.moe.model.projector.num_experts={choice: [1, 2]}",
     "search.points_to_evaluate=[{model.projector.type: moe, train.lr: 0.001, "
     "model.projector.top_k: 2, model.projector.num_experts: 1}]"],
     "search.points_to_evaluate[0]: breaks a rule"),
    ("fractional-gpus-above-one", None, ["resources.gpus_per_trial=1.5"], "resources"),
    ("zero-cpus", None, ["resources.cpus_per_trial=0"], "resources.cpus_per_trial"),
    ("unknown-resource", None, ["resources.gpu=1"], "resources.gpu"),
    ("set-without-equals", None, ["search.num_samples"], "--set"),
    ("set-through-value", None, ["name.x=1"], "--set name.x"),
    ("set-bad-type", None, ["base.train.max_steps=abc"], "base.train.max_steps"),
]  # fmt: skip


@pytest.fixture
def tripwires(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_start(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("bad input reached the sweep runner")

    monkeypatch.setattr(runner, "prepare_features", must_not_start)
    monkeypatch.setattr(runner, "ray_session", must_not_start)


@pytest.mark.usefixtures("tripwires")
@pytest.mark.parametrize(
    ("change", "overrides", "expected"),
    [pytest.param(c, o, e, id=i) for i, c, o, e in CASES],
)
def test_bad_spec_exits_2_naming_the_field(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    change: Callable[[dict[str, Any]], None] | None,
    overrides: list[str],
    expected: str,
) -> None:
    spec = copy.deepcopy(GOOD)
    if change is not None:
        change(spec)
    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    argv = ["run", str(spec_file), "--storage", str(tmp_path / "runs")]
    code = main(argv + [a for o in overrides for a in ("--set", o)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err
    assert err.count("projsweep: error:") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]


@pytest.mark.usefixtures("tripwires")
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("name: [unclosed", "not valid YAML", id="malformed-yaml"),
        pytest.param("- a\n- b\n", "expected a mapping", id="not-a-mapping"),
    ],
)
def test_unreadable_spec_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text(text)
    code = main(["run", str(spec_file), "--storage", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and "sweep.yaml" in err
    assert not (tmp_path / "runs").exists()


def test_missing_spec_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


@pytest.mark.usefixtures("tripwires")
def test_existing_experiment_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text(yaml.safe_dump(GOOD))
    existing = tmp_path / "runs" / GOOD["name"]
    existing.mkdir(parents=True)
    (existing / "spec.yaml").write_text("keep")
    assert main(["run", str(spec_file), "--storage", str(tmp_path / "runs")]) == 2
    assert "projsweep resume" in capsys.readouterr().err
    assert (existing / "spec.yaml").read_text() == "keep"


def test_the_good_spec_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text(yaml.safe_dump(GOOD))
    assert main(["validate", str(spec_file), "--samples", "4"]) == 0
    assert "bad-input: tpe, 4 trials" in capsys.readouterr().out
