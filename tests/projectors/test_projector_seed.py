"""Against the seed (projector_seed.py): same parameters, same maths, the MoE dispatch included."""

from __future__ import annotations

import pytest
import torch
from projector_cases import CASES, ENCODER_DIM, LLM_DIM
from projector_seed import seed_projector

from projectors import build_projector, parse_projector_config

TYPES = sorted(CASES)
# Configs with defaults the cases leave out: hidden dims from the LLM, QFormer without encoder_proj.
DEFAULTISH = {
    "mlp": {"type": "mlp"},
    "mosa": {"type": "mosa", "adapter_hidden_dim": 16},
    "moe": {"type": "moe"},
    "qformer": {"type": "qformer", "num_heads": 4, "num_layers": 1},
}


def _pair(cfg: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(seed, ours) with the seed's weights loaded into ours, strictly."""
    typed = parse_projector_config(cfg)
    torch.manual_seed(0)
    seed = seed_projector(typed, encoder_dim=ENCODER_DIM, llm_dim=LLM_DIM)
    ours = build_projector(typed, encoder_dim=ENCODER_DIM, llm_dim=LLM_DIM)
    ours.load_state_dict(seed.state_dict(), strict=True)
    return seed, ours


@pytest.mark.parametrize("cfgs", [CASES, DEFAULTISH], ids=["cases", "defaults"])
@pytest.mark.parametrize("kind", TYPES)
def test_seed_state_dict_loads_strictly_both_ways(kind: str, cfgs: dict) -> None:
    seed, ours = _pair(cfgs[kind])
    seed.load_state_dict(ours.state_dict(), strict=True)
    # Trainable parameters are the same set too (nothing frozen or added behind the names).
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in seed.parameters())


@pytest.mark.parametrize("cfgs", [CASES, DEFAULTISH], ids=["cases", "defaults"])
@pytest.mark.parametrize("kind", TYPES)
def test_same_outputs_as_the_seed_where_the_seed_is_right(kind: str, cfgs: dict) -> None:
    """Unpadded input, T where the seed's behaviour is kept (QFormer: whole windows; T ≥ stride)."""
    seed, ours = _pair(cfgs[kind])
    seed.eval(), ours.eval()
    window = parse_projector_config(cfgs[kind]).model_dump().get("window_size", 1)
    x = torch.randn(3, 4 * window * 5, ENCODER_DIM)  # a multiple of every stride and window
    x = x[:, : x.shape[1] - (window == 1)]  # and for strides: one frame short of a multiple
    with torch.no_grad():
        expected, out = seed(x), ours(x)
    torch.testing.assert_close(out.embeds, expected, atol=1e-5, rtol=1e-5)
    for t in range(4, 200):  # output_length agrees with the seed's for T ≥ every stride
        assert ours.output_length(t) == seed.get_output_length(t), t


def _moe_step(model: torch.nn.Module, x: torch.Tensor, *, seed_api: bool):
    """One training forward/backward with a fixed RNG (the jitter): (embeds, aux loss, grads)."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(123)
    if seed_api:
        embeds = model(x)
        aux = model.get_aux_loss()
    else:
        out = model(x)
        embeds, aux = out.embeds, out.aux_loss
    (embeds.square().sum() + 100 * aux).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return embeds.detach(), aux.detach(), grads, x.grad


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_fast_moe_matches_the_seed_loop(top_k: int) -> None:
    """Sorted dispatch = the seed's per-expert loop: outputs, aux loss and every gradient."""
    seed, ours = _pair({**CASES["moe"], "top_k": top_k, "jitter_noise": 0.05})
    seed.train(), ours.train()
    x = torch.randn(3, 40, ENCODER_DIM)
    ref_embeds, ref_aux, ref_grads, ref_xgrad = _moe_step(seed, x, seed_api=True)
    embeds, aux, grads, xgrad = _moe_step(ours, x, seed_api=False)
    torch.testing.assert_close(embeds, ref_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux, ref_aux, atol=1e-7, rtol=1e-5)
    assert aux > 0
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(xgrad, ref_xgrad, atol=1e-5, rtol=1e-4)


def test_moe_losses_count_valid_tokens_only() -> None:
    """Padded batch = the seed on exactly its valid stacks (concatenated), losses included."""
    seed, ours = _pair({**CASES["moe"], "jitter_noise": 0.0})
    seed.train(), ours.train()
    k = CASES["moe"]["stride"]
    lengths = [30, 12, 4]  # multiples of k: the valid stacks of each row concatenate exactly
    x = torch.full((3, 36, ENCODER_DIM), 1e4)  # loud padding: any leak into the losses shows
    for row, n in enumerate(lengths):
        x[row, :n] = torch.randn(n, ENCODER_DIM)
    out = ours(x, torch.tensor(lengths))
    valid = torch.cat([x[row, :n] for row, n in enumerate(lengths)])[None]  # 1, ΣL, C
    expected = seed(valid)
    torch.testing.assert_close(out.aux_loss, seed.get_aux_loss(), atol=1e-8, rtol=1e-5)
    torch.testing.assert_close(
        out.stats["balance_loss"] + out.stats["z_loss"], out.aux_loss.detach(), atol=1e-8, rtol=0
    )
    packed = torch.cat([out.embeds[row, : n // k] for row, n in enumerate(lengths)])
    torch.testing.assert_close(packed, expected[0], atol=1e-5, rtol=1e-5)
    loads = torch.stack([out.stats[f"router/load/expert_{i}"] for i in range(4)])
    torch.testing.assert_close(loads.sum(), torch.tensor(1.0))
