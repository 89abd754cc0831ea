"""The trial config: the schema of `projsweep train CONFIG.yaml` and of a sweep's `base`.

Top-level sections `model` (encoder, decoder, projector), `data` and `train`. Every section forbids
unknown keys, defaults live here, and cross-field rules raise naming the field. Untyped mappings
(YAML, Tune's flat samples) become a `TrialConfig` through `TrialConfig.model_validate` or
`load_trial_config`, in exactly one place per entry point.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from projectors.config import MLPConfig, ProjectorConfig
from trainer.overrides import apply_overrides, read_yaml_mapping, validate_model

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
UnitInterval = Annotated[float, Field(ge=0.0, lt=1.0)]

AUDIO_PLACEHOLDER = "<audio>"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _exactly_one(section: BaseModel, a: str, b: str) -> None:
    if (getattr(section, a) is None) == (getattr(section, b) is None):
        raise ValueError(f"set exactly one of `{a}` and `{b}`")


class TinyEncoderConfig(_Section):
    """A Whisper-style encoder built from a config (random, frozen, fan-in initialised)."""

    d_model: PositiveInt = 256
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 4
    ffn_dim: PositiveInt = 1024
    num_mel_bins: PositiveInt = 80
    max_source_positions: PositiveInt = 200
    """Encoder frames per (padded) input, 20 ms each (200 → 4 s). The encoder always runs its
    whole window, so this, not the clip length, sets the feature-caching cost."""
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyEncoderConfig:
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide d_model ({self.d_model})")
        return self


class EncoderConfig(_Section):
    """The frozen speech encoder: a Whisper checkpoint (hub id or local path) or a tiny config."""

    pretrained: str | None = None
    """Hub id or local directory of a Whisper model / encoder (`save_pretrained` layout)."""
    tiny: TinyEncoderConfig | None = None

    @model_validator(mode="after")
    def _one_source(self) -> EncoderConfig:
        _exactly_one(self, "pretrained", "tiny")
        return self

    @property
    def max_audio_seconds(self) -> float | None:
        """Longest clip one encoder window holds (None: read from the checkpoint)."""
        if self.tiny is None:
            return None
        return self.tiny.max_source_positions * 2 * 0.01


class TinyDecoderConfig(_Section):
    """A small Llama-style causal LM built from a config, with a word-level tokenizer."""

    hidden_size: PositiveInt = 128
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 4
    intermediate_size: PositiveInt = 512
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyDecoderConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})"
            )
        return self


class DecoderConfig(_Section):
    """The LLM: a causal LM checkpoint (hub id or local path) or a tiny config."""

    pretrained: str | None = None
    """Hub id or local directory of an `AutoModelForCausalLM` checkpoint and its tokenizer."""
    tiny: TinyDecoderConfig | None = None
    trainable: bool = False
    """Train the decoder's weights too (the tiny preset must: no pretrained LLM exists offline)."""
    prompt: str = AUDIO_PLACEHOLDER
    """Text before the transcript; `<audio>` marks where the projected audio frames go."""

    @model_validator(mode="after")
    def _valid(self) -> DecoderConfig:
        _exactly_one(self, "pretrained", "tiny")
        if self.prompt.count(AUDIO_PLACEHOLDER) != 1:
            raise ValueError(f"prompt must contain `{AUDIO_PLACEHOLDER}` exactly once")
        return self


class ModelConfig(_Section):
    encoder: EncoderConfig = Field(default_factory=lambda: EncoderConfig(tiny=TinyEncoderConfig()))
    decoder: DecoderConfig = Field(
        default_factory=lambda: DecoderConfig(tiny=TinyDecoderConfig(), trainable=True)
    )
    projector: ProjectorConfig = Field(default_factory=MLPConfig)


class SyntheticDigitsConfig(_Section):
    """The spoken-digits corpus made with espeak-ng, generated into the cache on first use."""

    num_utterances: Annotated[int, Field(ge=3)] = 2000
    """In all splits together (validation and test get 10 % each, at least one)."""
    seed: int = 0
    noise: Annotated[float, Field(ge=0.0)] = 0.0
    """Std of white noise added to each waveform (peak-normalised), 0 for none."""


