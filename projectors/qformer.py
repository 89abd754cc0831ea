"""BLIP-2 QFormer projector over fixed windows (Granite-speech style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModel, Blip2QFormerConfig

from projectors.base import (
    Length,
    Projector,
    ProjectorOutput,
    RMSNorm,
    as_lengths,
    full_lengths,
    host_lengths,
    no_loss,
    pack,
    time_mask,
    unpack,
    valid_positions,
)
from projectors.config import QFormerConfig


class QFormerProjector(Projector):
    """Learned queries cross-attend to each window of frames (the seed's `QFormerAudioProjector`).

    Shapes: x [B, T, C] -> windows [B, W', S, C] (S = window_size, W' = ceil(T/S), the last one
    zero-padded) -> windows with a valid frame packed [N, S, C] -> (encoder_proj) [N, S, H] ->
    QFormer with Q = S / downsample_rate queries [N, Q, H] -> linear [N, Q, D] -> [B, W'*Q, D].

    Frames past a clip's length, including the zero fill of its last window, are masked out of the
    cross-attention (`encoder_attention_mask`). The seed attended to that fill, so outputs equal
    the seed's only when T is a multiple of window_size; the parameters are the seed's.
    """

    def __init__(self, cfg: QFormerConfig, *, encoder_dim: int, llm_dim: int) -> None:
        super().__init__()
        hidden = cfg.resolved_hidden_size(encoder_dim)
        self.window_size = cfg.window_size
        self.num_queries = cfg.num_queries
        # Granite initialises the queries with std 1.
        self.query = nn.Parameter(torch.randn(1, self.num_queries, hidden))
        self.encoder_proj = (
            nn.Linear(encoder_dim, hidden, bias=False) if encoder_dim != hidden else None
        )
        qformer_config = Blip2QFormerConfig(
            hidden_size=hidden,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.resolved_intermediate_size(encoder_dim),
            encoder_hidden_size=hidden,
            cross_attention_frequency=1,
            # Granite's settings, as the seed.
            hidden_act="gelu",
            attention_probs_dropout_prob=0.1,
            hidden_dropout_prob=0.1,
            layer_norm_eps=1e-12,
            initializer_range=0.02,
        )
        self.qformer = AutoModel.from_config(qformer_config)
        self.linear = nn.Linear(hidden, llm_dim)
        self.output_norm = RMSNorm(llm_dim) if cfg.output_norm else None

    def output_length(self, t: Length) -> Length:
        return (t + self.window_size - 1) // self.window_size * self.num_queries

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> ProjectorOutput:
        lengths = as_lengths(lengths, x)
        batch, t, _ = x.shape
        size = self.window_size
        num_windows = -(-t // size)  # ceil
        if lengths is None:
            lengths = full_lengths(x)
            host = [t] * batch
        else:
            host = host_lengths(lengths)  # the one device sync: how many windows to pack
        # Seed: the QFormer runs in its parameters' dtype.
        x = F.pad(x.to(self.query.dtype), (0, 0, 0, num_windows * size - t))  # B, W'*S, C
        windows = x.view(batch, num_windows, size, -1)  # B, W'*S, C -> B, W', S, C
        frame_mask = time_mask(lengths, num_windows * size).view(batch, num_windows, size)
        window_lengths = (lengths + size - 1) // size  # B: windows holding a valid frame
        count = sum(-(-n // size) for n in host)
        if count < batch * num_windows:
            index = valid_positions(window_lengths, num_windows, count)
            windows, frame_mask = pack(windows, index), pack(frame_mask, index)  # N, S, (C)
        else:
            index = None
            windows, frame_mask = windows.flatten(0, 1), frame_mask.flatten(0, 1)  # N, S, (C)

        out = self._attend(windows, frame_mask, all_valid=sum(host) == count * size)  # N, Q, D
        if self.output_norm is not None:
            out = self.output_norm(out)
        if index is not None:
            out = unpack(out, index, batch, num_windows)  # N, Q, D -> B, W', Q, D
        embeds = out.reshape(batch, num_windows * self.num_queries, -1)  # -> B, W'*Q, D
        return ProjectorOutput(embeds, self.output_length(lengths), no_loss(x))

    def _attend(self, windows: Tensor, frame_mask: Tensor, *, all_valid: bool) -> Tensor:
        """windows [N, S, C] with frame_mask [N, S] -> [N, Q, D]."""
        if len(windows) == 0:  # only empty clips; the QFormer cannot reshape an empty batch
            return self.linear(self.query.new_zeros(0, self.num_queries, self.query.shape[-1]))
        mask = None
        if not all_valid:
            # Zero, not just mask: a NaN in a masked value still poisons softmax(…) @ V.
            windows = windows.masked_fill(~frame_mask[..., None], 0.0)
            mask = frame_mask.long()
        if self.encoder_proj is not None:
            windows = self.encoder_proj(windows)  # N, S, C -> N, S, H
        queries = self.query.expand(len(windows), -1, -1)  # N, Q, H
        hidden = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=windows,
            encoder_attention_mask=mask,
            return_dict=True,
        ).last_hidden_state  # N, Q, H
        return self.linear(hidden)  # N, Q, H -> N, Q, D
