"""A learnable in-memory stand-in for the encoder-feature cache, for trainer tests.

Each utterance is 2–4 digit words; each word becomes `FRAMES_PER_WORD` frames of that word's fixed
random prototype plus a little noise, so a stride-4 projector sees one clean frame group per word
and a tiny decoder learns the mapping in a few dozen steps. Items and `.lengths` look like
`trainer.features.FeatureSet`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from trainer.config import TrialConfig

WORDS = ("zero", "oh", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ENCODER_DIM = 16
FRAMES_PER_WORD = 8


class ToyFeatureSet(Dataset):
    def __init__(self, n: int, seed: int, *, nan: bool = False) -> None:
        g = torch.Generator().manual_seed(1234)
        prototypes = torch.randn(len(WORDS), ENCODER_DIM, generator=g) * 2  # words, C
        g.manual_seed(seed)
        self.items: list[dict[str, Any]] = []
        for _ in range(n):
            k = int(torch.randint(2, 5, (), generator=g))
            ids = torch.randint(0, len(WORDS), (k,), generator=g)
            frames = prototypes[ids].repeat_interleave(FRAMES_PER_WORD, 0)  # k*F, C
            frames = frames + 0.1 * torch.randn(frames.shape, generator=g)
            if nan:
                frames[0] = float("nan")
            self.items.append(
                {
                    "features": frames.half(),
                    "text": " ".join(WORDS[i] for i in ids.tolist()),
                    "audio_seconds": frames.shape[0] * 0.02,
                }
            )
        self.lengths = [it["features"].shape[0] for it in self.items]
        self.texts = [it["text"] for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


@dataclass
class ToySplits:
    train: ToyFeatureSet
    eval: ToyFeatureSet
    encoder_dim: int = ENCODER_DIM
    skipped: dict[str, int] = field(default_factory=dict)


def toy_splits(n_train: int = 256, n_eval: int = 32, *, nan: bool = False) -> ToySplits:
    return ToySplits(ToyFeatureSet(n_train, seed=1, nan=nan), ToyFeatureSet(n_eval, seed=2))


def toy_config(**train: Any) -> TrialConfig:
    """A tiny trial (seconds on a CPU) whose `train` section `train` overrides."""
    section = {
        "max_steps": 30,
        "lr": 1e-2,
        "batch_size": 16,
        "warmup_steps": 3,
        "eval_every": 15,
        "log_every": 5,
        "eval_batch_size": 16,
        "max_new_tokens": 6,
    }
    return TrialConfig.model_validate(
        {
            "model": {
                "decoder": {
                    "tiny": {
                        "hidden_size": 32,
                        "num_layers": 2,
                        "num_heads": 2,
                        "intermediate_size": 64,
                    },
                    "trainable": True,
                    "prompt": "digits: <audio> text:",
                },
                "projector": {"type": "mlp", "stride": 4},
            },
            "train": section | train,
        }
    )
