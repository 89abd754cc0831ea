"""The frozen Whisper-style speech encoder and the log-mel feature extractor that feeds it.

Shape legend: B batch, N samples, M mel bins, F mel frames (= 2 * max_source_positions, the fixed
window the encoder insists on), T encoder frames, C encoder width (d_model).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

import numpy as np
import torch
from transformers import (
    AutoConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperModel,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from trainer.config import EncoderConfig, TinyEncoderConfig
from trainer.overrides import ConfigError

SAMPLING_RATE = 16_000
HOP_LENGTH = 160  # 10 ms mel hop, as every Whisper checkpoint
_CONV_STRIDE = 2  # conv2 halves the mel frame rate: one encoder frame per 20 ms


def tiny_whisper_config(cfg: TinyEncoderConfig) -> WhisperConfig:
    """A WhisperConfig whose encoder matches `cfg` (the decoder half is never built)."""
    return WhisperConfig(
        d_model=cfg.d_model,
        encoder_layers=cfg.num_layers,
        encoder_attention_heads=cfg.num_heads,
        encoder_ffn_dim=cfg.ffn_dim,
        decoder_layers=1,
        decoder_attention_heads=cfg.num_heads,
        decoder_ffn_dim=cfg.ffn_dim,
        num_mel_bins=cfg.num_mel_bins,
        max_source_positions=cfg.max_source_positions,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )


def build_tiny_encoder(cfg: TinyEncoderConfig) -> WhisperEncoder:
    """A random encoder whose features carry the signal: input convs re-initialised fan-in scaled.

    With transformers' default init (std 0.02) the two convolutions pass so little of the mel input
    that the sinusoidal position embeddings drown it, and nothing downstream learns (stack notes:
    WER stuck near 0.9). Normal(0, sqrt(2 / fan_in)) with zero bias keeps the input's scale.
    """
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
        torch.manual_seed(cfg.seed)
        encoder = WhisperEncoder(tiny_whisper_config(cfg))
        for conv in (encoder.conv1, encoder.conv2):
            fan_in = conv.in_channels * conv.kernel_size[0]
            with torch.no_grad():
                conv.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
                conv.bias.zero_()
    return encoder


def load_pretrained_encoder(source: str) -> WhisperEncoder:
    """The encoder of a Whisper checkpoint (hub id or `save_pretrained` directory).

    Full checkpoints (`WhisperForConditionalGeneration`, `WhisperModel`) are loaded whole and their
    encoder kept: their weight names carry a `model.encoder.` prefix that a bare `WhisperEncoder`
    would not match. A bare `WhisperEncoder` checkpoint loads directly.
    """
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as err:
        raise ConfigError(f"model.encoder.pretrained: cannot load {source!r}: {err}") from err
    if not isinstance(config, WhisperConfig):
        raise ConfigError(
            f"model.encoder.pretrained: {source!r} is a {type(config).__name__}, "
            "not a Whisper model"
        )
    architectures = config.architectures or []
    # Weights from safetensors only: a `pytorch_model.bin` is a pickle, refused here.
    load = {"dtype": torch.float32, "use_safetensors": True}
    if "WhisperEncoder" in architectures:
        return WhisperEncoder.from_pretrained(source, **load)
    if "WhisperModel" in architectures:
        return WhisperModel.from_pretrained(source, **load).get_encoder()
    return WhisperForConditionalGeneration.from_pretrained(source, **load).get_encoder()


def feature_extractor_for(config: WhisperConfig) -> WhisperFeatureExtractor:
    """Log-mel settings matching an encoder: its mel bins, its window of 2·max_source_positions."""
    n_samples = 2 * config.max_source_positions * HOP_LENGTH
    extractor = WhisperFeatureExtractor(
        feature_size=config.num_mel_bins,
        sampling_rate=SAMPLING_RATE,
        hop_length=HOP_LENGTH,
        chunk_length=n_samples // SAMPLING_RATE,
    )
    # chunk_length is whole seconds; set the derived sizes exactly for windows that are not.
    extractor.n_samples = n_samples
    extractor.nb_max_frames = n_samples // HOP_LENGTH
    return extractor


def _load_extractor(source: str, config: WhisperConfig) -> WhisperFeatureExtractor:
    try:
        extractor = WhisperFeatureExtractor.from_pretrained(source)
    except OSError:  # a bare encoder checkpoint without preprocessor_config.json
        return feature_extractor_for(config)
    if extractor.feature_size != config.num_mel_bins:
        raise ConfigError(
            f"model.encoder.pretrained: feature extractor has {extractor.feature_size} mel bins, "
            f"the encoder expects {config.num_mel_bins}"
        )
    return extractor


def build_encoder(cfg: EncoderConfig) -> tuple[WhisperEncoder, WhisperFeatureExtractor]:
    """The frozen encoder (eval mode, no gradients) and its feature extractor."""
    if cfg.tiny is not None:
        encoder = build_tiny_encoder(cfg.tiny)
        extractor = feature_extractor_for(encoder.config)
    else:
        assert cfg.pretrained is not None  # EncoderConfig validates exactly one source
        encoder = load_pretrained_encoder(cfg.pretrained)
        extractor = _load_extractor(cfg.pretrained, encoder.config)
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder, extractor


def valid_frames(num_samples: int, hop_length: int, max_positions: int) -> int:
    """Encoder frames that hold audio for a clip of `num_samples` (the rest see only padding)."""
    mel_frames = math.ceil(num_samples / hop_length)
    return min((mel_frames - 1) // _CONV_STRIDE + 1, max_positions) if mel_frames > 0 else 0


def max_audio_seconds(encoder: WhisperEncoder, extractor: WhisperFeatureExtractor) -> float:
    """Longest clip one encoder window holds."""
    return 2 * encoder.config.max_source_positions * extractor.hop_length / extractor.sampling_rate


def log_mel(
    extractor: WhisperFeatureExtractor, waveforms: Sequence[np.ndarray], device: torch.device
) -> torch.Tensor:
    """The extractor's log-mel [B, M, F] for the fixed window, without transforming the padding.

    `WhisperFeatureExtractor` zero-pads every clip to the whole window (30 s for real checkpoints)
    before its STFT. Frames that see only zeros come out as log10(1e-10) = -10, then clipped to
    (max - 8); so the STFT runs over the longest clip plus n_fft zeros (every frame that still sees
    audio), and the rest of the window is filled with that value. Equal to the extractor's output
    up to float rounding (tested); settings this shortcut does not cover use the extractor itself.
    """
    if extractor.dither != 0.0 or extractor.padding_value != 0.0:
        mel = extractor(list(waveforms), sampling_rate=extractor.sampling_rate, return_tensors="pt")
        return mel.input_features.to(device)
    n_fft, hop, full_frames = extractor.n_fft, extractor.hop_length, extractor.nb_max_frames
    span = min(extractor.n_samples, max(len(w) for w in waveforms) + n_fft)
    audio = np.zeros((len(waveforms), span), dtype=np.float32)  # B, N (longer clips cut, as there)
    for row, wave in enumerate(waveforms):
        clip = np.asarray(wave[:span], dtype=np.float32)
        audio[row, : clip.size] = clip
    audio = torch.from_numpy(audio).to(device)
    window = torch.hann_window(n_fft, device=device)
    stft = torch.stft(
        audio, n_fft, hop, window=window, return_complex=True
    )  # B, n_fft/2+1, N/hop+1
    power = (stft[..., :-1].abs() ** 2).contiguous()  # the extractor drops the last frame too
    filters = torch.from_numpy(extractor.mel_filters).to(device, torch.float32)
    computed = (filters.T @ power).clamp(min=1e-10).log10()  # B, M, N/hop
    log_spec = torch.full((len(waveforms), filters.shape[1], full_frames), -10.0, device=device)
    log_spec[..., : computed.shape[-1]] = computed[..., :full_frames]  # B, M, F
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0


@torch.inference_mode()
def encode_batch(
    encoder: WhisperEncoder,
    extractor: WhisperFeatureExtractor,
    waveforms: Sequence[np.ndarray],
    sampling_rate: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder outputs for a batch of clips: features [B, T, C] float32 and valid lengths [B] long.

    T is the longest valid length in the batch; frames past a clip's own length are padding.
    """
    if sampling_rate != extractor.sampling_rate:
        raise ValueError(
            f"waveforms at {sampling_rate} Hz, extractor expects {extractor.sampling_rate}"
        )
    param = next(encoder.parameters())
    mel = log_mel(extractor, waveforms, param.device)  # B, M, F (the whole fixed window)
    hidden = encoder(mel.to(param.dtype)).last_hidden_state  # B, F/2, C
    max_positions = encoder.config.max_source_positions
    lengths = torch.tensor(
        [valid_frames(len(w), extractor.hop_length, max_positions) for w in waveforms],
        dtype=torch.long,
    )
    return hidden[:, : int(lengths.max())].float().cpu(), lengths  # B, T, C


def _hash_state(hasher: hashlib._Hash, encoder: torch.nn.Module) -> None:
    for name, tensor in sorted(encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        hasher.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        hasher.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def extractor_settings(extractor: WhisperFeatureExtractor) -> dict[str, object]:
    """What decides the log-mel input (the mel filter bank follows from these)."""
    names = ("feature_size", "sampling_rate", "hop_length", "n_fft", "n_samples", "nb_max_frames")
    names += ("padding_value", "dither")
    return {name: getattr(extractor, name) for name in names}


def encoder_fingerprint(
    encoder: WhisperEncoder, extractor: WhisperFeatureExtractor, cfg: EncoderConfig
) -> str:
    """A hash of the encoder's identity (config section), architecture, weights and mel settings."""
    config = encoder.config.to_dict()
    for volatile in (
        "transformers_version",
        "_name_or_path",
        "architectures",
        "dtype",
        "torch_dtype",
    ):
        config.pop(volatile, None)
    identity = {
        "source": cfg.model_dump(mode="json"),
        "config": config,
        "extractor": extractor_settings(extractor),
    }
    hasher = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    _hash_state(hasher, encoder)
    return hasher.hexdigest()
