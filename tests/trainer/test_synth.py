from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pytest
from _data_fixtures import write_digits_corpus
from datasets import load_from_disk

from trainer import synth
from trainer.config import SyntheticDigitsConfig
from trainer.overrides import ConfigError


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_corpus(tmp_path_factory.mktemp("synth"), num=40, seed=0)


def test_digits_and_words_round_trip() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        digits = "".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(2, 8))))
        assert synth.words_to_digits(synth.digits_to_words(digits, rng)) == digits
    assert synth.digits_to_words("407") == "four zero seven"
    assert synth.words_to_digits("four oh seven") == "407"


def test_plan_uses_both_zero_words_and_disjoint_speakers() -> None:
    specs = synth.plan_corpus(2000, seed=0)
    words = {w for s in specs for w in s.text.split()}
    assert {"zero", "oh"} <= words
    assert all(2 <= len(s.text.split()) <= 7 for s in specs)
    by_split = {name: {s.speaker for s in specs if s.split == name} for name in synth.SPLITS}
    assert not by_split["train"] & by_split["validation"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["validation"] & by_split["test"]
    assert len(by_split["train"]) > 50  # many voices x variants
    assert [sum(s.split == n for s in specs) for n in synth.SPLITS] == [1600, 200, 200]
    assert len({s.rate for s in specs}) > 20 and len({s.pitch for s in specs}) > 20


def test_plan_rejects_fewer_utterances_than_splits() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        synth.plan_corpus(2, seed=0)


def test_corpus_columns_and_disjoint_speakers(corpus_dir: Path) -> None:
    corpus = load_from_disk(str(corpus_dir))
    assert list(corpus) == ["train", "validation", "test"]
    assert sum(len(s) for s in corpus.values()) == 40
    speakers = {name: set(split["speaker"]) for name, split in corpus.items()}
    assert not speakers["train"] & (speakers["validation"] | speakers["test"])
    assert not speakers["validation"] & speakers["test"]
    row = corpus["train"].with_format("numpy")[0]
    audio = row["audio"]
    assert audio["sampling_rate"] == 16_000
    assert audio["array"].dtype == np.float32
    assert 0.1 < np.abs(audio["array"]).max() <= 1.0
    assert row["duration"] == pytest.approx(audio["array"].size / 16_000, abs=1e-4)
    assert synth.words_to_digits(str(row["text"]))  # words of digits only


def test_same_seed_gives_same_bytes(corpus_dir: Path, tmp_path: Path) -> None:
    again = write_digits_corpus(tmp_path, num=40, seed=0)
    assert _file_hashes(again) == _file_hashes(corpus_dir)


def test_noise_and_seed_change_the_audio(corpus_dir: Path, tmp_path: Path) -> None:
    base = load_from_disk(str(corpus_dir))["train"].with_format("numpy")[0]["audio"]["array"]
    noisy_dir = write_digits_corpus(tmp_path, num=40, seed=0, noise=0.01)
    noisy = load_from_disk(str(noisy_dir))["train"].with_format("numpy")[0]["audio"]["array"]
    assert noisy.shape == base.shape
    assert np.std(noisy - base) == pytest.approx(0.01, rel=0.2)


def test_ensure_synthetic_corpus_generates_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROJSWEEP_CACHE", str(tmp_path))
    cfg = SyntheticDigitsConfig(num_utterances=12, seed=3)
    first = synth.ensure_synthetic_corpus(cfg)
    assert first.parent == tmp_path / "corpora" and first.name.startswith("digits-")
    assert len(load_from_disk(str(first))["train"]) == 10

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("corpus regenerated")

    monkeypatch.setattr(synth, "write_corpus", no_rebuild)
    assert synth.ensure_synthetic_corpus(cfg) == first
    assert not list((tmp_path / "corpora").glob(".*tmp-*"))


def test_synth_command_writes_and_summarises(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "corpus"
    args = argparse.Namespace(out=str(out), num=10, seed=1, noise=0.0)
    assert synth.synth_command(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("train: 8 utterances")
    assert lines[1].startswith("validation: 1 utterances")
    assert lines[2].startswith("test: 1 utterances")
    assert len(load_from_disk(str(out))["test"]) == 1
    with pytest.raises(ConfigError, match="not empty"):
        synth.synth_command(args)
    with pytest.raises(ConfigError, match="--num"):
        synth.synth_command(argparse.Namespace(out=str(tmp_path / "x"), num=2, seed=0, noise=0.0))
