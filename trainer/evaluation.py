"""Evaluation: eval loss, greedy decoding, WER and CER after the Whisper English normaliser.

Normaliser: `transformers`' `EnglishTextNormalizer` wants Whisper's British→American spelling map
(`english.json`, shipped with OpenAI's package and with Whisper tokenizers on the hub, not with
transformers). Offline it is built with an empty map, which only skips spelling standardisation.
If the class cannot be imported, `BasicTextNormalizer` (lowercase, strip punctuation) is used.

Note that the English normaliser turns spelled-out numbers into digits and joins consecutive ones:
"three oh five" → "305". On a digit-string corpus every utterance becomes one word, so WER is the
utterance error rate and CER is close to a per-digit error rate.
"""

from __future__ import annotations

from collections.abc import Callable

import jiwer
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from trainer.asr import SpeechLM, strip_generated


def text_normalizer() -> Callable[[str], str]:
    """Whisper's English normaliser (empty spelling map), else the basic one."""
    try:
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer
    except ImportError:  # pragma: no cover - depends on the transformers release
        from transformers.models.whisper.english_normalizer import BasicTextNormalizer

        return BasicTextNormalizer()
    return EnglishTextNormalizer({})


def error_rates(
    references: list[str], hypotheses: list[str], normalize: Callable[[str], str]
) -> dict[str, float]:
    """Corpus WER and CER after normalising both sides; pairs with an empty reference are dropped
    (jiwer cannot score them and they carry no words)."""
    pairs = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses, strict=True)]
    pairs = [(r, h) for r, h in pairs if r.strip()]
    if not pairs:
        return {"eval/wer": float("nan"), "eval/cer": float("nan")}
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    return {"eval/wer": float(jiwer.wer(refs, hyps)), "eval/cer": float(jiwer.cer(refs, hyps))}


def evaluate(
    model: SpeechLM,
    loader: DataLoader,
    accelerator: Accelerator,
    *,
    references: list[str],
    decode: Callable[[list[int]], str],
    max_new_tokens: int,
) -> dict[str, float]:
    """Eval loss, WER and CER over `loader` (sharded across processes; results gathered).

    `model` is the unwrapped `SpeechLM`; `references[i]` is the text of eval item `i`.
    """
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    tokens = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    hypotheses: dict[int, str] = {}
    with torch.no_grad(), accelerator.autocast():
        for batch in loader:
            batch = batch.to(accelerator.device)  # no-op when the prepared loader moved it
            out = model(batch)
            generated = model.generate(batch, max_new_tokens)  # B, N
            per_sample = accelerator.gather_for_metrics(
                (out.sample_loss_sum, out.sample_tokens, generated, batch.index)
            )
            sample_loss, sample_tokens, gen_all, index_all = per_sample
            loss_sum += sample_loss.double().sum()
            tokens += sample_tokens.double().sum()
            for i, row in zip(index_all.tolist(), gen_all.tolist(), strict=True):
                hypotheses[i] = decode(strip_generated(row, model.layout))
    model.train()
    order = sorted(hypotheses)
    rates = error_rates(
        [references[i] for i in order], [hypotheses[i] for i in order], text_normalizer()
    )
    return {"eval/loss": float(loss_sum / tokens.clamp(min=1)), **rates}
