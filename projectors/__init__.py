"""Audio projectors for speech-LLMs: encoder frames [B, T, C] -> LLM embeddings [B, T', D].

`build_projector(cfg, encoder_dim=…, llm_dim=…)` makes one from its config (a mapping or a typed
config); its `forward(x, lengths=None)` returns a `ProjectorOutput`.
"""

from __future__ import annotations

from projectors.base import Projector, ProjectorOutput
from projectors.config import (
    PROJECTOR_TYPES,
    MLPConfig,
    MoEConfig,
    MOSAConfig,
    ProjectorConfig,
    QFormerConfig,
    parse_projector_config,
)
from projectors.registry import PROJECTOR_CLASSES, build_projector

__all__ = [
    "PROJECTOR_CLASSES",
    "PROJECTOR_TYPES",
    "MLPConfig",
    "MOSAConfig",
    "MoEConfig",
    "Projector",
    "ProjectorConfig",
    "ProjectorOutput",
    "QFormerConfig",
    "build_projector",
    "parse_projector_config",
]
