"""Trial-loop throughput with the encoder-feature cache against running the encoder every step.

    python bench/trainer.py [CONFIG.yaml] [--steps N] [--rounds R] [--set key=value]…
                            [--threads T] [--clock wall|cpu]

Both paths train the same model (projector + decoder, AdamW, clipping) on batches of the config's
`train.batch_size`, grouped by length as in `train_trial`; the second one first turns each batch's
waveforms into log-mel and runs the frozen encoder, as a trainer without the cache would. They
alternate in R rounds of N steps each, so a busy machine slows both alike, and the script prints
steps/s and audio-seconds/s of each and their ratios. The config defaults to the offline preset.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path and its name shadows the `trainer`
# package: look the package up from the repository root instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
from transformers import PreTrainedTokenizerBase  # noqa: E402

from trainer.asr import AsrCollator, SpeechLM  # noqa: E402
from trainer.config import TrialConfig, load_trial_config  # noqa: E402
from trainer.data import load_utterances  # noqa: E402
from trainer.encoder import build_encoder, encode_batch, max_audio_seconds  # noqa: E402
from trainer.features import FeatureSet, load_features  # noqa: E402
from trainer.loop import LengthGroupedBatches, build_model  # noqa: E402

PRESET = _HERE.parent / "sweeps" / "trials" / "tiny-digits.yaml"


def make_step(
    model: SpeechLM, tokenizer: PreTrainedTokenizerBase, cfg: TrialConfig
) -> Callable[[list[dict[str, Any]]], None]:
    """One optimizer step on a list of items, as the trial loop takes it (single process)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    collate = AsrCollator(tokenizer, model.layout, model.projector.output_length)
    max_norm = cfg.train.max_grad_norm or float("inf")

    def step(items: list[dict[str, Any]]) -> None:
        out = model(collate(items))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def cached_batches(train: FeatureSet, cfg: TrialConfig) -> Iterator[list[dict[str, Any]]]:
    """Batches read from the feature cache (memory-mapped), as `train_trial` reads them."""
    for batch in LengthGroupedBatches(train.lengths, cfg.train.batch_size, seed=cfg.train.seed):
        yield [train[i] for i in batch]


def encoder_batches(cfg: TrialConfig, limit: int) -> Iterator[list[dict[str, Any]]]:
    """Batches whose features come from log-mel + the frozen encoder, computed on the spot."""
    encoder, extractor = build_encoder(cfg.model.encoder)
    encoder.eval()
    sr = cfg.data.sampling_rate
    utterances, _ = load_utterances(
        cfg.data,
        cfg.data.train_split,
        max_seconds=max_audio_seconds(encoder, extractor),
        limit=limit,
    )
    lengths = [u.waveform.size for u in utterances]
    for batch in LengthGroupedBatches(lengths, cfg.train.batch_size, seed=cfg.train.seed):
        clips = [utterances[i] for i in batch]
        feats, valid = encode_batch(encoder, extractor, [u.waveform for u in clips], sr)  # B, T, C
        yield [
            {
                "features": feats[j, : valid[j]].half(),
                "text": u.text,
                "audio_seconds": u.waveform.size / sr,
            }
            for j, u in enumerate(clips)
        ]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(
    step: Callable, batches: Iterator[list[dict[str, Any]]], n: int, clock: str = "wall"
) -> tuple[float, float]:
    """Seconds for n steps (data included) and the audio seconds they covered."""
    now = CLOCKS[clock]
    audio, start = 0.0, now()
    for _ in range(n):
        items = next(batches)
        audio += sum(it["audio_seconds"] for it in items)
        step(items)
    return now() - start, audio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", nargs="?", default=str(PRESET))
    parser.add_argument("--steps", type=int, default=20, help="steps per path per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (steadier on a shared machine)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_trial_config(args.config, args.overrides)
    torch.manual_seed(cfg.train.seed)

    splits = load_features(cfg)
    cached = cached_batches(splits.train, cfg)
    model, tokenizer = build_model(cfg, splits.train, splits.encoder_dim, "no")
    step = make_step(model, tokenizer, cfg)
    live = encoder_batches(cfg, limit=len(splits.train))
    for batches in (cached, live):  # warm-up: allocator, first-call overheads
        timed(step, batches, 3)

    totals = {"cache": [0.0, 0.0], "encoder": [0.0, 0.0]}
    for r in range(args.rounds):
        for name, batches in (("cache", cached), ("encoder", live)):
            seconds, audio = timed(step, batches, args.steps, args.clock)
            totals[name][0] += seconds
            totals[name][1] += audio
            print(f"round {r + 1}: {name:>7}  {args.steps / seconds:6.2f} steps/s", flush=True)
    n = args.steps * args.rounds
    rates = {k: (n / s, a / s) for k, (s, a) in totals.items()}
    threads = torch.get_num_threads()
    print(
        f"\nbatch {cfg.train.batch_size}, {n} steps per path, torch threads {threads}, "
        f"{args.clock} clock"
    )
    for name, (sps, aps) in rates.items():
        print(f"  {name:>12}: {sps:7.2f} steps/s  {aps:8.1f} audio-s/s")
    steps_ratio = rates["cache"][0] / rates["encoder"][0]
    audio_ratio = rates["cache"][1] / rates["encoder"][1]
    print(f"  cache / encoder: {steps_ratio:.2f}x steps/s, {audio_ratio:.2f}x audio-s/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
