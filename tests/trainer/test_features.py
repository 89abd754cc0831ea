from __future__ import annotations

import multiprocessing as mp
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_fixtures import SR, load_in_child, trial_config, wav_bytes, write_digits_corpus
from datasets import Audio, Dataset

from trainer import features
from trainer.data import load_utterances
from trainer.encoder import build_encoder, encode_batch
from trainer.features import FeatureSet, load_features
from trainer.overrides import ConfigError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_corpus(tmp_path_factory.mktemp("features"), num=40)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PROJSWEEP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "features"


def _forbid_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the encoder ran on a cache hit")

    monkeypatch.setattr(features, "_build_split", fail)
    monkeypatch.setattr(features, "encode_batch", fail)


def test_features_are_the_encoders_valid_frames_in_half_precision(
    corpus: Path, cache: Path
) -> None:
    cfg = trial_config(corpus)
    splits = load_features(cfg)
    assert (len(splits.train), len(splits.eval)) == (32, 4)
    assert splits.encoder_dim == 64 and splits.skipped == {}
    assert not splits.train.from_cache and not splits.eval.from_cache
    utterances, _ = load_utterances(cfg.data, "validation")
    encoder, extractor = build_encoder(cfg.model.encoder)
    expected, lengths = encode_batch(encoder, extractor, [u.waveform for u in utterances], SR)
    for i, utterance in enumerate(utterances):
        item = splits.eval[i]
        assert item["features"].dtype == torch.float16
        assert item["features"].shape == (int(lengths[i]), 64)
        assert splits.eval.lengths[i] == int(lengths[i])
        assert item["text"] == utterance.text
        assert item["audio_seconds"] == pytest.approx(utterance.waveform.size / SR, abs=1e-4)
        torch.testing.assert_close(
            item["features"].float(), expected[i, : lengths[i]], atol=2e-2, rtol=1e-2
        )
    loader = torch.utils.data.DataLoader(splits.train, batch_size=4, collate_fn=list)
    assert len(next(iter(loader))) == 4
    copy = pickle.loads(pickle.dumps(splits.train))  # what a DataLoader worker receives
    assert len(pickle.dumps(splits.train)) < 1000  # the path, not the arrays
    assert torch.equal(copy[5]["features"], splits.train[5]["features"])


def test_second_load_is_a_cache_hit(
    corpus: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = trial_config(corpus)
    first = load_features(cfg)
    metas = {p: p.stat().st_mtime_ns for p in cache.glob("*/meta.json")}
    assert len(metas) == 2  # one entry per split
    _forbid_builds(monkeypatch)
    second = load_features(cfg)
    assert second.train.from_cache and second.eval.from_cache
    assert second.train.path == first.train.path
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*/meta.json")} == metas
    assert torch.equal(second.train[3]["features"], first.train[3]["features"])


def test_key_follows_filters_and_encoder(corpus: Path, cache: Path) -> None:
    base = load_features(trial_config(corpus))
    fewer = load_features(trial_config(corpus, max_train_samples=10))
    assert len(fewer.train) == 10 and fewer.train.path != base.train.path
    assert fewer.eval.from_cache  # the eval split's filters did not change
    cfg = trial_config(corpus)
    assert cfg.model.encoder.tiny is not None
    cfg.model.encoder.tiny.seed = 5
    other = load_features(cfg)
    assert not other.train.from_cache and other.train.path != base.train.path


@pytest.mark.slow  # two fresh interpreters import torch and transformers: ~10 s
def test_concurrent_processes_build_once(corpus: Path, cache: Path) -> None:
    ctx = mp.get_context("spawn")  # fresh interpreters, as separate trials would be
    barrier, results = ctx.Barrier(2), ctx.Queue()
    args = (str(cache.parent), trial_config(corpus).model_dump_json(), barrier, results)
    procs = [ctx.Process(target=load_in_child, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    train_hits = sorted(o[1] for o in outcomes)
    eval_hits = sorted(o[2] for o in outcomes)
    assert train_hits == [False, True] and eval_hits == [False, True]  # built once, read once
    assert len(list(cache.glob("*/meta.json"))) == 2


def test_interrupted_build_leaves_nothing_readable(
    corpus: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = trial_config(corpus)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(features, "_encode_chunk", interrupted)
        with pytest.raises(KeyboardInterrupt):
            load_features(cfg)
    assert not [p for p in cache.iterdir() if p.is_dir()]  # temp dir cleaned, no entry
    built = load_features(cfg)
    assert not built.train.from_cache


def test_killed_build_temp_dir_is_not_read(corpus: Path, cache: Path) -> None:
    """A build killed before its rename leaves a temp dir: never read, removed by the next build."""
    cfg = trial_config(corpus)
    entry = load_features(cfg).train.path
    leftover = entry.parent / f".{entry.name}.tmp-killed"
    shutil.move(entry, leftover)  # as if the process died just before os.replace
    with open(leftover / features.DATA_FILE, "r+b") as f:
        f.truncate(100)  # and half-written
    rebuilt = load_features(cfg)
    assert not rebuilt.train.from_cache and rebuilt.train.path == entry
    assert not leftover.exists()
    assert len(rebuilt.train) == 32


def test_skipped_rows_are_counted_and_reported(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tone = np.sin(np.arange(SR) / 10).astype(np.float32) * 0.5
    cells = [wav_bytes(tone), b"broken", wav_bytes(tone), wav_bytes(tone)]
    texts = ["one", "two", "", "three"]
    ds = Dataset.from_dict(
        {"audio": [{"bytes": c, "path": None} for c in cells], "text": texts}
    ).cast_column("audio", Audio(sampling_rate=SR))
    ds.save_to_disk(str(tmp_path / "messy"))
    splits = load_features(
        trial_config(tmp_path / "messy", train_split="train", eval_split="train")
    )
    assert len(splits.train) == 2
    assert splits.skipped == {"train/decode_error": 1, "train/empty_text": 1}
    assert "train/decode_error=1, train/empty_text=1" in capsys.readouterr().err


def test_a_split_with_nothing_usable_is_a_config_error(tmp_path: Path, cache: Path) -> None:
    ds = Dataset.from_dict({"audio": [{"bytes": b"broken", "path": None}], "text": ["one"]})
    ds.save_to_disk(str(tmp_path / "broken"))
    with pytest.raises(
        ConfigError, match="no usable utterances in split 'train' \\(decode_error=1\\)"
    ):
        load_features(trial_config(tmp_path / "broken", eval_split="train"))
    assert not cache.exists() or not [p for p in cache.iterdir() if p.is_dir()]


def test_feature_set_reads_are_fast(corpus: Path, cache: Path) -> None:
    train = load_features(trial_config(corpus)).train
    reopened = FeatureSet(train.path, from_cache=True)
    start = time.perf_counter()
    for i in range(2000):
        reopened[i % len(reopened)]
    per_row = (time.perf_counter() - start) / 2000
    assert per_row < 1e-3  # the trainer reads ~32 rows per step at ~20 steps/s: ~1.5 ms budget
