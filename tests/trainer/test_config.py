"""The trial config: defaults, field-path errors, `--set` overrides, YAML round-trip."""

from __future__ import annotations

import pytest
import yaml

from trainer.config import TrialConfig, dump_trial_config, load_trial_config
from trainer.overrides import ConfigError, apply_overrides, parse_override


def test_defaults_are_valid_and_round_trip_through_yaml() -> None:
    cfg = TrialConfig()
    again = load_trial_config(yaml.safe_load(dump_trial_config(cfg)))
    assert again == cfg


def test_override_switches_projector_type_and_keeps_typed_values() -> None:
    cfg = load_trial_config({}, ["model.projector={type: moe, num_experts: 8}", "train.lr=3e-3"])
    assert cfg.model.projector.type == "moe"
    assert cfg.model.projector.num_experts == 8
    assert cfg.train.lr == pytest.approx(3e-3)


@pytest.mark.parametrize(
    ("data", "overrides", "path"),
    [
        ({}, ["train.lrr=1"], "train.lrr"),
        ({}, ["train.max_steps=-3"], "train.max_steps"),
        ({}, ["train.precision=fp8"], "train.precision"),
        ({}, ["train.warmup_steps=5000"], "train"),
        ({}, ["model.projector.type=conv"], "model.projector"),
        ({}, ["model.projector={type: moe, top_k: 9}"], "model.projector"),
        ({}, ["model.projector={type: mlp, stride: 0}"], "model.projector.stride"),
        (
            {},
            ["model.encoder.pretrained=openai/whisper-small", "model.encoder.tiny={}"],
            "model.encoder",
        ),
        ({}, ["model.decoder.prompt=no placeholder"], "model.decoder"),
        ({}, ["data.dataset=librispeech_asr", "data.synthetic={}"], "data"),
        (
            {"model": {"encoder": {"tiny": {"d_model": 250, "num_heads": 4}}}},
            [],
            "model.encoder.tiny",
        ),
        ({"data": {"synthetic": {"num_utterances": 0}}}, [], "data.synthetic.num_utterances"),
    ],
)
def test_bad_values_name_the_field(data: dict, overrides: list[str], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_trial_config(data, overrides)
    assert path in str(err.value)


def test_bare_no_is_a_precision_not_a_boolean() -> None:
    # YAML reads `no` as false; `precision: no` must still mean full precision.
    assert load_trial_config({}, ["train.precision=no"]).train.precision == "no"
    assert load_trial_config({"train": {"precision": False}}).train.precision == "no"
    with pytest.raises(ConfigError, match=r"train\.precision"):
        load_trial_config({}, ["train.precision=yes"])


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        load_trial_config({"train": {"lrr": 1, "batch_size": 0}})
    assert len(err.value.problems) == 2


def test_missing_file_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_trial_config(tmp_path / "nope.yaml")


def test_non_mapping_yaml_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_trial_config(path)


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("a.b=3", ("a.b", 3)),
        ("a=1e-3", ("a", 1e-3)),
        ("a=true", ("a", True)),
        ("a=null", ("a", None)),
        ("a=[1, 2]", ("a", [1, 2])),
        ("a=hello world", ("a", "hello world")),
    ],
)
def test_override_values_are_parsed_as_yaml(item: str, expected: tuple) -> None:
    assert parse_override(item) == expected


@pytest.mark.parametrize("item", ["novalue", "=3", "a..b=1", "a=[1,"])
def test_malformed_overrides_are_rejected(item: str) -> None:
    with pytest.raises(ConfigError):
        parse_override(item)


def test_override_through_a_scalar_names_the_path() -> None:
    with pytest.raises(ConfigError, match=r"train\.lr"):
        apply_overrides({"train": {"lr": 1.0}}, ["train.lr.x=2"])


def test_overrides_do_not_mutate_the_input() -> None:
    data = {"train": {"lr": 1.0}}
    apply_overrides(data, ["train.lr=2"])
    assert data == {"train": {"lr": 1.0}}
