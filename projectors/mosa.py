"""MOSA projector: convolutional ×4 downsampling, then a dense softmax mixture of adapters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from projectors.base import (
    Length,
    Projector,
    ProjectorOutput,
    RMSNorm,
    SimpleAdapter,
    as_lengths,
    full_lengths,
    host_lengths,
    no_loss,
    pack,
    router_stats,
    time_mask,
    unpack,
    valid_positions,
    zero_padding,
)
from projectors.config import MOSAConfig


def conv_length(t: Length) -> Length:
    """Frames after one Conv1d(kernel 3, stride 2, padding 1): (t + 2 - 3) // 2 + 1; 0 stays 0."""
    return (t - 1) // 2 + 1


class MOSAProjector(Projector):
    """MOSA-Base ("Mixtures of Simple Adapters", arXiv:2508.18998; the seed's `MOSAProjector`).

    Two stride-2 Conv1d+GELU (×4 fewer frames), a 2-layer ReLU router, and a dense softmax mix of
    `num_experts` Linear → GELU → Linear adapters of width `adapter_hidden_dim`. No aux loss.

    Shapes: x [B, T, C] -> conv [B, C, T/2] -> conv [B, D, T'] -> valid tokens packed [N, D] ->
    router [N, E], adapters [N, E, D] -> softmax-weighted sum [N, D] -> embeds [B, T', D].

    Padding never enters a convolution: padded frames are zeroed before each conv (what a lone
    clip's zero padding gives), and frames past the longest clip are dropped before the convs.
    """

    def __init__(self, cfg: MOSAConfig, *, encoder_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.downsampler = nn.Sequential(
            nn.Conv1d(encoder_dim, encoder_dim, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv1d(encoder_dim, llm_dim, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
        )
        self.router = nn.Sequential(
            nn.Linear(llm_dim, cfg.router_hidden_dim),
            nn.ReLU(),
            nn.Linear(cfg.router_hidden_dim, self.num_experts),
        )
        self.experts = nn.ModuleList(
            SimpleAdapter(llm_dim, cfg.adapter_hidden_dim, llm_dim) for _ in range(self.num_experts)
        )
        self.output_norm = RMSNorm(llm_dim) if cfg.output_norm else None

    def output_length(self, t: Length) -> Length:
        return conv_length(conv_length(t))

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> ProjectorOutput:
        lengths = as_lengths(lengths, x)
        batch, t_out = x.shape[0], self.output_length(x.shape[1])
        if lengths is None:
            h = self._downsample(x, None)  # B, T', D
            mixed, probs = self._mix(h.flatten(0, 1))  # B, T', D -> B*T', D
            embeds = mixed.view(batch, t_out, -1)  # B*T', D -> B, T', D
            return self._output(embeds, full_lengths(x, t_out), probs)

        host = host_lengths(lengths)  # the one device sync: sizes for trimming and packing
        # Frames past the longest clip would only ever meet padding (keep one: convs need input).
        h = self._downsample(x[:, : max(*host, 1)], lengths)  # B, t, D (t ≤ T')
        out_lengths = self.output_length(lengths)
        count = sum(self.output_length(n) for n in host)
        if count == batch * h.shape[1]:
            mixed, probs = self._mix(h.flatten(0, 1))
            embeds = mixed.view(batch, h.shape[1], -1)  # B*t, D -> B, t, D
        else:
            index = valid_positions(out_lengths, h.shape[1], count)
            mixed, probs = self._mix(pack(h, index))  # N, D
            embeds = unpack(mixed, index, batch, h.shape[1])  # B, t, D
        embeds = F.pad(embeds, (0, 0, 0, t_out - h.shape[1]))  # B, t, D -> B, T', D
        return self._output(embeds, out_lengths, probs)

    def _downsample(self, x: Tensor, lengths: Tensor | None) -> Tensor:
        """x [B, T, C] -> [B, T', D]; with `lengths`, padding is kept out of both convolutions."""
        conv1, act1, conv2, act2 = self.downsampler
        if lengths is not None:
            x = zero_padding(x, lengths)
        h = act1(conv1(x.transpose(1, 2)))  # B, T, C -> B, C, T -> B, C, T1
        if lengths is not None:
            # GELU(bias) is not 0 at padded positions: zero them, as conv2's own zero padding.
            valid = time_mask(conv_length(lengths), h.shape[-1])  # B, T1
            h = h.masked_fill(~valid[:, None, :], 0.0)
        return act2(conv2(h)).transpose(1, 2)  # B, C, T1 -> B, D, T' -> B, T', D

    def _mix(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [N, D] -> (softmax mixture of the adapters [N, D], routing probs [N, E]).

        One GEMM pair per adapter, not one batched matmul over stacked weights: measured on CPU
        (N 800, D 1024, H 4096, E 4, fwd+bwd) the batched forms were 10–20% slower (a copy of every
        weight per step, and bmm runs slower than mm), and a dense loop has no host sync and no
        data-dependent shape, so on a GPU it costs only E launches.
        """
        probs = torch.softmax(self.router(tokens), dim=-1, dtype=torch.float32)  # N, E
        outs = torch.stack([expert(tokens) for expert in self.experts], dim=1)  # N, E, D
        mixed = torch.einsum("ned,ne->nd", outs, probs.to(outs.dtype))  # N, D
        return mixed, probs

    def _output(self, embeds: Tensor, out_lengths: Tensor, probs: Tensor) -> ProjectorOutput:
        if self.output_norm is not None:
            embeds = self.output_norm(embeds)  # RMSNorm(0) = 0: padding stays 0
        # Load: each adapter's mean gate over valid tokens (0 for a batch of empty clips, as MoE's).
        load = probs.detach().mean(0) if len(probs) else probs.new_zeros(probs.shape[1])
        return ProjectorOutput(embeds, out_lengths, no_loss(embeds), router_stats(probs, load))
