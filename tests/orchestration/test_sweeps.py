"""Every shipped YAML loads and validates: sweeps as specs, trial configs through the trainer."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestration.cli import main
from orchestration.space import resolve_trial_config, sample_flat_configs
from orchestration.spec import load_sweep_spec
from trainer.config import load_trial_config
from trainer.overrides import ConfigError

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"
SWEEP_FILES = sorted(SWEEPS.glob("*.yaml"))
TRIAL_FILES = sorted((SWEEPS / "trials").glob("*.yaml"))


def test_the_sweeps_the_issue_asks_for_are_shipped() -> None:
    names = {p.stem for p in SWEEP_FILES}
    assert {"smoke", "moe", "mlp", "mosa", "qformer", "compare"} <= names


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_validates_and_samples(path: Path) -> None:
    spec = load_sweep_spec(path)
    feasible = 0
    for sampled in sample_flat_configs(spec, 16):
        try:
            resolve_trial_config(spec.base, sampled)
            feasible += 1
        except ConfigError:
            pass
    assert feasible > 0


@pytest.mark.parametrize("path", TRIAL_FILES, ids=lambda p: p.name)
def test_trial_config_validates(path: Path) -> None:
    load_trial_config(path)


def test_validate_verb_takes_every_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", *map(str, SWEEP_FILES), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok — ") == len(SWEEP_FILES)


def test_smoke_searches_all_four_projector_types_with_asha() -> None:
    spec = load_sweep_spec(SWEEPS / "smoke.yaml")
    assert spec.search.scheduler.type == "asha"
    types = spec.search.space["model.projector.type"]
    assert sorted(types.values) == ["mlp", "moe", "mosa", "qformer"]
    assert spec.base.data.synthetic is not None  # offline