class DataConfig(_Section):
    """Where utterances come from and which of them are used."""

    dataset: str | None = None
    """Hub dataset id or a local `save_to_disk` directory."""
    config_name: str | None = None
    synthetic: SyntheticDigitsConfig | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    audio_column: str = "audio"
    text_column: str = "text"
    sampling_rate: PositiveInt = 16000
    min_duration_s: Annotated[float, Field(ge=0.0)] = 0.0
    max_duration_s: PositiveFloat = 30.0
    max_train_samples: PositiveInt | None = None
    max_eval_samples: PositiveInt | None = 200

    @model_validator(mode="after")
    def _valid(self) -> DataConfig:
        _exactly_one(self, "dataset", "synthetic")
        if self.min_duration_s >= self.max_duration_s:
            raise ValueError(
                f"min_duration_s ({self.min_duration_s}) must be < "
                f"max_duration_s ({self.max_duration_s})"
            )
        return self


def _no_means_no(value: object) -> object:
    # YAML 1.1 reads a bare `no` as false: `precision: no` / `--set train.precision=no` mean "no".
    return "no" if value is False else value


Precision = Annotated[Literal["no", "bf16", "fp16"], BeforeValidator(_no_means_no)]


class TrainConfig(_Section):
    """Optimisation and evaluation. Field names are searched over by sweeps: keep them."""

    max_steps: PositiveInt = 1500
    lr: PositiveFloat = 1e-3
    """Peak learning rate of the projector (with a frozen decoder, of everything trained)."""
    decoder_lr: PositiveFloat | None = None
    """Peak learning rate of a trained decoder (`model.decoder.trainable`); null: `lr`. A decoder
    trained from scratch wants more than a projector on top of it."""
    batch_size: PositiveInt = 32
    grad_accum: PositiveInt = 1
    warmup_steps: Annotated[int, Field(ge=0)] = 100
    eval_every: PositiveInt = 250
    precision: Precision = "no"
    seed: int = 0
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    adam_betas: tuple[UnitInterval, UnitInterval] = (0.9, 0.999)
    """AdamW's (beta1, beta2); a beta2 of 0.95 adapts faster when training from scratch."""
    max_grad_norm: PositiveFloat | None = 1.0
    """Gradient clipping by global norm; null for none."""
    log_every: PositiveInt = 10
    eval_batch_size: PositiveInt = 64
    max_new_tokens: PositiveInt = 32
    """Greedy decoding budget at evaluation."""
    time_mask: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """SpecAugment-style augmentation of the cached encoder features in training: about this
    share of frames is zeroed, in spans of `time_mask_span` frames; 0 for none."""
    time_mask_span: PositiveInt = 5
    """Encoder frames per masked span (Whisper-style encoders: 20 ms each)."""
    cpu_threads: PositiveInt | None = None
    """Intra-op threads when training on the CPU (`torch.set_num_threads`, restored afterwards);
    null keeps torch's default (OMP_NUM_THREADS, else every core). Tiny models gain little from
    more threads, and on a busy machine spinning OpenMP threads can cut throughput tenfold."""

    @model_validator(mode="after")
    def _valid(self) -> TrainConfig:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be < max_steps ({self.max_steps})"
            )
        return self


class TrialConfig(_Section):
    """One trial: what `projsweep train` runs and what a sweep's `base` is."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=lambda: DataConfig(synthetic=SyntheticDigitsConfig()))
    train: TrainConfig = Field(default_factory=TrainConfig)


def cache_dir() -> Path:
    """Where corpora, tiny checkpoints and encoder features are cached (`PROJSWEEP_CACHE`)."""
    root = os.environ.get("PROJSWEEP_CACHE") or Path.home() / ".cache" / "projsweep"
    return Path(root).expanduser()


def load_trial_config(
    source: str | Path | Mapping[str, Any], overrides: Iterable[str] = ()
) -> TrialConfig:
    """A validated trial config from a YAML path or a mapping, with `--set` overrides applied.

    Raises `ConfigError` naming every bad field path.
    """
    if isinstance(source, Mapping):
        data, name = dict(source), None
    else:
        data, name = read_yaml_mapping(source), str(source)
    return validate_model(TrialConfig, apply_overrides(data, overrides), source=name)


def dump_trial_config(cfg: TrialConfig) -> str:
    """The resolved config as YAML that `load_trial_config` reads back to an equal config."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
