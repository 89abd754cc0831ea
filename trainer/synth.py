"""The spoken-digits corpus: espeak-ng digit strings as a `datasets.DatasetDict` on disk.

Each utterance is a string of 2–7 digits read as words ("four oh seven"; 0 is "zero" or "oh" at
random) by one speaker, an espeak-ng English voice plus a variant (`en-us+m3`), at a random rate and
pitch, peak-normalised, optionally with white noise, resampled 22,050 → 16,000 Hz. Speakers are
disjoint between the train / validation / test splits.

espeak-ng is driven through ctypes (the `libespeak-ng.so` that `espeakng-loader` bundles; no root).
Its wave generator keeps function-level static state (pitch-flutter phase and the like) from one
utterance to the next, so the same text comes out a few samples different depending on what was
said before. Determinism therefore comes from a fixed plan: utterances are cut into fixed chunks and
each chunk is spoken by a freshly started interpreter. The output depends on the
seed only, never on the number of workers or their scheduling.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trainer._progress import Progress
from trainer.audio import resample
from trainer.espeak import EspeakUnavailableError, Speaker, check_available, open_speaker

if TYPE_CHECKING:
    import pyarrow as pa
    from datasets import DatasetDict

    from trainer.config import SyntheticDigitsConfig

SYNTH_VERSION = 2
"""Bump when the generated audio changes, so cached corpora are regenerated."""

SAMPLING_RATE = 16_000
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ZERO_WORDS = ("zero", "oh")
VOICES = (
    "en-us",
    "en",  # British; the library refuses the name `en-gb`
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
VARIANTS = tuple(f"m{i}" for i in range(1, 8)) + tuple(f"f{i}" for i in range(1, 6))
SPLITS = ("train", "validation", "test")
HELD_OUT_FRACTION = 0.1
"""Share of speakers, and of utterances, in each of validation and test."""
CHUNK_SIZE = 200
"""Utterances per fresh synthesis process (see the module docstring for why fresh)."""
PEAK = 0.9


@dataclass(frozen=True)
class UtteranceSpec:
    """Everything that decides one utterance's audio (drawn up front from the seed)."""

    index: int
    split: str
    speaker: str  # voice+variant, e.g. "en-us+m3"
    text: str
    rate: int  # words per minute (espeak default 175)
    pitch: int  # 0–100 (default 50)
    pitch_range: int  # 0–100 (default 50)
    lead_s: float  # silence before and after the speech
    trail_s: float


def digits_to_words(digits: str, rng: np.random.Generator | None = None) -> str:
    """ "407" -> "four oh seven"; each 0 is "zero", or "zero"/"oh" at random when `rng` is given."""
    words = []
    for d in digits:
        if d == "0" and rng is not None:
            words.append(ZERO_WORDS[int(rng.integers(len(ZERO_WORDS)))])
        else:
            words.append(DIGIT_WORDS[int(d)])
    return " ".join(words)


def words_to_digits(text: str) -> str:
    """ "four oh seven" -> "407" (inverse of `digits_to_words`)."""
    lookup = {w: str(i) for i, w in enumerate(DIGIT_WORDS)} | {"oh": "0"}
    return "".join(lookup[w] for w in text.split())


def split_speakers(rng: np.random.Generator) -> dict[str, list[str]]:
    """All voice+variant speakers, shuffled and dealt into disjoint splits."""
    speakers = [f"{v}+{variant}" for v in VOICES for variant in VARIANTS]
    order = rng.permutation(len(speakers))
    n_held = max(1, round(HELD_OUT_FRACTION * len(speakers)))
    shuffled = [speakers[i] for i in order]
    return {
        "validation": shuffled[:n_held],
        "test": shuffled[n_held : 2 * n_held],
        "train": shuffled[2 * n_held :],
    }


