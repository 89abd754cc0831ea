"""The trial loop on an in-memory learnable toy: learning, metrics, resume, divergence, seeding."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from trial_toy import toy_config, toy_splits

import trainer.loop as loop
from trainer.checkpoint import latest_checkpoint
from trainer.loop import LengthGroupedBatches, TrialResult, train_trial

CONTRACT_TRAIN = {
    "train/loss",
    "train/lm_loss",
    "train/aux_loss",
    "train/lr",
    "train/grad_norm",
    "train/samples_per_s",
    "train/audio_s_per_s",
    "train/tokens_per_s",
    "sys/peak_mem_mb",
    "model/projector_params",
}
CONTRACT_EVAL = {"eval/loss", "eval/wer", "eval/cer"}
VOLATILE = ("train/samples_per_s", "train/audio_s_per_s", "train/tokens_per_s", "sys/peak_mem_mb")


class Recorder:
    """A reporter that keeps every call; `stop_at` interrupts the run after that step's report."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.calls: list[tuple[int, dict[str, float], Path | None]] = []
        self.stop_at = stop_at

    def __call__(
        self, metrics: dict[str, float], step: int, checkpoint: Path | None = None
    ) -> None:
        self.calls.append((step, dict(metrics), checkpoint))
        if checkpoint is not None:
            assert (checkpoint / "projector.safetensors").is_file()
        if step == self.stop_at:
            raise KeyboardInterrupt  # what a killed process looks like to the caller


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> None:
    splits = toy_splits()
    monkeypatch.setattr(loop, "load_features", lambda cfg: splits)


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Fills with the trial's model (`"model"`) and its state as built (`"before"`)."""
    seen: dict[str, Any] = {}
    build = loop.build_model

    def spy(*args: Any, **kwargs: Any) -> Any:
        model, tok = build(*args, **kwargs)
        seen["model"] = model
        seen["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        return model, tok

    monkeypatch.setattr(loop, "build_model", spy)
    return seen


def _stable(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in p.items() if k not in VOLATILE} for p in history]


@pytest.mark.usefixtures("toy")
def test_trial_learns_and_reports_every_contract_metric(tmp_path: Path) -> None:
    rec = Recorder()
    result = train_trial(toy_config(max_steps=40, eval_every=20), rec, workdir=tmp_path)
    assert result.status == "completed", result.message
    steps = [s for s, _, _ in rec.calls]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [p["step"] for p in result.history] == steps
    for step, metrics, ckpt in rec.calls:
        assert set(metrics) >= CONTRACT_TRAIN
        assert (ckpt is not None) == (step % 20 == 0)
        assert (set(metrics) >= CONTRACT_EVAL) == (step % 20 == 0)
    losses = [m["train/loss"] for _, m, _ in rec.calls]
    assert losses[-1] < 0.6 * losses[0]
    assert result.final["eval/loss"] < result.history[3]["eval/loss"]
    assert result.final == {k: v for k, v in result.history[-1].items() if k != "step"}
    assert (tmp_path / "projector.safetensors").is_file()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_40"
    with (tmp_path / "checkpoints" / "step_40" / "transcripts.tsv").open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["reference"] for r in rows] == toy_splits().eval.texts  # eval-set order
    per_utterance = [float(r["wer"]) for r in rows]
    assert all(w >= 0.0 for w in per_utterance)
    # Corpus WER weights utterances by length; it lies within the per-utterance range.
    assert min(per_utterance) <= result.final["eval/wer"] <= max(per_utterance)


@pytest.mark.usefixtures("toy")
def test_moe_trial_reports_router_metrics(tmp_path: Path) -> None:
    cfg = toy_config(max_steps=6, eval_every=6)
    cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(
                update={
                    "projector": loop.TrialConfig.model_validate(
                        {"model": {"projector": {"type": "moe", "num_experts": 3, "top_k": 1}}}
                    ).model.projector
                }
            )
        }
    )
    result = train_trial(cfg, Recorder(), workdir=tmp_path)
    keys = set(result.final)
    assert {"train/balance_loss", "train/z_loss", "router/entropy"} <= keys
    assert {f"router/load/expert_{i}" for i in range(3)} <= keys
    assert result.final["train/aux_loss"] > 0


