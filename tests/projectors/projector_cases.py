"""Tiny configs, one per registered projector type, and padded test batches."""

from __future__ import annotations

import torch

ENCODER_DIM = 16
LLM_DIM = 24

CASES: dict[str, dict] = {
    "mlp": {"type": "mlp", "stride": 3, "hidden_dim": 20},
    "mosa": {"type": "mosa", "num_experts": 3, "adapter_hidden_dim": 12, "router_hidden_dim": 8},
    "moe": {"type": "moe", "stride": 2, "hidden_dim": 20, "num_experts": 4, "top_k": 2},
    # hidden_size != encoder dim: exercises the seed's encoder_proj.
    "qformer": {
        "type": "qformer",
        "window_size": 6,
        "downsample_rate": 3,
        "num_layers": 1,
        "num_heads": 2,
        "hidden_size": 8,
        "intermediate_size": 16,
    },
}
"""Strides and windows that do not divide the batches' T, lengths below every stride."""


def padded_batch(lengths: list[int], t: int, *, fill: float = float("nan")) -> tuple:
    """x [B, t, C] random on valid frames and `fill` past them, and lengths [B] long."""
    x = torch.randn(len(lengths), t, ENCODER_DIM)
    for row, n in enumerate(lengths):
        x[row, n:] = fill
    return x, torch.tensor(lengths, dtype=torch.long)
