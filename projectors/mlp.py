"""Frame-stacking MLP projector (GLM-ASR style), and the stacking the MoE projector shares."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

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
    unpack,
    valid_positions,
    zero_padding,
)
from projectors.config import MLPConfig


def stacked_length(t: Length, k: int) -> Length:
    """Output frames after stacking k frames per output frame.

    For t ≥ k this is the seed's (GLM-ASR's) `(t - k) // k + 1` = `t // k`: trailing frames that do
    not fill a stack are dropped. The seed gives 0 frames for 0 < t < k, which would hand the LLM no
    audio at all; here such a clip yields one frame, its stack zero-padded. t = 0 gives 0.
    """
    return t // k + ((t > 0) & (t < k))


def stack_frames(x: Tensor, k: int) -> Tensor:
    """x [B, T, C] -> [B, T', k*C]: k adjacent frames concatenated, T' = stacked_length(T, k)."""
    batch, t, dim = x.shape
    t_out = stacked_length(t, k)
    if t < k * t_out:  # only for 0 < T < k: one zero-padded stack
        x = F.pad(x, (0, 0, 0, k * t_out - t))
    return x[:, : k * t_out].reshape(batch, t_out, k * dim)  # B, T, C -> B, T', k*C


def _stack_valid(x: Tensor, lengths: Tensor | None, k: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Stack frames and say which stacks are valid, with one device sync.

    Returns tokens [B, T', k*C], output lengths [B] and the flat index [N] of the valid stacks in
    the B*T' grid (None when all are valid: callers skip packing).
    """
    t_out = stacked_length(x.shape[1], k)
    if lengths is None:
        return stack_frames(x, k), full_lengths(x, t_out), None
    host = host_lengths(lengths)  # the one device sync: how many stacks to pack
    if min(host) < k:
        # A clip shorter than one stack is the only case where padding falls inside a valid stack.
        x = zero_padding(x, lengths)
    out_lengths = stacked_length(lengths, k)
    count = sum(stacked_length(n, k) for n in host)
    tokens = stack_frames(x, k)
    if count == x.shape[0] * t_out:
        return tokens, out_lengths, None
    return tokens, out_lengths, valid_positions(out_lengths, t_out, count)


class MLPProjector(Projector):
    """Stack k frames, then Linear → RMSNorm → GELU → Linear (the seed's `MLPAudioProjector`).

    Shapes: x [B, T, C] -> stacked [B, T', k*C] -> valid stacks packed [N, k*C] -> [N, D]
    -> embeds [B, T', D], with T' = output_length(T) (see `stacked_length`).
    """

    def __init__(self, cfg: MLPConfig, *, encoder_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.k = cfg.stride
        hidden_dim = cfg.resolved_hidden_dim(llm_dim)
        self.linear_1 = nn.Linear(encoder_dim * self.k, hidden_dim, bias=False)
        self.norm = RMSNorm(hidden_dim, eps=1e-6)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_dim, llm_dim, bias=False)
        self.output_norm = RMSNorm(llm_dim) if cfg.output_norm else None

    def output_length(self, t: Length) -> Length:
        return stacked_length(t, self.k)

    def _mlp(self, tokens: Tensor) -> Tensor:
        """[…, k*C] -> […, D]."""
        y = self.linear_2(self.act(self.norm(self.linear_1(tokens))))
        return y if self.output_norm is None else self.output_norm(y)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> ProjectorOutput:
        tokens, out_lengths, index = _stack_valid(x, as_lengths(lengths, x), self.k)
        if index is None:
            embeds = self._mlp(tokens)
        else:
            batch, t_out, _ = tokens.shape
            embeds = unpack(self._mlp(pack(tokens, index)), index, batch, t_out)
        return ProjectorOutput(embeds, out_lengths, no_loss(x))
