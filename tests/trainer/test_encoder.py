from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_fixtures import SR, small_encoder, speak
from transformers import (
    LlamaConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperModel,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from trainer.config import EncoderConfig, TinyEncoderConfig
from trainer.encoder import (
    build_encoder,
    build_tiny_encoder,
    encode_batch,
    encoder_fingerprint,
    feature_extractor_for,
    log_mel,
    tiny_whisper_config,
    valid_frames,
)
from trainer.overrides import ConfigError


@pytest.fixture(scope="module")
def waves() -> list[np.ndarray]:
    return speak(["four oh seven", "two nine", "one one eight six five", "zero three"])


def _rel_dist(a: torch.Tensor, b: torch.Tensor) -> float:
    n = min(a.shape[0], b.shape[0])
    return float((a[:n] - b[:n]).norm() / a[:n].norm())


def test_tiny_encoder_is_frozen_and_matches_its_extractor() -> None:
    cfg = small_encoder(max_source_positions=150, num_mel_bins=64)
    encoder, extractor = build_encoder(cfg)
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    assert extractor.feature_size == 64
    assert extractor.nb_max_frames == 300 and extractor.n_samples == 300 * 160
    assert cfg.max_audio_seconds == pytest.approx(3.0)


def test_input_convs_are_fan_in_initialised_and_seeded() -> None:
    cfg = TinyEncoderConfig(seed=7)
    before = torch.random.get_rng_state()
    encoder = build_tiny_encoder(cfg)
    assert torch.equal(torch.random.get_rng_state(), before)  # caller's RNG untouched
    for conv in (encoder.conv1, encoder.conv2):
        fan_in = conv.in_channels * conv.kernel_size[0]
        assert float(conv.weight.detach().std()) == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
        assert torch.all(conv.bias == 0)
    same = build_tiny_encoder(cfg)
    other = build_tiny_encoder(TinyEncoderConfig(seed=8))
    assert all(
        torch.equal(a, b) for a, b in zip(encoder.parameters(), same.parameters(), strict=True)
    )
    assert not torch.equal(encoder.conv1.weight, other.conv1.weight)


def test_valid_frames_formula() -> None:
    # (ceil(n / 160) - 1) // 2 + 1, capped at the window
    assert valid_frames(160, 160, 1500) == 1
    assert valid_frames(320, 160, 1500) == 1
    assert valid_frames(321, 160, 1500) == 2
    assert valid_frames(16_000, 160, 1500) == 50
    assert valid_frames(16_000 * 40, 160, 1500) == 1500
    assert valid_frames(0, 160, 1500) == 0


def test_log_mel_equals_the_feature_extractor() -> None:
    rng = np.random.default_rng(0)
    clips = [rng.normal(0, 0.1, n).astype(np.float32) for n in (401, 16_000, 50_000, 90_000)]
    short_window = feature_extractor_for(
        tiny_whisper_config(TinyEncoderConfig(max_source_positions=250))
    )
    for extractor in (short_window, WhisperFeatureExtractor()):
        reference = extractor(clips, sampling_rate=SR, return_tensors="pt").input_features
        got = log_mel(extractor, clips, torch.device("cpu"))
        assert got.shape == reference.shape
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)


