"""The contract every registered projector keeps (see shared/CONTRACT.md and projectors/base.py)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from projector_cases import CASES, ENCODER_DIM, LLM_DIM, padded_batch

from projectors import PROJECTOR_CLASSES, PROJECTOR_TYPES, ProjectorOutput, build_projector
from projectors.config import parse_projector_config

TYPES = sorted(PROJECTOR_CLASSES)
# Lengths below every stride (1), not a multiple of any stride or window, one full row or none.
LENGTH_SETS = [[37, 20, 5, 1], [29, 29, 2, 13]]
T = 37


def _build(kind: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_projector({**CASES[kind], **extra}, encoder_dim=ENCODER_DIM, llm_dim=LLM_DIM)


def test_every_config_type_is_registered_and_has_a_case() -> None:
    assert set(PROJECTOR_CLASSES) == set(PROJECTOR_TYPES) == set(CASES)


@pytest.mark.parametrize("kind", TYPES)
def test_output_shape_and_types(kind: str) -> None:
    proj = _build(kind).eval()
    x, lengths = padded_batch(LENGTH_SETS[0], T)
    out = proj(x, lengths)
    assert isinstance(out, ProjectorOutput)
    assert out.embeds.shape == (4, proj.output_length(T), LLM_DIM)
    assert out.lengths.dtype == torch.long
    assert out.lengths.tolist() == [proj.output_length(n) for n in LENGTH_SETS[0]]
    assert out.aux_loss.dim() == 0
    assert all(v.dim() == 0 and not v.requires_grad for v in out.stats.values())
    if kind in ("moe", "mosa"):
        assert "router/entropy" in out.stats
        assert {f"router/load/expert_{i}" for i in range(CASES[kind]["num_experts"])} <= set(
            out.stats
        )


@pytest.mark.parametrize("kind", TYPES)
def test_output_length_is_the_real_length(kind: str) -> None:
    proj = _build(kind).eval()
    every_t = torch.arange(1, 3001)
    # The tensor form agrees with the int form on every T in 1…3000 …
    assert proj.output_length(every_t).tolist() == [proj.output_length(t) for t in range(1, 3001)]
    # … and the real output has that length, for every short T (below each stride and window)
    # and a sample of longer ones (not multiples of the window), alone and as a padded row.
    sampled = [*range(1, 40), *random.Random(0).sample(range(40, 3000), 12), 3000]
    with torch.no_grad():
        for t in sampled:
            out = proj(torch.randn(1, t, ENCODER_DIM))
            assert out.embeds.shape[1] == proj.output_length(t) == out.lengths.item(), t
            padded = proj(torch.randn(1, t + 5, ENCODER_DIM), torch.tensor([t]))
            assert padded.lengths.item() == proj.output_length(t), t
            assert padded.embeds.shape[1] == proj.output_length(t + 5), t


@pytest.mark.parametrize("lengths", LENGTH_SETS, ids=str)
@pytest.mark.parametrize("output_norm", [False, True], ids=["", "output_norm"])
@pytest.mark.parametrize("kind", TYPES)
def test_padded_batch_equals_each_sample_alone(
    kind: str, output_norm: bool, lengths: list[int]
) -> None:
    proj = _build(kind, output_norm=output_norm).eval()
    x, lens = padded_batch(lengths, T)  # NaN padding: any leak shows
    with torch.no_grad():
        batch = proj(x, lens)
        assert torch.isfinite(batch.embeds).all()
        for row, n in enumerate(lengths):
            alone = proj(x[row : row + 1, :n])
            n_out = proj.output_length(n)
            valid = batch.embeds[row, :n_out]
            torch.testing.assert_close(valid, alone.embeds[0], atol=1e-5, rtol=0)
            assert (batch.embeds[row, n_out:] == 0).all(), "outputs past the length must be 0"


@pytest.mark.parametrize("kind", TYPES)
def test_no_lengths_equals_full_lengths(kind: str) -> None:
    proj = _build(kind).eval()
    x = torch.randn(3, T, ENCODER_DIM)
    with torch.no_grad():
        a, b = proj(x), proj(x, torch.full((3,), T))
    torch.testing.assert_close(a.embeds, b.embeds, atol=1e-6, rtol=0)
    assert a.lengths.tolist() == b.lengths.tolist()


@pytest.mark.parametrize("lengths", [[0, 9], [0, 0]], ids=str)
@pytest.mark.parametrize("kind", TYPES)
def test_empty_clips_give_zero_length_outputs(kind: str, lengths: list[int]) -> None:
    proj = _build(kind).train()
    x, lens = padded_batch(lengths, T)
    out = proj(x, lens)
    (out.embeds.square().sum() + out.aux_loss).backward()
    assert out.lengths.tolist() == [proj.output_length(n) for n in lengths]
    assert (out.embeds[0] == 0).all()
    assert torch.isfinite(out.embeds).all() and torch.isfinite(out.aux_loss)
    assert all(torch.isfinite(v) for v in out.stats.values())


@pytest.mark.parametrize("kind", ["moe", "mosa"])
def test_router_stats_count_valid_tokens_only(kind: str) -> None:
    """Batch stats are the token-weighted means of each sample's stats alone."""
    proj = _build(kind).eval()
    lengths = LENGTH_SETS[0]
    x, lens = padded_batch(lengths, T)
    with torch.no_grad():
        batch = proj(x, lens).stats
        alone = [proj(x[row : row + 1, :n]).stats for row, n in enumerate(lengths)]
    weights = torch.tensor([proj.output_length(n) for n in lengths], dtype=torch.float32)
    for key in batch:
        if key.startswith("router/"):
            expected = sum(w * s[key] for w, s in zip(weights, alone, strict=True)) / weights.sum()
            torch.testing.assert_close(batch[key], expected, atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize("kind", TYPES)
def test_gradients_reach_every_parameter_and_skip_padding(kind: str) -> None:
    proj = _build(kind).train()
    x, lens = padded_batch(LENGTH_SETS[1], T, fill=3.0)
    x.requires_grad_(True)
    out = proj(x, lens)
    (out.embeds.square().sum() + out.aux_loss).backward()
    for name, param in proj.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} got a zero gradient"
    for row, n in enumerate(LENGTH_SETS[1]):
        assert (x.grad[row, n:] == 0).all(), "padding must not influence the outputs"


