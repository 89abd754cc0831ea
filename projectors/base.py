"""What every projector shares: its output, its interface, and the padding helpers.

Shape legend: B batch, T input frames, C encoder dim, T' output frames, D LLM dim, N valid tokens
(packed across the batch), E experts.

Padding convention: `lengths[b]` frames of `x[b]` are valid, the rest is padding whose values are
arbitrary (NaN included). A projector's valid outputs for sample b equal what it gives for
`x[b, :lengths[b]]` alone, and outputs past `output_length(lengths[b])` are zero. Work that costs
per token runs on valid tokens only: they are *packed* into an `[N, ...]` matrix, processed, and
scattered back (`pack` / `unpack`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Length = TypeVar("Length", int, Tensor)


@dataclass
class ProjectorOutput:
    """A projector's forward result.

    embeds: [B, T', D], zero past each sample's output length.
    lengths: [B] long, valid output frames per sample.
    aux_loss: 0-dim tensor to add to the training loss (0 where the projector has none).
    stats: detached 0-dim tensors for logging (`router/entropy`, `router/load/expert_<i>`, …);
        empty where the projector has no router.
    """

    embeds: Tensor
    lengths: Tensor
    aux_loss: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


class Projector(nn.Module, ABC):
    """Maps encoder frames [B, T, C] to LLM embeddings [B, T', D]."""

    @abstractmethod
    def output_length(self, t: Length) -> Length:
        """Output frames for `t` input frames; works elementwise on a long tensor too."""

    @abstractmethod
    def forward(self, x: Tensor, lengths: Tensor | None = None) -> ProjectorOutput:
        """x: [B, T, C]; lengths: [B] valid frames per sample (None: all T are valid)."""


class RMSNorm(nn.Module):
    """RMSNorm with LlamaRMSNorm's maths and parameter name (`weight`), computed in float32.

    Upcasting first keeps bf16 activations off the slow unfused path (torch's fused kernel wants
    input and weight in one dtype) and matches Llama's float32 variance.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return y.to(x.dtype)


class SimpleAdapter(nn.Module):
    """Linear → GELU → Linear with biases (the MOSA paper's adapter; the seed's experts)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def as_lengths(lengths: Tensor | None, x: Tensor) -> Tensor | None:
    """`lengths` as a long tensor on x's device (a loader may leave them on the CPU)."""
    return None if lengths is None else lengths.to(device=x.device, dtype=torch.long)


def full_lengths(x: Tensor, t: int | None = None) -> Tensor:
    """[B] long, all equal to `t` (default: x's T): every frame of x [B, T, …] valid."""
    t = x.shape[1] if t is None else t
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def no_loss(x: Tensor) -> Tensor:
    """A float32 0-dim zero on x's device: the aux loss of a projector without one."""
    return torch.zeros((), device=x.device)


def time_mask(lengths: Tensor, t: int) -> Tensor:
    """[B, t] bool, True on the first `lengths[b]` positions of row b."""
    return torch.arange(t, device=lengths.device) < lengths[:, None]


def zero_padding(x: Tensor, lengths: Tensor) -> Tensor:
    """x [B, T, …] with frames past `lengths` set to 0 (filled: padding may be NaN)."""
    mask = time_mask(lengths, x.shape[1])  # B, T
    return x.masked_fill(~mask.view(*mask.shape, *[1] * (x.dim() - 2)), 0.0)


def valid_positions(out_lengths: Tensor, t: int, count: int) -> Tensor:
    """[N] flat indices of the valid positions of a [B, t] grid, row-major.

    `count` (= N) is known on the host, so `nonzero_static` needs no device sync.
    """
    mask = time_mask(out_lengths, t).flatten()  # B, t -> B*t
    return torch.nonzero_static(mask, size=count).squeeze(1)


def pack(x: Tensor, index: Tensor) -> Tensor:
    """x [B, T, …] -> [N, …]: the positions `index` of the flattened B*T grid."""
    return x.flatten(0, 1).index_select(0, index)  # B, T, … -> B*T, … -> N, …


def unpack(y: Tensor, index: Tensor, batch: int, t: int) -> Tensor:
    """y [N, …] -> [B, t, …]: rows at `index` of a zero grid (padding stays exactly 0)."""
    grid = y.new_zeros(batch * t, *y.shape[1:]).index_copy(0, index, y)  # B*t, …
    return grid.view(batch, t, *y.shape[1:])  # B*t, … -> B, t, …


def host_lengths(lengths: Tensor) -> list[int]:
    """Lengths on the host: the one device sync a packing projector makes per forward."""
    return lengths.tolist()


def router_stats(probs: Tensor, load: Tensor) -> dict[str, Tensor]:
    """Logging stats of a router over valid tokens only.

    probs: [N, E] routing distribution per token; load: [E] share of the routing per expert.
    """
    probs, load = probs.detach().float(), load.detach().float()
    # entr(p) = -p log p, with entr(0) = 0 where a plain p * log(p) would give NaN.
    entropy = torch.special.entr(probs).sum(-1).mean() if probs.numel() else probs.new_zeros(())
    stats = {"router/entropy": entropy}
    stats.update({f"router/load/expert_{i}": share for i, share in enumerate(load.unbind())})
    return stats