def plan_corpus(num: int, seed: int) -> list[UtteranceSpec]:
    """The corpus as a list of specs, in split order (train, validation, test)."""
    if num < len(SPLITS):
        raise ValueError(f"need at least {len(SPLITS)} utterances (one per split), got {num}")
    rng = np.random.default_rng(seed)
    speakers = split_speakers(rng)
    n_held = max(1, round(HELD_OUT_FRACTION * num))
    counts = {"train": num - 2 * n_held, "validation": n_held, "test": n_held}
    specs: list[UtteranceSpec] = []
    for split in SPLITS:
        pool = speakers[split]
        for _ in range(counts[split]):
            digits = "".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(2, 8))))
            specs.append(
                UtteranceSpec(
                    index=len(specs),
                    split=split,
                    speaker=pool[int(rng.integers(len(pool)))],
                    text=digits_to_words(digits, rng),
                    rate=int(rng.integers(130, 221)),
                    pitch=int(rng.integers(25, 76)),
                    pitch_range=int(rng.integers(30, 81)),
                    lead_s=float(rng.uniform(0.0, 0.15)),
                    trail_s=float(rng.uniform(0.0, 0.15)),
                )
            )
    return specs


def render(spec: UtteranceSpec, speaker: Speaker, noise: float, seed: int) -> np.ndarray:
    """One utterance: speak, peak-normalise, pad with silence, add noise, resample to 16 kHz."""
    pcm = speaker.speak(
        spec.text,
        spec.speaker,
        spec.rate,
        spec.pitch,
        spec.pitch_range,
        seed=seed * 1_000_003 + spec.index,
    )
    wave = pcm.astype(np.float32) / max(float(np.abs(pcm).max()), 1.0) * PEAK
    sr = speaker.sampling_rate
    wave = np.pad(wave, (round(spec.lead_s * sr), round(spec.trail_s * sr)))
    if noise > 0:
        # Per-utterance generator: the noise does not depend on which process renders it.
        rng = np.random.default_rng([seed, spec.index])
        wave = wave + rng.normal(0.0, noise, size=wave.shape).astype(np.float32)
    return resample(wave, sr, SAMPLING_RATE)


def _worker_main() -> None:
    """Entry of a synthesis subprocess: a pickled chunk job on stdin, waveforms on stdout."""
    specs, noise, seed = pickle.load(sys.stdin.buffer)
    speaker = open_speaker()
    waves = [render(spec, speaker, noise, seed) for spec in specs]
    pickle.dump(waves, sys.stdout.buffer, protocol=pickle.HIGHEST_PROTOCOL)


def _render_chunk(job: tuple[list[UtteranceSpec], float, int]) -> list[np.ndarray]:
    """Speak one chunk in a fresh interpreter, so espeak-ng starts from a clean state.

    A plain subprocess rather than a multiprocessing pool: no re-import of the caller's
    `__main__`, no fork of a process that may hold torch threads.
    """
    package_root = str(Path(__file__).resolve().parent.parent)
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])
    }
    cmd = [sys.executable, "-c", "from trainer.synth import _worker_main; _worker_main()"]
    done = subprocess.run(cmd, input=pickle.dumps(job), capture_output=True, env=env)
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"synthesis worker failed (exit {done.returncode}):\n{tail}")
    return pickle.loads(done.stdout)


def synthesize(
    specs: list[UtteranceSpec], noise: float, seed: int, workers: int | None = None
) -> list[np.ndarray]:
    """Waveforms for all specs, in order; fixed chunks, each in its own fresh process."""
    check_available()  # fail fast, here, rather than in every worker
    jobs = [(specs[i : i + CHUNK_SIZE], noise, seed) for i in range(0, len(specs), CHUNK_SIZE)]
    workers = workers or min(len(os.sched_getaffinity(0)), 4, len(jobs))
    progress = Progress("synth", len(specs), "utterances")
    waves: list[np.ndarray] = []
    # Threads only wait on the subprocesses; map() keeps the chunk order.
    with ThreadPoolExecutor(workers) as pool:
        for chunk in pool.map(_render_chunk, jobs):
            waves.extend(chunk)
            progress.update(len(chunk))
    progress.close()
    return waves


