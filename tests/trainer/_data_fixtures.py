"""Helpers shared by the data-side tests (synth, data, encoder, features): small and fast."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from trainer.config import EncoderConfig, TinyEncoderConfig, TrialConfig

SR = 16_000


def write_digits_corpus(root: Path, num: int = 40, seed: int = 0, noise: float = 0.0) -> Path:
    """A small synthetic corpus saved with `save_to_disk` under `root/digits`."""
    from trainer.synth import write_corpus

    out = root / "digits"
    write_corpus(out, num, seed, noise)
    return out


def speak(texts: list[str], voice: str = "en-us+m3") -> list[np.ndarray]:
    """16 kHz waveforms spoken in this process (no corpus, no subprocess)."""
    from trainer.espeak import LibSpeaker
    from trainer.synth import UtteranceSpec, render

    speaker = LibSpeaker()
    specs = [
        UtteranceSpec(i, "train", voice, text, 175, 50, 50, 0.05, 0.05)
        for i, text in enumerate(texts)
    ]
    return [render(spec, speaker, noise=0.0, seed=0) for spec in specs]


def wav_bytes(wave: np.ndarray, sr: int = SR) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV")
    return buf.getvalue()


def small_encoder(**overrides: Any) -> EncoderConfig:
    """A tiny encoder that runs fast in tests; a 4 s window holds every digit string."""
    tiny = {"d_model": 64, "num_layers": 1, "num_heads": 2, "ffn_dim": 128}
    tiny |= {"max_source_positions": 200} | overrides
    return EncoderConfig(tiny=TinyEncoderConfig(**tiny))


def trial_config(dataset: Path, **data: Any) -> TrialConfig:
    """A trial over a local corpus with the small encoder (model/train sections at defaults)."""
    return TrialConfig.model_validate(
        {
            "model": {"encoder": small_encoder().model_dump()},
            "data": {"dataset": str(dataset), "max_eval_samples": 4} | data,
        }
    )


def load_in_child(cache: str, cfg_json: str, barrier: Any, results: Any) -> None:
    """Process target: wait for the sibling, then load features; report what was built here."""
    os.environ["PROJSWEEP_CACHE"] = cache
    from trainer.features import load_features

    cfg = TrialConfig.model_validate_json(cfg_json)
    barrier.wait()
    splits = load_features(cfg)
    results.put((os.getpid(), splits.train.from_cache, splits.eval.from_cache))
