"""Projector type -> class, and `build_projector`, the one way to make a projector from a config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from projectors.base import Projector
from projectors.config import (
    PROJECTOR_TYPES,
    MLPConfig,
    MoEConfig,
    MOSAConfig,
    QFormerConfig,
    parse_projector_config,
)
from projectors.mlp import MLPProjector
from projectors.moe import MoEProjector
from projectors.mosa import MOSAProjector
from projectors.qformer import QFormerProjector

PROJECTOR_CLASSES: dict[str, type[Projector]] = {
    "mlp": MLPProjector,
    "mosa": MOSAProjector,
    "moe": MoEProjector,
    "qformer": QFormerProjector,
}
"""Every projector type, keyed by its config's `type`; the contract test runs them all."""

assert tuple(PROJECTOR_CLASSES) == PROJECTOR_TYPES, "registry and config types disagree"


def build_projector(
    cfg: Mapping[str, Any] | MLPConfig | MOSAConfig | MoEConfig | QFormerConfig,
    *,
    encoder_dim: int,
    llm_dim: int,
) -> Projector:
    """A projector from its config section (a mapping is validated first) and the two dims.

    Raises pydantic's `ValidationError` for a bad mapping and `ValueError` naming the field for
    rules that need the dims (QFormer `num_heads` must divide the default `hidden_size`).
    """
    for name, dim in (("encoder_dim", encoder_dim), ("llm_dim", llm_dim)):
        if dim <= 0:
            raise ValueError(f"{name} must be > 0, got {dim}")
    typed = parse_projector_config(dict(cfg) if isinstance(cfg, Mapping) else cfg)
    return PROJECTOR_CLASSES[typed.type](typed, encoder_dim=encoder_dim, llm_dim=llm_dim)