def _split_table(specs: list[UtteranceSpec], waves: list[np.ndarray]) -> pa.Table:
    import pyarrow as pa

    lengths = np.array([w.size for w in waves], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])  # int64: a split may pass 2**31 samples
    values = np.concatenate(waves) if waves else np.zeros(0, np.float32)
    arrays = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.float32()))
    rates = pa.array(np.full(len(waves), SAMPLING_RATE, dtype=np.int32))
    audio = pa.StructArray.from_arrays([arrays, rates], names=["array", "sampling_rate"])
    return pa.table(
        {
            "audio": audio,
            "text": pa.array([s.text for s in specs], pa.string()),
            "speaker": pa.array([s.speaker for s in specs], pa.string()),
            "duration": pa.array((lengths / SAMPLING_RATE).astype(np.float32)),
        }
    )


def build_dataset(
    specs: list[UtteranceSpec], waves: list[np.ndarray], fingerprint: str
) -> DatasetDict:
    """A `DatasetDict` with plain float32 audio (no `Audio` feature: nothing needs torchcodec)."""
    from datasets import Dataset, DatasetDict, DatasetInfo, Features

    splits = {}
    for split in SPLITS:
        rows = [i for i, s in enumerate(specs) if s.split == split]
        table = _split_table([specs[i] for i in rows], [waves[i] for i in rows])
        info = DatasetInfo(
            description="projsweep spoken digits (espeak-ng)",
            features=Features.from_arrow_schema(table.schema),
        )
        # An explicit fingerprint keeps save_to_disk byte-identical for a seed.
        splits[split] = Dataset(table, info=info, split=split, fingerprint=f"{fingerprint}-{split}")
    return DatasetDict(splits)


def corpus_key(num: int, seed: int, noise: float) -> str:
    settings = {"num": num, "seed": seed, "noise": noise, "version": SYNTH_VERSION}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def write_corpus(out: Path, num: int, seed: int, noise: float) -> DatasetDict:
    """Synthesize and `save_to_disk` a corpus into `out` (missing or empty)."""
    specs = plan_corpus(num, seed)
    waves = synthesize(specs, noise, seed)
    corpus = build_dataset(specs, waves, corpus_key(num, seed, noise))
    corpus.save_to_disk(str(out))
    return corpus


def summarize(corpus: DatasetDict) -> list[str]:
    """One line per split: utterances, speakers, audio hours."""
    lines = []
    for name, split in corpus.items():
        durations = np.asarray(split["duration"], dtype=np.float64)
        lines.append(
            f"{name}: {len(split)} utterances, {len(set(split['speaker']))} speakers, "
            f"{durations.sum():.1f} s audio (mean {durations.mean():.2f} s)"
        )
    return lines


def ensure_synthetic_corpus(cfg: SyntheticDigitsConfig) -> Path:
    """The corpus for `cfg` under `cache_dir()/corpora`, generated on first use and then reused.

    Concurrent callers generate it once (file lock); it is written to a temporary directory beside
    the final one and renamed into place, so a half-written corpus is never read.
    """
    from trainer.cachedir import build_once
    from trainer.config import cache_dir

    key = corpus_key(cfg.num_utterances, cfg.seed, cfg.noise)
    final = cache_dir() / "corpora" / f"digits-{key}"

    def build(tmp: Path) -> None:
        write_corpus(tmp, cfg.num_utterances, cfg.seed, cfg.noise)
        (tmp / "projsweep-synth.json").write_text(json.dumps(cfg.model_dump() | {"key": key}))

    build_once(final, build, marker="dataset_dict.json")
    return final


def synth_command(args: argparse.Namespace) -> int:
    """`projsweep data synth --out DIR [--num N] [--seed S] [--noise X]`."""
    from trainer.overrides import ConfigError

    out = Path(args.out)
    if args.num < len(SPLITS):
        raise ConfigError(f"--num must be at least {len(SPLITS)} (one utterance per split)")
    if args.noise < 0:
        raise ConfigError("--noise must be >= 0")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty")
    try:
        corpus = write_corpus(out, args.num, args.seed, args.noise)
    except EspeakUnavailableError as err:
        print(f"projsweep: error: {err}", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
        return 1
    for line in summarize(corpus):
        print(line)
    print(f"wrote {out}")
    return 0
