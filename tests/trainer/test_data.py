from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from _data_fixtures import SR, wav_bytes, write_digits_corpus
from datasets import Audio, Dataset

from trainer.audio import AudioDecodeError, decode_audio, load_waveform, resample
from trainer.config import DataConfig
from trainer.data import format_skipped, load_utterances, open_split
from trainer.overrides import ConfigError


def _tone(freq: float, sr: int, seconds: float = 1.0) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr).astype(np.float32)


# --- resampling ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("orig", "target"), [(22_050, 16_000), (48_000, 16_000), (8_000, 16_000)])
def test_resample_keeps_a_tone_and_the_length(orig: int, target: int) -> None:
    x = _tone(440.0, orig)
    y = resample(x, orig, target)
    assert y.dtype == np.float32
    assert y.size == math.ceil(x.size * target / orig)
    expected = _tone(440.0, target)[: y.size]
    inner = slice(target // 50, -target // 50)  # edges see the zero padding
    assert np.abs(y - expected)[inner].max() < 1e-3


def test_resample_removes_content_above_the_new_nyquist() -> None:
    y = resample(_tone(10_000.0, 22_050), 22_050, 16_000)  # 10 kHz > 8 kHz
    assert np.abs(y[800:-800]).max() < 1e-3  # away from the tone's abrupt start and end


def test_resample_identity_and_empty() -> None:
    x = _tone(100.0, SR)
    assert np.array_equal(resample(x, SR, SR), x)
    assert resample(np.zeros(0, np.float32), 22_050, SR).size == 0


# --- decoding -----------------------------------------------------------------------------------


def test_decode_each_cell_layout(tmp_path: Path) -> None:
    tone = _tone(300.0, 22_050, 0.5)
    path = tmp_path / "tone.wav"
    path.write_bytes(wav_bytes(tone, 22_050))
    for cell in (
        {"bytes": wav_bytes(tone, 22_050), "path": None},
        {"bytes": None, "path": str(path)},
        str(path),
        {"array": tone, "sampling_rate": 22_050},
    ):
        wave = load_waveform(cell, SR)
        assert wave.size == math.ceil(tone.size * SR / 22_050)
    stereo = np.stack([tone, tone], axis=1)
    wave, sr = decode_audio({"bytes": wav_bytes(stereo, 22_050)}, default_sr=SR)
    assert wave.ndim == 1 and sr == 22_050
    plain, sr = decode_audio(tone.tolist(), default_sr=SR)  # a bare array carries no rate
    assert sr == SR and plain.dtype == np.float32


@pytest.mark.parametrize(
    "cell",
    [{"bytes": b"not audio", "path": None}, {"path": "/no/such.wav"}, None, [[1.0], [1.0, 2.0]]],
)
def test_undecodable_cells_raise_decode_error(cell: object) -> None:
    with pytest.raises(AudioDecodeError):
        load_waveform(cell, SR)


# --- datasets -----------------------------------------------------------------------------------


@pytest.fixture
def messy_dataset(tmp_path: Path) -> Path:
    """Six rows as an `Audio` column: good, broken file, empty text, too long, too short, good."""
    good = _tone(200.0, SR, 1.0)
    rows = [
        (wav_bytes(good), "one two"),
        (b"RIFF broken", "three"),
        (wav_bytes(good), "   "),
        (wav_bytes(_tone(200.0, SR, 6.0)), "four"),
        (wav_bytes(_tone(200.0, SR, 0.05)), "five"),
        (wav_bytes(_tone(200.0, 8_000, 1.5), 8_000), "six seven"),
    ]
    ds = Dataset.from_dict(
        {"speech": [{"bytes": b, "path": None} for b, _ in rows], "sentence": [t for _, t in rows]}
    ).cast_column("speech", Audio(sampling_rate=SR))  # decode=True, as hub datasets come
    out = tmp_path / "messy"
    ds.save_to_disk(str(out))
    return out


def _messy_config(path: Path, **kw: object) -> DataConfig:
    fields = {"audio_column": "speech", "text_column": "sentence", "min_duration_s": 0.1}
    return DataConfig(dataset=str(path), max_duration_s=5.0, **(fields | kw))


def test_bad_rows_are_skipped_and_counted(messy_dataset: Path) -> None:
    utterances, skipped = load_utterances(_messy_config(messy_dataset), "train")
    assert [u.text for u in utterances] == ["one two", "six seven"]
    assert [u.index for u in utterances] == [0, 5]
    assert utterances[1].waveform.size == int(1.5 * SR)  # 8 kHz resampled to 16 kHz
    assert skipped == {"decode_error": 1, "empty_text": 1, "too_long": 1, "too_short": 1}
    assert format_skipped(skipped) == "decode_error=1, empty_text=1, too_long=1, too_short=1"


def test_encoder_window_and_limit_cap_the_split(messy_dataset: Path) -> None:
    cfg = _messy_config(messy_dataset)
    utterances, skipped = load_utterances(cfg, "train", max_seconds=1.2)  # shorter window
    assert [u.text for u in utterances] == ["one two"]
    assert skipped["too_long"] == 2
    utterances, _ = load_utterances(cfg, "train", limit=1)
    assert len(utterances) == 1


def test_missing_columns_and_splits_are_config_errors(tmp_path: Path) -> None:
    corpus = write_digits_corpus(tmp_path, num=6)
    with pytest.raises(ConfigError, match=r"data\.text_column"):
        open_split(DataConfig(dataset=str(corpus), text_column="transcript"), "train")
    with pytest.raises(ConfigError, match="no split 'dev'"):
        open_split(DataConfig(dataset=str(corpus)), "dev")
    ds = open_split(DataConfig(dataset=str(corpus)), "validation")
    assert ds.column_names == ["audio", "text"] and len(ds) == 1


def test_synthetic_section_uses_the_cached_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROJSWEEP_CACHE", str(tmp_path))
    cfg = DataConfig.model_validate({"synthetic": {"num_utterances": 8, "seed": 1}})
    utterances, skipped = load_utterances(cfg, "train")
    assert len(utterances) == 6 and skipped == {}
    assert all(u.waveform.dtype == np.float32 and u.text for u in utterances)
    assert len([p for p in (tmp_path / "corpora").iterdir() if p.is_dir()]) == 1


def test_folder_of_parquet_files_loads_like_a_hub_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`load_dataset` by name (here a local folder, as nothing can be downloaded), by split."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    cell = {"bytes": wav_bytes(_tone(200.0, SR, 0.5)), "path": None}
    for split, n in (("train", 3), ("test", 2)):
        table = pa.table({"audio": [cell] * n, "sentence": ["one two"] * n})
        pq.write_table(table, tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet")
    cfg = DataConfig(dataset=str(tmp_path / "hub"), text_column="sentence")
    utterances, skipped = load_utterances(cfg, "test")
    assert len(utterances) == 2 and skipped == {}
    with pytest.raises(ConfigError, match="cannot load split 'dev'"):
        open_split(cfg, "dev")
