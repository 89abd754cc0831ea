"""Conditional spaces: sampling, grid points, resolving a sample into a trial config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

from orchestration.runner import build_searcher, cache_cpus
from orchestration.space import (
    grid_points,
    resolve_trial_config,
    sample_flat_configs,
    suggest_flat_config,
    trial_count,
)
from orchestration.spec import ResourcesSpec, SweepSpec, parse_sweep_spec
from projectors.config import MoEConfig, QFormerConfig
from trainer.overrides import ConfigError


def make_spec(search: dict[str, Any], base: dict[str, Any] | None = None) -> SweepSpec:
    data = {
        "name": "t",
        "base": base or {"train": {"max_steps": 100, "eval_every": 50, "warmup_steps": 10}},
        "search": {"metric": "eval/wer", "mode": "min", "num_samples": 4, **search},
    }
    return parse_sweep_spec(data, spec_dir=Path("."))


CONDITIONAL = {
    "space": {
        "model.projector.type": {"choice": ["mlp", "mosa", "moe", "qformer"]},
        "train.lr": {"loguniform": [1e-4, 1e-2]},
    },
    "when": {
        "mlp": {"model.projector.stride": {"choice": [2, 4]}},
        "moe": {
            "model.projector.stride": {"choice": [4, 8]},
            "model.projector.num_experts": {"choice": [2, 4]},
            "model.projector.top_k": {"choice": [1, 2, 4]},
        },
    },
}


def test_define_by_run_samples_only_the_chosen_types_fields() -> None:
    spec = make_spec(CONDITIONAL)
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        sampler = optuna.samplers.TPESampler(
            seed=0, multivariate=True, group=True, constant_liar=True, n_startup_trials=3
        )
    study = optuna.create_study(sampler=sampler)
    seen: set[str] = set()
    for _ in range(30):
        trial = study.ask()
        sampled = suggest_flat_config(trial, spec.search)
        ptype = sampled["model.projector.type"]
        seen.add(ptype)
        typed_keys = {k for k in sampled if "@" in k}
        assert all(k.endswith(f"@{ptype}") for k in typed_keys)
        assert bool(typed_keys) == (ptype in ("mlp", "moe"))
        study.tell(trial, sampled["train.lr"])
    assert seen == {"mlp", "mosa", "moe", "qformer"}


def test_a_type_without_when_keeps_base_values_or_defaults() -> None:
    base = {
        "model": {"projector": {"type": "moe", "num_experts": 8, "top_k": 1, "stride": 2}},
        "train": {"max_steps": 100, "eval_every": 50, "warmup_steps": 10},
    }
    spec = make_spec({"space": {"model.projector.type": {"choice": ["moe", "qformer"]}}}, base)
    moe = resolve_trial_config(spec.base, {"model.projector.type": "moe"}).model.projector
    assert isinstance(moe, MoEConfig) and (moe.num_experts, moe.top_k, moe.stride) == (8, 1, 2)
    qformer = resolve_trial_config(spec.base, {"model.projector.type": "qformer"}).model.projector
    assert qformer == QFormerConfig()


def test_when_values_land_on_their_field() -> None:
    spec = make_spec(CONDITIONAL)
    sampled = {
        "model.projector.type": "moe",
        "train.lr": 3e-3,
        "model.projector.num_experts@moe": 4,
        "model.projector.top_k@moe": 2,
        "model.projector.stride@moe": 8,
    }
    cfg = resolve_trial_config(spec.base, sampled)
    assert cfg.train.lr == 3e-3
    assert cfg.model.projector == MoEConfig(num_experts=4, top_k=2, stride=8)


def test_a_rule_breaking_sample_is_a_config_error_naming_the_rule() -> None:
    spec = make_spec(CONDITIONAL)
    sampled = {
        "model.projector.type": "moe",
        "train.lr": 1e-3,
        "model.projector.num_experts@moe": 2,
        "model.projector.top_k@moe": 4,
    }
    with pytest.raises(ConfigError, match=r"top_k \(4\) must be <= num_experts \(2\)"):
        resolve_trial_config(spec.base, sampled)


def test_conditional_grid_is_not_a_full_product() -> None:
    spec = make_spec(
        {
            "algorithm": "grid",
            "num_samples": 1,
            "space": {
                "model.projector.type": {"grid": ["mlp", "moe"]},
                "train.lr": {"grid": [1e-3, 3e-3]},
            },
            "when": {"moe": {"model.projector.num_experts": {"grid": [2, 4, 8]}}},
        }
    )
    points = grid_points(spec.search)
    assert len(points) == 2 * (1 + 3)
    assert trial_count(spec) == 8
    assert {"model.projector.type": "mlp", "train.lr": 1e-3} in points
    assert {
        "model.projector.type": "moe",
        "train.lr": 3e-3,
        "model.projector.num_experts@moe": 8,
    } in points


def test_set_reaches_space_keys_with_dots(tmp_path: Path) -> None:
    spec = parse_sweep_spec(
        {
            "name": "t",
            "base": {"train": {"max_steps": 100, "eval_every": 50, "warmup_steps": 10}},
            "search": {"metric": "eval/wer", "mode": "min", "num_samples": 2, "space": {}},
        },
        spec_dir=tmp_path,
        overrides=[
            "search.space.train.lr={loguniform: [1.0e-4, 1.0e-3]}",
            "base.train.max_steps=60",
        ],
    )
    assert spec.search.space["train.lr"].bounds == (1e-4, 1e-3)
    assert spec.base.train.max_steps == 60


def test_base_path_is_relative_to_the_spec(tmp_path: Path) -> None:
    (tmp_path / "trials").mkdir()
    (tmp_path / "trials" / "t.yaml").write_text("train: {max_steps: 80, warmup_steps: 5}\n")
    spec = parse_sweep_spec(
        {
            "name": "t",
            "base": "trials/t.yaml",
            "search": {"metric": "eval/wer", "mode": "min", "num_samples": 2,
                       "space": {"train.lr": {"choice": [1e-3]}}},
        },
        spec_dir=tmp_path,
    )  # fmt: skip
    assert spec.base.train.max_steps == 80
    assert spec.max_steps == 80
    (tmp_path / "trials" / "u.yaml").write_text("train: {max_steps: 90, warmup_steps: 5}\n")
    again = parse_sweep_spec(
        {"name": "t", "base": "trials/t.yaml", "search": spec.search.model_dump(mode="json")},
        spec_dir=tmp_path,
        overrides=["base=trials/u.yaml"],
    )
    assert again.base.train.max_steps == 90


def test_points_to_evaluate_come_first_then_the_search_samples() -> None:
    points = [
        {"model.projector.type": "moe", "train.lr": 2e-3, "model.projector.top_k": 1},
        {"model.projector.type": "mlp"},  # the rest is sampled
    ]
    spec = make_spec({**CONDITIONAL, "num_samples": 6, "points_to_evaluate": points})
    searcher = build_searcher(spec)
    searcher.set_search_properties("eval/wer", "min", {})
    suggested = [searcher.suggest(f"t{i}") for i in range(4)]
    first, second = suggested[0], suggested[1]
    assert first["model.projector.type"] == "moe" and first["train.lr"] == 2e-3
    assert first["model.projector.top_k@moe"] == 1
    assert {"model.projector.stride@moe", "model.projector.num_experts@moe"} <= set(first)
    assert second["model.projector.type"] == "mlp" and "model.projector.stride@mlp" in second
    assert 1e-4 <= second["train.lr"] <= 1e-2
    resolve_trial_config(spec.base, first)  # a searcher's sample resolves into a trial
    shown = sample_flat_configs(spec, 3)  # what `validate` prints: the points, then samples
    given = {"model.projector.type": "moe", "train.lr": 2e-3, "model.projector.top_k@moe": 1}
    assert {k: shown[0][k] for k in given} == given
    assert shown[1]["model.projector.type"] == "mlp" and len(shown) == 3


def test_feature_caching_takes_the_cpus_of_the_concurrent_trials_on_one_node() -> None:
    spec = make_spec({**CONDITIONAL, "max_concurrent": 2})
    assert cache_cpus(spec, [{"CPU": 2.0}]) == 2.0
    assert cache_cpus(spec, [{"CPU": 16.0}, {"CPU": 4.0}]) == 2.0
    unlimited = make_spec(CONDITIONAL)
    assert cache_cpus(unlimited, [{"CPU": 3.0}, {"CPU": 8.0}]) == 8.0
    gpu = make_spec(CONDITIONAL).model_copy(
        update={"resources": ResourcesSpec(cpus_per_trial=1, gpus_per_trial=1)}
    )
    assert cache_cpus(gpu, [{"CPU": 64.0}, {"CPU": 8.0, "GPU": 1.0}]) == 8.0
    assert cache_cpus(gpu, []) == 1.0  # no node known: one trial's worth