@pytest.mark.usefixtures("toy")
def test_resumed_run_ends_like_an_uninterrupted_one(tmp_path: Path) -> None:
    # time_mask: augmentation draws from the RNG, whose state must resume too.
    cfg = toy_config(max_steps=12, eval_every=6, log_every=3, time_mask=0.2)
    whole = train_trial(cfg, Recorder(), workdir=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train_trial(cfg, Recorder(stop_at=6), workdir=tmp_path / "cut")
    ckpt = latest_checkpoint(tmp_path / "cut")
    assert ckpt is not None and ckpt.name == "step_6"
    rec = Recorder()
    resumed = train_trial(cfg, rec, workdir=tmp_path / "cut", resume_from=ckpt)
    assert [s for s, _, _ in rec.calls] == [9, 12]  # nothing is reported twice
    assert _stable(resumed.history) == _stable(whole.history)
    for a, b in zip(
        load_file(tmp_path / "whole" / "projector.safetensors").values(),
        load_file(tmp_path / "cut" / "projector.safetensors").values(),
        strict=True,
    ):
        assert torch.equal(a, b)


@pytest.mark.usefixtures("toy")
def test_same_config_and_seed_give_identical_metrics(tmp_path: Path) -> None:
    cfg = toy_config(max_steps=6, eval_every=6, log_every=3)
    a = train_trial(cfg, Recorder(), workdir=tmp_path / "a")
    b = train_trial(cfg, Recorder(), workdir=tmp_path / "b")
    c = train_trial(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 1})}),
        Recorder(),
        workdir=tmp_path / "c",
    )
    assert _stable(a.history) == _stable(b.history)
    assert _stable(a.history) != _stable(c.history)


def test_nan_loss_ends_the_trial_as_diverged(tmp_path: Path, monkeypatch) -> None:
    splits = toy_splits(nan=True)
    monkeypatch.setattr(loop, "load_features", lambda cfg: splits)
    rec = Recorder()
    result = train_trial(toy_config(max_steps=30), rec, workdir=tmp_path)
    assert isinstance(result, TrialResult) and result.status == "diverged"
    assert "diverged" in result.message and "step 5" in result.message
    assert [s for s, _, _ in rec.calls] == [5]  # stops at the first log point that sees it


@pytest.mark.usefixtures("toy")
def test_frozen_decoder_stays_unchanged(tmp_path: Path, built: dict[str, Any]) -> None:
    cfg = toy_config(max_steps=5, eval_every=5)
    cfg.model.decoder.trainable = False
    train_trial(cfg, Recorder(), workdir=tmp_path)
    model, before = built["model"], built["before"]
    for k, v in model.decoder.state_dict().items():
        assert torch.equal(v, before[f"decoder.{k}"]), k
    assert any(
        not torch.equal(v, before[f"projector.{k}"])
        for k, v in model.projector.state_dict().items()
    )
    assert not (tmp_path / "checkpoints" / "step_5" / "decoder.safetensors").exists()


@pytest.mark.usefixtures("toy")
def test_lr_drives_the_projector_and_decoder_lr_the_trained_decoder(
    tmp_path: Path, built: dict[str, Any]
) -> None:
    cfg = toy_config(max_steps=5, eval_every=5, warmup_steps=1, lr=1e-2, decoder_lr=1e-9)
    train_trial(cfg, Recorder(), workdir=tmp_path)
    moved = {
        name: (p.detach() - built["before"][name]).abs().max().item()
        for name, p in built["model"].named_parameters()
    }
    # AdamW moves a weight by about lr per step: 5 steps at 1e-9 stay far below 1e-7.
    assert max(v for n, v in moved.items() if n.startswith("decoder.")) < 1e-7
    assert max(v for n, v in moved.items() if n.startswith("projector.")) > 1e-4
    assert all(n.startswith(("decoder.", "projector.")) for n in moved)  # no third group


@pytest.mark.usefixtures("toy")
def test_trials_with_other_precisions_run_in_one_process(tmp_path: Path) -> None:
    for i, precision in enumerate(("bf16", "no")):
        result = train_trial(
            toy_config(max_steps=5, eval_every=5, precision=precision),
            Recorder(),
            workdir=tmp_path / str(i),
        )
        assert result.status == "completed"


def test_length_grouped_batches_are_seeded_resumable_and_sharded() -> None:
    lengths = [
        int(n) for n in torch.randint(10, 500, (100,), generator=torch.Generator().manual_seed(0))
    ]

    def take(n: int, **kw: Any) -> list[list[int]]:
        it = iter(LengthGroupedBatches(lengths, 8, seed=3, group_batches=8, **kw))
        return [next(it) for _ in range(n)]

    full = take(30)  # crosses the epoch boundary at 12 batches
    assert full == take(30)
    assert take(18, start=12) == full[12:]
    assert sorted(i for b in full[:12] for i in b) == sorted(set(i for b in full[:12] for i in b))
    assert full[:12] != full[12:24]  # a new order each epoch
    ranks = [take(6, rank=r, world=2) for r in (0, 1)]
    assert [b for pair in zip(*ranks, strict=True) for b in pair] == full[:12]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in full) / len(full)
    assert spread < 150  # grouped: a batch's lengths are close (random batches spread ~400)


@pytest.mark.usefixtures("toy")
def test_cpu_threads_apply_to_the_trial_only(tmp_path: Path, monkeypatch) -> None:
    seen: list[int] = []
    build = loop.build_model

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(torch.get_num_threads())
        return build(*args, **kwargs)

    monkeypatch.setattr(loop, "build_model", spy)
    before = torch.get_num_threads()
    cfg = toy_config(max_steps=2, warmup_steps=1, eval_every=2, log_every=1, cpu_threads=1)
    train_trial(cfg, Recorder(), workdir=tmp_path)
    assert seen == [1] and torch.get_num_threads() == before
