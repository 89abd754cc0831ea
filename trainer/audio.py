"""Audio decoding and resampling with soundfile and numpy only.

datasets 5.x decodes audio through torchcodec, whose PyPI build needs CUDA libraries (see the stack
notes), so audio columns are read undecoded and decoded here. The resampler is a windowed-sinc
polyphase filter in numpy: no torchaudio or scipy, and cheap to import in the synthesis workers.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import soundfile as sf

# Zeros padded around a clip before the FFT so its end does not wrap around into its start.
_EDGE_PAD = 256


class AudioDecodeError(ValueError):
    """A clip that cannot be decoded (corrupt bytes, missing file, unknown layout)."""


def _smooth_at_least(n: int) -> int:
    """Smallest 2·3·5·7-smooth integer >= n (FFT sizes with small factors are fast)."""
    candidates = [1]
    for p in (2, 3, 5, 7):
        candidates = [
            c * p**k for c in candidates for k in range(n.bit_length() + 1) if c * p**k < 2 * n
        ]
    return min(c for c in candidates if c >= n)


def resample(waveform: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited (FFT) resampling of a mono float waveform; output length ceil(n·target/orig).

    The clip is zero-padded by a whole number of `orig/gcd` blocks on each side, so input and output
    samples line up exactly (output k sits at input k·orig/target) and the FFT sizes stay smooth.
    """
    x = np.asarray(waveform, dtype=np.float32)
    if orig_sr == target_sr or x.size == 0:
        return x.copy()
    g = math.gcd(orig_sr, target_sr)
    up, down = target_sr // g, orig_sr // g
    n_out = math.ceil(x.size * up / down)
    pad_blocks = math.ceil(_EDGE_PAD / down)
    blocks = _smooth_at_least(math.ceil(x.size / down) + 2 * pad_blocks)
    n_in, m = blocks * down, blocks * up
    padded = np.zeros(n_in, dtype=np.float64)
    padded[pad_blocks * down : pad_blocks * down + x.size] = x
    spectrum = np.fft.rfft(padded)
    kept = min(n_in, m) // 2  # bins below both Nyquist frequencies (drops the Nyquist bin)
    out_spectrum = np.zeros(m // 2 + 1, dtype=np.complex128)
    out_spectrum[:kept] = spectrum[:kept]
    out = np.fft.irfft(out_spectrum, m) * (m / n_in)
    start = pad_blocks * up
    return out[start : start + n_out].astype(np.float32)


def to_mono(data: np.ndarray) -> np.ndarray:
    """[n] or [n, channels] (soundfile's layout) -> [n] float32."""
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data.mean(axis=1)
    if data.ndim != 1:
        raise AudioDecodeError(
            f"expected mono or [samples, channels] audio, got shape {data.shape}"
        )
    return data


def _read_soundfile(source: Any) -> tuple[np.ndarray, int]:
    try:
        data, sr = sf.read(source, dtype="float32", always_2d=False)
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError, TypeError, OSError …
        raise AudioDecodeError(f"soundfile could not decode the clip: {err}") from err
    return to_mono(data), int(sr)


def decode_audio(value: Any, default_sr: int) -> tuple[np.ndarray, int]:
    """One audio cell -> (mono float32 waveform, its sampling rate).

    Accepts what datasets stores: `{"bytes", "path"}` (an undecoded `Audio` feature), `{"array",
    "sampling_rate"}` (decoded audio or the synthetic corpus), a file path, raw encoded bytes, or a
    plain float array, taken to be at `default_sr` since it carries no rate.
    """
    if isinstance(value, Mapping):
        if value.get("array") is not None:
            sr = value.get("sampling_rate") or default_sr
            return to_mono(np.asarray(value["array"])), int(sr)
        if value.get("bytes"):
            return _read_soundfile(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return _read_soundfile(value["path"])
        raise AudioDecodeError(f"audio mapping has neither array, bytes nor path: {sorted(value)}")
    if isinstance(value, bytes | bytearray):
        return _read_soundfile(io.BytesIO(value))
    if isinstance(value, str):
        return _read_soundfile(value)
    if value is None:
        raise AudioDecodeError("audio cell is empty")
    return to_mono(np.asarray(value)), default_sr


def load_waveform(value: Any, target_sr: int) -> np.ndarray:
    """Decode one audio cell and resample it to `target_sr` (mono float32).

    Raises `AudioDecodeError` for anything that is not usable audio.
    """
    try:
        waveform, sr = decode_audio(value, default_sr=target_sr)
    except AudioDecodeError:
        raise
    except (ValueError, TypeError) as err:  # ragged lists, odd dtypes
        raise AudioDecodeError(f"unusable audio value: {err}") from err
    if sr <= 0:
        raise AudioDecodeError(f"invalid sampling rate {sr}")
    if not np.all(np.isfinite(waveform)):
        raise AudioDecodeError("audio contains NaN or Inf samples")
    return resample(waveform, sr, target_sr)
