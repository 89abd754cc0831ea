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

import csv
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import jiwer
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
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


def utterance_wer(reference: str, hypothesis: str, normalize: Callable[[str], str]) -> float:
    """One utterance's WER after normalising (NaN when the normalised reference is empty)."""
    ref = normalize(reference)
    return float(jiwer.wer(ref, normalize(hypothesis))) if ref.strip() else math.nan


@dataclass
class EvalResult:
    """An evaluation: the contract metrics and one (reference, hypothesis, WER) row per utterance,
    in eval-set order."""

    metrics: dict[str, float]
    transcripts: list[tuple[str, str, float]] = field(default_factory=list)

    def transcripts_tsv(self) -> str:
        """`reference`, `hypothesis`, `wer` as tab-separated text with a header (csv quoting)."""
        out = io.StringIO()
        writer = csv.writer(out, delimiter="\t", lineterminator="\n")
        writer.writerow(["reference", "hypothesis", "wer"])
        writer.writerows((r, h, f"{w:.4f}") for r, h, w in self.transcripts)
        return out.getvalue()


def evaluate(
    model: SpeechLM,
    loader: DataLoader,
    accelerator: Accelerator,
    *,
    references: list[str],
    decode: Callable[[list[int]], str],
    max_new_tokens: int,
) -> EvalResult:
    """Eval loss, WER and CER over `loader`, this process's share of the eval set, and the
    transcripts of the whole eval set (on every process).

    `model` is the unwrapped `SpeechLM`; `references[i]` is the text of eval item `i`. Each process
    scores its own batches; the per-utterance results are gathered once at the end as Python
    objects, so processes may hold different numbers of batches of different sizes.
    """
    model.eval()
    rows: list[tuple[int, float, int, str]] = []  # (eval index, loss sum, label tokens, hypothesis)
    with torch.no_grad(), accelerator.autocast():
        for batch in loader:
            batch = batch.to(accelerator.device)
            out = model(batch)
            generated = model.generate(batch, max_new_tokens).tolist()  # B, N
            hyps = [decode(strip_generated(row, model.layout)) for row in generated]
            rows += zip(
                batch.index.tolist(),
                out.sample_loss_sum.tolist(),
                out.sample_tokens.tolist(),
                hyps,
                strict=True,
            )
    model.train()
    rows = sorted(gather_object(rows))  # every process's rows, on every process
    loss = sum(r[1] for r in rows) / max(sum(r[2] for r in rows), 1)
    normalize = text_normalizer()
    refs, hyps = [references[r[0]] for r in rows], [r[3] for r in rows]
    rates = error_rates(refs, hyps, normalize)
    transcripts = [(r, h, utterance_wer(r, h, normalize)) for r, h in zip(refs, hyps, strict=True)]
    return EvalResult({"eval/loss": loss, **rates}, transcripts)