@pytest.mark.parametrize("kind", TYPES)
def test_runs_under_bf16_autocast(kind: str) -> None:
    proj = _build(kind).train()
    x, lens = padded_batch(LENGTH_SETS[0], T, fill=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = proj(x, lens)
        loss = out.embeds.float().square().mean() + out.aux_loss
    loss.backward()
    assert out.embeds.shape == (4, proj.output_length(T), LLM_DIM)
    assert torch.isfinite(out.embeds.float()).all() and torch.isfinite(loss)
    assert all(p.grad is not None for p in proj.parameters())


@pytest.mark.parametrize("output_norm", [False, True])
@pytest.mark.parametrize("kind", TYPES)
def test_config_json_round_trip(kind: str, output_norm: bool) -> None:
    cfg = parse_projector_config({**CASES[kind], "output_norm": output_norm})
    again = parse_projector_config(json.loads(cfg.model_dump_json()))
    assert again == cfg
    proj = build_projector(cfg, encoder_dim=ENCODER_DIM, llm_dim=LLM_DIM)  # typed, not a mapping
    names = {name for name, _ in proj.named_parameters()}
    assert ("output_norm.weight" in names) == output_norm


@pytest.mark.parametrize("kind", TYPES)
def test_aux_loss_is_zero_in_eval(kind: str) -> None:
    proj = _build(kind).eval()
    x, lens = padded_batch(LENGTH_SETS[0], T)
    with torch.no_grad():
        assert proj(x, lens).aux_loss.item() == 0.0
