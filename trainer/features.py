"""The encoder-feature cache: frozen-encoder outputs computed once, memory-mapped by every trial.

The encoder is frozen, so its outputs depend only on (encoder identity and weights, mel settings,
the dataset and the filters that pick utterances). One cache entry per split lives under
`cache_dir()/features/<key>`: a `datasets` Arrow file (`Dataset.from_file` memory-maps it) holding
only each clip's valid frames in float16, and `meta.json`. Entries are built once under a file lock
in a temp directory and renamed into place (`trainer.cachedir`).

Shape legend: T encoder frames of one clip (valid only), C encoder width.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice, pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset as TorchDataset

from trainer._progress import Progress
from trainer.cachedir import build_once
from trainer.config import DataConfig, TrialConfig, cache_dir
from trainer.data import (
    Utterance,
    dataset_fingerprint,
    format_skipped,
    iter_utterances,
    open_split,
    report_skipped,
)
from trainer.encoder import build_encoder, encode_batch, encoder_fingerprint, max_audio_seconds
from trainer.overrides import ConfigError

FEATURE_FORMAT = 1
"""Bump when the stored layout or the way features are computed changes."""
DATA_FILE, META_FILE = "features.arrow", "meta.json"
ENCODE_BATCH = 32  # clips per encoder call (on CPU, 32 ran ~2x faster per clip than 8)
WRITE_CHUNK = 256  # clips decoded, encoded and written per Arrow record batch

SCHEMA = pa.schema(
    [
        ("features", pa.list_(pa.float16())),  # T*C, row-major [T, C]
        ("num_frames", pa.int32()),
        ("text", pa.string()),
        ("audio_seconds", pa.float32()),
        ("source_index", pa.int64()),  # row in the source split
    ]
)


class FeatureSet(TorchDataset):
    """Cached encoder features of one split, a torch `Dataset` over a memory-mapped Arrow file.

    Item: `{"features": Tensor[T, C] float16, "text": str, "audio_seconds": float}`.

    The Arrow file is memory-mapped; each row is a slice of one chunk's float16 value buffer, found
    through offsets read once at load, so `__getitem__` is a slice and a small copy.
    """

    def __init__(self, path: Path, *, from_cache: bool) -> None:
        self.path = path
        self.from_cache = from_cache
        """True when this process found the entry built; False when it built it."""
        self._open()

    def _open(self) -> None:
        from datasets import Dataset

        path = self.path
        self.meta: dict[str, Any] = json.loads((path / META_FILE).read_text())
        self.encoder_dim: int = self.meta["encoder_dim"]
        table = Dataset.from_file(str(path / DATA_FILE)).data.table  # memory-mapped
        self._rows: list[tuple[np.ndarray, int, int]] = []
        for chunk in table.column("features").chunks:
            values = chunk.values.to_numpy(zero_copy_only=True)  # float16 view of the mmap
            offsets = chunk.offsets.to_numpy()
            self._rows.extend((values, int(a), int(b)) for a, b in pairwise(offsets))
        self.texts: list[str] = table.column("text").to_pylist()
        """Transcripts in item order (the tiny tokenizer's vocabulary comes from these)."""
        self.audio_seconds: list[float] = table.column("audio_seconds").to_pylist()
        self.lengths: list[int] = table.column("num_frames").to_pylist()
        """Frames per item, for length-grouped batching."""

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get the path and map the file themselves: pickling the numpy views
        # would copy the whole split into every worker.
        return {"path": self.path, "from_cache": self.from_cache}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.from_cache = state["path"], state["from_cache"]
        self._open()

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        values, start, stop = self._rows[index]
        # Copy: the mmap is read-only, and torch tensors over read-only memory are unsafe.
        frames = np.array(values[start:stop]).reshape(-1, self.encoder_dim)  # T, C
        return {
            "features": torch.from_numpy(frames),
            "text": self.texts[index],
            "audio_seconds": self.audio_seconds[index],
        }


@dataclass(frozen=True)
class FeatureSplits:
    train: FeatureSet
    eval: FeatureSet
    encoder_dim: int
    skipped: dict[str, int]
    """Utterances left out, by `<split>/<reason>` (reasons in `trainer.data.SKIP_REASONS`)."""


@dataclass(frozen=True)
class _SplitRequest:
    """One split to cache: which rows, and the filters that pick among them."""

    split: str
    limit: int | None
    max_seconds: float


def cache_settings(
    encoder_fp: str, data: DataConfig, dataset_fp: str, req: _SplitRequest
) -> dict[str, Any]:
    """Everything that decides a split's cached features (hashed into its key, kept in meta)."""
    return {
        "format": FEATURE_FORMAT,
        "encoder": encoder_fp,
        "dataset": dataset_fp,
        "config_name": data.config_name,
        "split": req.split,
        "columns": [data.audio_column, data.text_column],
        "sampling_rate": data.sampling_rate,
        "min_seconds": data.min_duration_s,
        "max_seconds": req.max_seconds,
        "limit": req.limit,
    }


def cache_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def _batched(items: Iterable[Utterance], n: int) -> Iterator[list[Utterance]]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


def _encode_chunk(
    utterances: list[Utterance], encoder, extractor, sampling_rate: int
) -> pa.RecordBatch:
    """Encode clips longest-first in batches (similar lengths share a batch); keep input order."""
    order = sorted(range(len(utterances)), key=lambda i: -utterances[i].waveform.size)
    frames: list[np.ndarray | None] = [None] * len(utterances)
    for start in range(0, len(order), ENCODE_BATCH):
        batch = order[start : start + ENCODE_BATCH]
        feats, lengths = encode_batch(
            encoder, extractor, [utterances[i].waveform for i in batch], sampling_rate
        )  # B, T, C
        for row, i in enumerate(batch):
            frames[i] = feats[row, : int(lengths[row])].to(torch.float16).numpy()  # T, C
    flat = [f.reshape(-1) for f in frames]
    offsets = np.concatenate([[0], np.cumsum([f.size for f in flat])]).astype(np.int32)
    return pa.RecordBatch.from_arrays(
        [
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(flat))),
            pa.array([f.shape[0] for f in frames], pa.int32()),
            pa.array([u.text for u in utterances], pa.string()),
            pa.array([u.waveform.size / sampling_rate for u in utterances], pa.float32()),
            pa.array([u.index for u in utterances], pa.int64()),
        ],
        schema=SCHEMA,
    )


