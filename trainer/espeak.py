"""espeak-ng text-to-speech without root: `libespeak-ng.so` through ctypes, or the Debian binary.

`espeakng-loader` (PyPI) bundles the library and its voice data. The library runs in synchronous
mode: `espeak_Synth` returns once the utterance is spoken, and a callback collects the 16-bit
samples (22,050 Hz mono) as they are produced. The library is process-global (one voice, one
callback), so one `LibSpeaker` per process.
"""

from __future__ import annotations

import ctypes
import io
import shutil
import subprocess
from typing import Protocol

import numpy as np

# espeak_AUDIO_OUTPUT, espeak_PARAMETER and flag values from speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4
_CHARS_UTF8 = 1
_POS_CHARACTER = 1

_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class EspeakUnavailableError(RuntimeError):
    """Neither the espeakng-loader library nor an `espeak-ng` binary can be used."""


class Speaker(Protocol):
    sampling_rate: int

    def speak(
        self, text: str, voice: str, rate: int, pitch: int, pitch_range: int, seed: int = 0
    ) -> np.ndarray:
        """int16 samples of `text` spoken by `voice` (e.g. `en-us+m3`); `seed` fixes its noise."""
        ...

    def close(self) -> None: ...


class LibSpeaker:
    """libespeak-ng from espeakng-loader, driven through ctypes."""

    def __init__(self) -> None:
        import espeakng_loader

        try:
            self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        except OSError as err:
            raise EspeakUnavailableError(f"cannot load libespeak-ng: {err}") from err
        self._lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        data = espeakng_loader.get_data_path().encode()
        rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0)
        if rate <= 0:
            raise EspeakUnavailableError(f"espeak_Initialize failed ({rate})")
        self.sampling_rate = int(rate)
        self._chunks: list[np.ndarray] = []
        # Keep a reference: ctypes frees the trampoline when the Python object dies.
        self._callback = _SynthCallback(self._collect)
        self._lib.espeak_SetSynthCallback(self._callback)
        # Breathy (female) variants draw noise from espeak-ng's own generator, which it seeds from
        # the clock; `speak` reseeds it so each utterance's noise is fixed by its `seed`.
        self._lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]

    def _collect(self, wav: ctypes.Array, n: int, events: int) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = keep going

    def speak(
        self, text: str, voice: str, rate: int, pitch: int, pitch_range: int, seed: int = 0
    ) -> np.ndarray:
        self._lib.espeak_ng_SetRandSeed(seed)
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng does not know the voice {voice!r}")
        for param, value in (
            (_PARAM_RATE, rate),
            (_PARAM_PITCH, pitch),
            (_PARAM_RANGE, pitch_range),
        ):
            self._lib.espeak_SetParameter(param, value, 0)
        self._chunks = []
        encoded = text.encode() + b"\0"
        err = self._lib.espeak_Synth(
            encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
        )
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed ({err}) for {text!r}")
        self._lib.espeak_Synchronize()
        if not self._chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(self._chunks)

    def close(self) -> None:
        self._lib.espeak_Terminate()


class BinarySpeaker:
    """The `espeak-ng` command line (Debian package), one process per utterance."""

    sampling_rate = 22_050

    def __init__(self, binary: str) -> None:
        self._binary = binary

    def speak(
        self, text: str, voice: str, rate: int, pitch: int, pitch_range: int, seed: int = 0
    ) -> np.ndarray:
        import soundfile as sf

        cmd = [self._binary, "--stdout", "-v", voice, "-s", str(rate), "-p", str(pitch), text]
        wav = subprocess.run(cmd, check=True, capture_output=True).stdout
        data, sr = sf.read(io.BytesIO(wav), dtype="int16")
        if sr != self.sampling_rate:
            raise RuntimeError(f"espeak-ng binary wrote {sr} Hz, expected {self.sampling_rate}")
        return data

    def close(self) -> None:
        pass


def check_available() -> None:
    """Raise `EspeakUnavailableError` (with a hint) unless some espeak-ng can be used."""
    try:
        import espeakng_loader

        ctypes.CDLL(espeakng_loader.get_library_path())
        return
    except (ImportError, OSError):
        pass
    if shutil.which("espeak-ng") is None:
        raise EspeakUnavailableError(
            "espeak-ng is needed for the synthetic corpus: `pip install espeakng-loader` "
            "(no root) or `apt-get install espeak-ng`"
        )


def open_speaker() -> Speaker:
    """The ctypes library when it loads, else the `espeak-ng` binary."""
    try:
        return LibSpeaker()
    except (ImportError, EspeakUnavailableError):
        binary = shutil.which("espeak-ng")
        if binary is None:
            check_available()  # raises with the install hint
            raise
        return BinarySpeaker(binary)
