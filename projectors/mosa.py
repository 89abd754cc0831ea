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
    router [N, E]; adapters as two GEMMs [N, D] -> [N, E*H] -> [N, D] -> embeds [B, T', D].

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
        batch, t_out = x.shape[0], self.output_length(x.shape[1])
        if lengths is None:
            h = self._downsample(x, None)  # B, T', D
            mixed, probs = self._mix(h.flatten(0, 1))  # B, T', D -> B*T', D
            embeds = mixed.view(batch, t_out, -1)  # B*T', D -> B, T', D
            return self._output(embeds, full_lengths(x, t_out), probs)

        host = host_lengths(lengths)  # the one device sync: sizes for trimming and packing
        # Frames past the longest clip would only ever meet padding.
        h = self._downsample(x[:, : max(host)], lengths)  # B, t, D (t ≤ T')
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

        All adapters in two GEMMs: fc1 of every expert stacked along its output ([E*H, D]), and,
        because fc2 is linear, gating each adapter's hidden by its weight before one fc2 stacked
        along its input ([D, E*H]) equals the seed's weighted sum of adapter outputs.
        """
        probs = torch.softmax(self.router(tokens), dim=-1, dtype=torch.float32)  # N, E
        fc1_weight = torch.cat([e.fc1.weight for e in self.experts])  # E*H, D
        fc1_bias = torch.cat([e.fc1.bias for e in self.experts])  # E*H
        fc2_weight = torch.cat([e.fc2.weight for e in self.experts], dim=1)  # D, E*H
        fc2_bias = torch.stack([e.fc2.bias for e in self.experts])  # E, D
        hidden = F.gelu(F.linear(tokens, fc1_weight, fc1_bias))  # N, E*H
        gate = probs.to(hidden.dtype)
        gated = hidden.view(len(tokens), self.num_experts, -1) * gate[:, :, None]  # N, E, H
        mixed = F.linear(gated.flatten(1), fc2_weight) + gate @ fc2_bias.to(gate.dtype)  # N, D
        return mixed, probs

    def _output(self, embeds: Tensor, out_lengths: Tensor, probs: Tensor) -> ProjectorOutput:
        if self.output_norm is not None:
            embeds = self.output_norm(embeds)  # RMSNorm(0) = 0: padding stays 0
        return ProjectorOutput(
            embeds, out_lengths, no_loss(embeds), router_stats(probs, probs.detach().mean(0))
        )
