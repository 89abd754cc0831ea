"""Projector configs: every bad value is rejected, naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from projectors import MoEConfig, QFormerConfig, build_projector, parse_projector_config

INVALID = [
    ({"type": "mlp", "stride": 0}, "stride"),
    ({"type": "mlp", "stride": -2}, "stride"),
    ({"type": "mlp", "stride": True}, "stride"),  # YAML `stride: yes`
    ({"type": "mlp", "hidden_dim": 0}, "hidden_dim"),
    ({"type": "mlp", "strde": 4}, "strde"),  # a typo is an error, not ignored
    ({"type": "mlp", "output_norm": "maybe"}, "output_norm"),
    ({"type": "mosa", "num_experts": 0}, "num_experts"),
    ({"type": "mosa", "adapter_hidden_dim": -1}, "adapter_hidden_dim"),
    ({"type": "mosa", "router_hidden_dim": 0}, "router_hidden_dim"),
    ({"type": "mosa", "stride": 2}, "stride"),  # another type's field
    ({"type": "moe", "stride": 0}, "stride"),
    ({"type": "moe", "num_experts": 2, "top_k": 3}, "top_k"),
    ({"type": "moe", "top_k": 0}, "top_k"),
    ({"type": "moe", "aux_loss_coef": -0.1}, "aux_loss_coef"),
    ({"type": "moe", "z_loss_coef": -1e-4}, "z_loss_coef"),
    ({"type": "moe", "jitter_noise": 1.5}, "jitter_noise"),
    ({"type": "moe", "jitter_noise": -0.1}, "jitter_noise"),
    ({"type": "qformer", "window_size": 15, "downsample_rate": 4}, "downsample_rate"),
    ({"type": "qformer", "window_size": 0}, "window_size"),
    ({"type": "qformer", "num_layers": 0}, "num_layers"),
    ({"type": "qformer", "num_heads": 5, "hidden_size": 32}, "num_heads"),
    ({"type": "qformer", "intermediate_size": 0}, "intermediate_size"),
    ({"type": "transformer"}, "type"),
    ({"stride": 4}, "type"),
]


IDS = [f"{cfg.get('type')}.{field}" for cfg, field in INVALID]


@pytest.mark.parametrize(("cfg", "field"), INVALID, ids=IDS)
def test_invalid_config_is_rejected_naming_the_field(cfg: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_projector_config(cfg)
    assert field in str(err.value)
    # build_projector validates a mapping the same way.
    with pytest.raises(ValidationError):
        build_projector(cfg, encoder_dim=16, llm_dim=16)


def test_typed_configs_validate_on_construction() -> None:
    with pytest.raises(ValidationError, match="top_k"):
        MoEConfig(num_experts=2, top_k=4)


def test_rules_that_need_the_dims_raise_at_build_naming_the_field() -> None:
    # hidden_size defaults to the encoder dim, known only when building.
    with pytest.raises(ValueError, match="num_heads"):
        build_projector(QFormerConfig(num_heads=5), encoder_dim=32, llm_dim=16)
    with pytest.raises(ValueError, match="encoder_dim"):
        build_projector({"type": "mlp"}, encoder_dim=0, llm_dim=16)


def test_defaults_resolve_from_the_dims() -> None:
    mlp = build_projector({"type": "mlp", "stride": 2}, encoder_dim=8, llm_dim=12)
    assert mlp.linear_1.weight.shape == (12, 16)  # hidden_dim = LLM dim, in = 2 × 8
    qformer = build_projector({"type": "qformer", "num_heads": 2}, encoder_dim=8, llm_dim=12)
    assert qformer.encoder_proj is None  # hidden_size = encoder dim
    assert qformer.qformer.config.intermediate_size == 32
