"""Utterances from a Hugging Face dataset, a local `save_to_disk` directory or the synthetic corpus.

Audio is decoded here with soundfile (an `Audio` column is cast to `decode=False` first, so
datasets never reaches for torchcodec), resampled to `data.sampling_rate` and filtered by duration.
Clips that cannot be used are skipped and counted by reason, never raised: one bad file must not
end a trial.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trainer.audio import AudioDecodeError, load_waveform
from trainer.config import DataConfig
from trainer.overrides import ConfigError

if TYPE_CHECKING:
    from datasets import Dataset

SKIP_REASONS = ("decode_error", "empty_text", "too_short", "too_long")


@dataclass(frozen=True)
class Utterance:
    index: int  # row in the source split
    waveform: np.ndarray  # [n] float32 mono at the configured sampling rate
    text: str


def _saved_dataset_dir(cfg: DataConfig) -> Path | None:
    """The `save_to_disk` directory to load (the synthetic corpus or a local one), else None.

    Anything else (a hub id, a local folder of parquet/csv files) goes to `load_dataset`.
    """
    if cfg.synthetic is not None:
        from trainer.synth import ensure_synthetic_corpus

        return ensure_synthetic_corpus(cfg.synthetic)
    assert cfg.dataset is not None  # DataConfig validates exactly one source
    path = Path(cfg.dataset).expanduser()
    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    return path if saved else None


def open_split(cfg: DataConfig, split: str) -> Dataset:
    """One split with only the audio and text columns, audio left undecoded."""
    import datasets

    local = _saved_dataset_dir(cfg)
    if local is None:
        try:
            ds = datasets.load_dataset(cfg.dataset, cfg.config_name, split=split)
        except ValueError as err:  # datasets raises ValueError for an unknown split
            raise ConfigError(f"data: cannot load split {split!r} of {cfg.dataset}: {err}") from err
        return _select_columns(ds, cfg)
    saved = datasets.load_from_disk(str(local))
    if isinstance(saved, datasets.Dataset):
        return _select_columns(saved, cfg)  # a single saved Dataset stands for every split
    if split not in saved:
        raise ConfigError(f"data: no split {split!r} in {local} (splits: {list(saved)})")
    return _select_columns(saved[split], cfg)


def _select_columns(ds: Dataset, cfg: DataConfig) -> Dataset:
    import datasets

    for field, column in (("audio_column", cfg.audio_column), ("text_column", cfg.text_column)):
        if column not in ds.column_names:
            raise ConfigError(f"data.{field}: no column {column!r} (columns: {ds.column_names})")
    ds = ds.select_columns([cfg.audio_column, cfg.text_column])
    if isinstance(ds.features[cfg.audio_column], datasets.Audio):
        ds = ds.cast_column(cfg.audio_column, datasets.Audio(decode=False))
    return ds


def dataset_fingerprint(ds: Dataset) -> str:
    """datasets' own fingerprint (source files / saved state), stable across processes."""
    return ds._fingerprint


def iter_utterances(
    ds: Dataset,
    cfg: DataConfig,
    *,
    max_seconds: float,
    limit: int | None,
    skipped: Counter[str],
) -> Iterator[Utterance]:
    """Usable utterances in dataset order, at most `limit`; the rest counted in `skipped`."""
    kept = 0
    rows = ds.with_format("numpy")  # arrays come out as numpy, not Python lists of floats
    for index, row in enumerate(rows):
        if limit is not None and kept >= limit:
            break
        text = row[cfg.text_column]
        text = "" if text is None else str(text).strip()
        if not text:
            skipped["empty_text"] += 1
            continue
        try:
            waveform = load_waveform(row[cfg.audio_column], cfg.sampling_rate)
        except AudioDecodeError:
            skipped["decode_error"] += 1
            continue
        seconds = waveform.size / cfg.sampling_rate
        if seconds > max_seconds:
            skipped["too_long"] += 1
            continue
        if waveform.size == 0 or seconds < cfg.min_duration_s:
            skipped["too_short"] += 1
            continue
        kept += 1
        yield Utterance(index=index, waveform=waveform, text=text)


def load_utterances(
    cfg: DataConfig, split: str, *, max_seconds: float | None = None, limit: int | None = None
) -> tuple[list[Utterance], dict[str, int]]:
    """All usable utterances of a split in memory, and the skip counts (small corpora, tests)."""
    skipped: Counter[str] = Counter()
    cap = cfg.max_duration_s if max_seconds is None else min(max_seconds, cfg.max_duration_s)
    utterances = list(
        iter_utterances(open_split(cfg, split), cfg, max_seconds=cap, limit=limit, skipped=skipped)
    )
    return utterances, dict(skipped)


def format_skipped(skipped: dict[str, int]) -> str:
    """ "train/decode_error=1, validation/too_long=3" (keys in a stable order)."""
    return ", ".join(f"{key}={n}" for key, n in sorted(skipped.items()) if n)


def report_skipped(skipped: dict[str, int]) -> None:
    if any(skipped.values()):
        print(f"data: skipped {format_skipped(skipped)}", file=sys.stderr, flush=True)