def test_encode_batch_shapes_and_lengths(waves: list[np.ndarray]) -> None:
    encoder, extractor = build_encoder(small_encoder())
    feats, lengths = encode_batch(encoder, extractor, waves, SR)
    expected = [(math.ceil(w.size / 160) - 1) // 2 + 1 for w in waves]
    assert lengths.tolist() == expected
    assert feats.shape == (len(waves), max(expected), 64) and feats.dtype == torch.float32
    alone, _ = encode_batch(encoder, extractor, waves[1:2], SR)  # batching does not leak
    torch.testing.assert_close(alone[0, : expected[1]], feats[1, : expected[1]], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="22050 Hz"):
        encode_batch(encoder, extractor, waves, 22_050)


def test_tiny_encoder_features_carry_the_signal(waves: list[np.ndarray]) -> None:
    """Different utterances far apart, the same one with faint noise close (fan-in init)."""
    cfg = TinyEncoderConfig(max_source_positions=200)
    encoder, extractor = build_encoder(EncoderConfig(tiny=cfg))
    feats, lengths = encode_batch(encoder, extractor, waves, SR)
    rng = np.random.default_rng(0)
    noisy = [w + rng.normal(0, 1e-4, w.shape).astype(np.float32) for w in waves]
    noisy_feats, _ = encode_batch(encoder, extractor, noisy, SR)
    clips = [feats[i, : lengths[i]] for i in range(len(waves))]
    same = max(_rel_dist(clips[i], noisy_feats[i, : lengths[i]]) for i in range(len(waves)))
    different = min(_rel_dist(clips[i], clips[j]) for i in range(4) for j in range(4) if i != j)
    assert different > 10 * same
    # transformers' default init (std 0.02) passes little through: the reason for the fan-in init
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        default = WhisperEncoder(tiny_whisper_config(cfg)).eval()
    d_feats, _ = encode_batch(default, extractor, waves, SR)
    d_clips = [d_feats[i, : lengths[i]] for i in range(len(waves))]
    d_different = min(
        _rel_dist(d_clips[i], d_clips[j]) for i in range(4) for j in range(4) if i != j
    )
    assert different > 4 * d_different


def _tiny_whisper_config() -> WhisperConfig:
    return WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
        max_source_positions=200, max_target_positions=32, vocab_size=100, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None,
        suppress_tokens=None,
    )  # fmt: skip


@pytest.mark.parametrize("model_cls", [WhisperForConditionalGeneration, WhisperModel])
def test_saved_checkpoint_loads_by_path_with_same_features(
    model_cls: type, tmp_path: Path, waves: list[np.ndarray]
) -> None:
    torch.manual_seed(0)
    model = model_cls(_tiny_whisper_config()).eval()
    extractor = feature_extractor_for(model.config)
    model.save_pretrained(tmp_path)
    extractor.save_pretrained(tmp_path)
    encoder, loaded_extractor = build_encoder(EncoderConfig(pretrained=str(tmp_path)))
    assert not any(p.requires_grad for p in encoder.parameters())
    assert loaded_extractor.nb_max_frames == 400
    expected, lengths = encode_batch(model.get_encoder(), extractor, waves, SR)
    got, got_lengths = encode_batch(encoder, loaded_extractor, waves, SR)
    assert torch.equal(lengths, got_lengths)
    torch.testing.assert_close(got, expected)


def test_bare_encoder_checkpoint_without_extractor(tmp_path: Path) -> None:
    torch.manual_seed(0)
    WhisperEncoder(_tiny_whisper_config()).save_pretrained(tmp_path)
    encoder, extractor = build_encoder(EncoderConfig(pretrained=str(tmp_path)))
    assert isinstance(encoder, WhisperEncoder)
    assert extractor.nb_max_frames == 400  # built from the encoder's config


def test_a_pickled_checkpoint_is_refused(tmp_path: Path) -> None:
    """Weights load from safetensors only: a `pytorch_model.bin` (a pickle) is not read."""
    encoder = WhisperEncoder(_tiny_whisper_config())
    encoder.config.save_pretrained(tmp_path)
    torch.save(encoder.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        build_encoder(EncoderConfig(pretrained=str(tmp_path)))


def test_non_whisper_checkpoint_is_a_config_error(tmp_path: Path) -> None:
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    with pytest.raises(ConfigError, match="not a Whisper model"):
        build_encoder(EncoderConfig(pretrained=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"model\.encoder\.pretrained"):
        build_encoder(EncoderConfig(pretrained=str(tmp_path / "missing")))


def test_fingerprint_tracks_weights_and_settings() -> None:
    cfg = small_encoder()
    fp = encoder_fingerprint(*build_encoder(cfg), cfg)
    assert fp == encoder_fingerprint(*build_encoder(cfg), cfg)  # stable across builds
    other_seed = small_encoder(seed=1)
    assert encoder_fingerprint(*build_encoder(other_seed), other_seed) != fp
    encoder, extractor = build_encoder(cfg)
    with torch.no_grad():
        encoder.layer_norm.weight.add_(1e-3)
    assert encoder_fingerprint(encoder, extractor, cfg) != fp
    encoder, extractor = build_encoder(cfg)
    extractor.dither = 1e-5
    assert encoder_fingerprint(encoder, extractor, cfg) != fp
