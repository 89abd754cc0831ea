"""WER/CER after the Whisper English normaliser."""

from __future__ import annotations

import math

from trainer.evaluation import error_rates, text_normalizer


def test_normaliser_joins_spoken_digits() -> None:
    norm = text_normalizer()
    assert norm("Three oh five.") == "305"
    assert norm("oh oh seven") == norm("zero zero seven") == "007"


def test_error_rates_score_utterances_after_normalising() -> None:
    norm = text_normalizer()
    perfect = error_rates(["one two", "three oh"], ["One two.", "three zero"], norm)
    assert perfect == {"eval/wer": 0.0, "eval/cer": 0.0}
    # One digit wrong makes the joined number wrong: WER counts it as one word.
    rates = error_rates(["one two three", "four five"], ["one two four", ""], norm)
    assert rates["eval/wer"] == 1.0 and 0 < rates["eval/cer"] < 1
    rates = error_rates(["one two three", "four five"], ["one two three", "four six"], norm)
    assert rates["eval/wer"] == 0.5 and math.isclose(rates["eval/cer"], 1 / 5)


def test_empty_references_are_dropped() -> None:
    norm = text_normalizer()
    assert error_rates(["", "one"], ["x", "one"], norm) == {"eval/wer": 0.0, "eval/cer": 0.0}
    assert all(math.isnan(v) for v in error_rates([""], ["x"], norm).values())
