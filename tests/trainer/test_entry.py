"""`projsweep train`: files written, metrics.json schema, exit codes, --resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from trial_toy import toy_config, toy_splits

import trainer.loop as loop
from orchestration.cli import main
from trainer.config import dump_trial_config, load_trial_config
from trainer.entry import ProgressPrinter

VOLATILE = ("train/samples_per_s", "train/audio_s_per_s", "train/tokens_per_s", "sys/peak_mem_mb")


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    splits = toy_splits(128, 16)
    monkeypatch.setattr(loop, "load_features", lambda cfg: splits)
    path = tmp_path / "toy.yaml"
    path.write_text(dump_trial_config(toy_config(max_steps=10, eval_every=5)))
    return path


def _stable(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in p.items() if k not in VOLATILE} for p in history]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.lr=-1", "train.lr"),
        ("model.decoder.colour=red", "model.decoder.colour"),
        ("train.warmup_steps=50", "warmup_steps (50)"),
    ],
)
def test_bad_config_exits_2_naming_the_field(
    config_file, tmp_path, capsys, override, field
) -> None:
    code = main(["train", str(config_file), "--set", override, "--out", str(tmp_path / "o")])
    assert code == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing started


def test_train_writes_config_metrics_and_projector(config_file, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(out)]) == 0
    assert load_trial_config(out / "config.yaml") == load_trial_config(config_file)
    assert (out / "projector.safetensors").is_file()
    assert (out / "decoder" / "tokenizer.json").is_file()
    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc) == {"status", "final", "history"} and doc["status"] == "completed"
    assert [p["step"] for p in doc["history"]] == [5, 10]
    assert all(isinstance(p["step"], int) for p in doc["history"])
    assert all(isinstance(v, float) for p in doc["history"] for k, v in p.items() if k != "step")
    assert doc["final"]["eval/wer"] == doc["history"][-1]["eval/wer"]
    printed = capsys.readouterr().out
    assert (
        "step  5/10  loss" in printed
        and " s] step" in printed
        and "steps/s" in printed
        and "WER" in printed
    )


def test_resume_continues_from_the_last_checkpoint(config_file, tmp_path, monkeypatch) -> None:
    assert main(["train", str(config_file), "--out", str(tmp_path / "whole")]) == 0
    report = ProgressPrinter.__call__

    def interrupted(self, metrics, step, checkpoint=None):
        report(self, metrics, step, checkpoint)
        if step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(ProgressPrinter, "__call__", interrupted)
    assert main(["train", str(config_file), "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.setattr(ProgressPrinter, "__call__", report)
    assert main(["train", str(config_file), "--out", str(tmp_path / "cut"), "--resume"]) == 0
    whole, cut = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "cut"))
    assert _stable(cut["history"]) == _stable(whole["history"])


def test_resume_refuses_another_config(config_file, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(out)]) == 0
    code = main(["train", str(config_file), "--out", str(out), "--resume", "--set", "train.lr=0.5"])
    assert code == 2 and "train.lr" in capsys.readouterr().err


def test_diverged_trial_exits_1_with_status(tmp_path, monkeypatch, capsys) -> None:
    splits = toy_splits(64, 8, nan=True)
    monkeypatch.setattr(loop, "load_features", lambda cfg: splits)
    path = tmp_path / "toy.yaml"
    path.write_text(dump_trial_config(toy_config(max_steps=10, eval_every=5)))
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 1
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert doc["status"] == "diverged" and doc["final"]["train/loss"] is None
    assert "diverged" in capsys.readouterr().out


def test_runtime_failure_exits_1_with_status_failed(config_file, tmp_path, monkeypatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(loop, "evaluate", boom)
    assert main(["train", str(config_file), "--out", str(tmp_path / "run")]) == 1
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert doc["status"] == "failed" and doc["history"] == []