def _build_split(
    tmp: Path, *, data: DataConfig, req: _SplitRequest, encoder, extractor, settings: dict[str, Any]
) -> None:
    """Decode, encode and write one split into `tmp` (the caller renames it into place)."""
    if torch.cuda.is_available():  # moved only when it runs: a cache hit never touches the GPU
        encoder = encoder.to("cuda")
    print(f"features: caching split {req.split!r} into {tmp.parent}", file=sys.stderr, flush=True)
    ds = open_split(data, req.split)
    skipped: Counter[str] = Counter()
    total = len(ds) if req.limit is None else min(len(ds), req.limit)
    progress = Progress(f"features {req.split}", total, "clips")
    rows = frames = 0
    utterances = iter_utterances(
        ds, data, max_seconds=req.max_seconds, limit=req.limit, skipped=skipped
    )
    with pa.OSFile(str(tmp / DATA_FILE), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        for chunk in _batched(utterances, WRITE_CHUNK):
            record = _encode_chunk(chunk, encoder, extractor, data.sampling_rate)
            writer.write_batch(record)
            rows += record.num_rows
            frames += int(np.sum(record.column("num_frames").to_numpy()))
            progress.update(len(chunk))
    seconds = progress.close()
    if rows == 0:  # raised before the rename: no empty entry is left in the cache
        reasons = format_skipped(dict(skipped)) or "the split is empty"
        raise ConfigError(f"data: no usable utterances in split {req.split!r} ({reasons})")
    meta = {
        "split": req.split,
        "num_rows": rows,
        "num_frames": frames,
        "encoder_dim": encoder.config.d_model,
        "skipped": dict(skipped),
        "build_seconds": round(seconds, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": settings,
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))


def _split_requests(
    data: DataConfig, encoder_max_seconds: float
) -> tuple[_SplitRequest, _SplitRequest]:
    max_seconds = min(data.max_duration_s, encoder_max_seconds)
    return (
        _SplitRequest(data.train_split, data.max_train_samples, max_seconds),
        _SplitRequest(data.eval_split, data.max_eval_samples, max_seconds),
    )


def load_features(cfg: TrialConfig) -> FeatureSplits:
    """Train and eval encoder features for a trial, from the cache or computed into it."""
    encoder, extractor = build_encoder(cfg.model.encoder)
    encoder_fp = encoder_fingerprint(encoder, extractor, cfg.model.encoder)
    sets: list[FeatureSet] = []
    for req in _split_requests(cfg.data, max_audio_seconds(encoder, extractor)):
        dataset_fp = dataset_fingerprint(open_split(cfg.data, req.split))
        settings = cache_settings(encoder_fp, cfg.data, dataset_fp, req)
        path = cache_dir() / "features" / cache_key(settings)
        build = partial(
            _build_split,
            data=cfg.data,
            req=req,
            encoder=encoder,
            extractor=extractor,
            settings=settings,
        )
        built = build_once(path, build, marker=META_FILE)
        sets.append(FeatureSet(path, from_cache=not built))
    train, evaluation = sets
    skipped = {
        f"{fs.meta['split']}/{reason}": n for fs in sets for reason, n in fs.meta["skipped"].items()
    }
    report_skipped(skipped)
    return FeatureSplits(train, evaluation, encoder.config.d_model, skipped)
