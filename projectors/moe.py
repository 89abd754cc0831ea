"""Sparse mixture-of-experts projector with a shared expert (DeepSeek-style), sorted dispatch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from projectors.base import (
    Length,
    Projector,
    ProjectorOutput,
    RMSNorm,
    SimpleAdapter,
    as_lengths,
    full_lengths,
    no_loss,
    router_stats,
    time_mask,
    unpack,
    zero_padding,
)
from projectors.config import MoEConfig
from projectors.mlp import stack_frames, stacked_length


@dataclass
class Routing:
    """Top-k routing of the M = B*T' stacked tokens, valid tokens only dispatched.

    Slots are (token, choice) pairs; S = N*top_k of them belong to valid tokens.
    """

    logits: Tensor
    """[M, E] router logits (jittered in training), for the z-loss."""
    probs: Tensor
    """[M, E] float32 softmax of `logits`."""
    slot_token: Tensor
    """[S] row of the M grid each valid slot routes, slots grouped by expert in expert order."""
    slot_weight: Tensor
    """[S] renormalised top-k weight of each slot."""
    counts: list[int]
    """[E] slots per expert, on the host (sizes for `torch.split`)."""
    load: Tensor
    """[E] float32 share of the valid slots each expert receives."""
    index: Tensor | None
    """[N] rows of the M grid holding valid tokens; None when all M are valid."""


class MoEProjector(Projector):
    """Stack k frames, RMSNorm, then shared expert + top-k routed experts (the seed's
    `MoEAudioProjector`), plus the load-balancing and z-losses in training.

    Shapes: x [B, T, C] -> stacked, normed h [M = B*T', k*C] -> router logits [M, E] ->
    valid slots sorted by expert [S = N*top_k, k*C] -> experts [S, D], summed into the shared
    expert's [N, D] -> embeds [B, T', D].

    Dispatch: slots are sorted by expert and cut with `torch.split`; the sizes come from one
    `bincount(...).tolist()`, the forward's only device sync. Padding tokens are sent to a bucket
    past the last expert by the same bincount, so that one sync also sizes the packing of valid
    tokens. The norm and the router (cheap: E outputs) see every stack; the experts see valid ones.

    Losses (training only, as the seed; 0 in eval) are over valid tokens:
    balance = aux_loss_coef · E · mean_e((mean_n p_ne - 1/E)²), z = z_loss_coef · mean_n(lse_n²).
    `stats` carries both (weighted, detached; computed in eval too, for logging) with the router's
    entropy and per-expert load (share of valid top-k slots).
    """

    def __init__(self, cfg: MoEConfig, *, encoder_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.k = cfg.stride
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.aux_coef = cfg.aux_loss_coef
        self.z_loss_coef = cfg.z_loss_coef
        self.jitter_noise = cfg.jitter_noise
        in_dim = encoder_dim * self.k
        hidden_dim = cfg.resolved_hidden_dim(llm_dim)
        self.norm = RMSNorm(in_dim, eps=1e-6)
        self.router = nn.Linear(in_dim, self.num_experts, bias=False)
        self.experts = nn.ModuleList(
            SimpleAdapter(in_dim, hidden_dim, llm_dim) for _ in range(self.num_experts)
        )
        self.shared_expert = SimpleAdapter(in_dim, hidden_dim, llm_dim)
        self.output_norm = RMSNorm(llm_dim) if cfg.output_norm else None
        self._init_weights()

    def _init_weights(self) -> None:
        """The seed's init: near-uniform router, xavier fc1, small fc2 (experts start quiet)."""
        with torch.no_grad():
            nn.init.normal_(self.router.weight, mean=0.0, std=0.02)
            for expert in [self.shared_expert, *self.experts]:
                nn.init.xavier_uniform_(expert.fc1.weight)
                nn.init.normal_(expert.fc2.weight, mean=0.0, std=0.01)

    def output_length(self, t: Length) -> Length:
        return stacked_length(t, self.k)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> ProjectorOutput:
        lengths = as_lengths(lengths, x)
        if lengths is not None:
            # The router sees every stack, padding included, so padding must be finite and 0
            # (it also keeps a clip shorter than one stack equal to itself alone).
            x = zero_padding(x, lengths)
        tokens = stack_frames(x, self.k)  # B, T, C -> B, T', k*C
        batch, t_out, _ = tokens.shape
        out_lengths = full_lengths(x, t_out) if lengths is None else stacked_length(lengths, self.k)
        valid = time_mask(out_lengths, t_out).flatten()  # B, T' -> M
        h = self.norm(tokens.flatten(0, 1))  # B, T', k*C -> M, k*C
        routing = self._route(h, valid)

        h_valid = h if routing.index is None else h.index_select(0, routing.index)  # N, k*C
        out = self.shared_expert(h_valid)  # N, D
        routed = self._run_experts(h.index_select(0, routing.slot_token), routing.counts)  # S, D
        routed = (routed * routing.slot_weight[:, None]).to(out.dtype)
        # Slot rows are rows of the M grid; the shared output is packed, so map grid -> packed row.
        packed_row = routing.slot_token
        if routing.index is not None:
            packed_row = (valid.cumsum(0) - 1)[packed_row]
        out = out.index_add(0, packed_row, routed)
        if self.output_norm is not None:
            out = self.output_norm(out)
        if routing.index is None:
            embeds = out.view(batch, t_out, -1)  # M, D -> B, T', D
        else:
            embeds = unpack(out, routing.index, batch, t_out)
        aux_loss, stats = self._losses(routing)
        return ProjectorOutput(embeds, out_lengths, aux_loss, stats)

    def _route(self, h: Tensor, valid: Tensor) -> Routing:
        """Top-k routing of h [M, k*C]; `valid` [M] bool marks the tokens to dispatch."""
        logits = self.router(h)  # M, E
        if self.training and self.jitter_noise > 0:
            # Multiplicative jitter shakes the decision boundary so early training does not
            # collapse onto one expert.
            eps = self.jitter_noise
            noise = torch.empty_like(logits).uniform_(1.0 - eps, 1.0 + eps)
            logits = logits * noise
        # float32 softmax: bf16 exponentials overflow.
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # M, E
        weights, chosen = probs.topk(self.top_k, dim=-1)  # M, K
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)

        num_experts = self.num_experts
        keys = chosen.masked_fill(~valid[:, None], num_experts).flatten()  # M, K -> M*K
        counts_dev = torch.bincount(keys, minlength=num_experts + 1)  # E + 1 (last: padding)
        counts = counts_dev.tolist()  # the one device sync of the forward
        num_slots = keys.numel() - counts[num_experts]  # S = N*K
        order = keys.argsort(stable=True)[:num_slots]  # valid slots, grouped by expert
        num_valid = num_slots // self.top_k
        index = None
        if num_valid < valid.numel():
            index = torch.nonzero_static(valid, size=num_valid).squeeze(1)  # N
        return Routing(
            logits=logits,
            probs=probs,
            slot_token=order // self.top_k,
            slot_weight=weights.flatten()[order],
            counts=counts[:num_experts],
            load=counts_dev[:num_experts].float() / max(num_slots, 1),
            index=index,
        )

    def _run_experts(self, slots: Tensor, counts: list[int]) -> Tensor:
        """slots [S, k*C], grouped by expert with `counts` rows each -> [S, D].

        An expert with no slot still runs (on 0 rows) so that its gradients are zeros, not None:
        distributed data parallel expects every parameter to receive one.
        """
        chunks = slots.split(counts)  # S, k*C -> E × [count_e, k*C]
        return torch.cat([expert(c) for expert, c in zip(self.experts, chunks, strict=True)])

    def _losses(self, routing: Routing) -> tuple[Tensor, dict[str, Tensor]]:
        """Balance and z-loss over valid tokens; the aux loss is their sum in training, else 0."""
        probs, logits = routing.probs, routing.logits
        if routing.index is not None:
            probs, logits = probs[routing.index], logits[routing.index]  # M, E -> N, E
        if probs.shape[0] == 0:  # a batch of empty clips: nothing to balance
            balance = z_loss = probs.new_zeros(())
        else:
            target = 1.0 / self.num_experts
            balance = self.aux_coef * ((probs.mean(0) - target) ** 2).mean() * self.num_experts
            z_loss = self.z_loss_coef * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        aux_loss = balance + z_loss if self.training else no_loss(probs)
        stats = router_stats(probs, routing.load)
        stats.update(balance_loss=balance.detach(), z_loss=z_loss.detach())
        return aux_loss, stats
