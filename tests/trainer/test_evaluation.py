"""WER/CER after the Whisper English normaliser."""

from __future__ import annotations

import csv
import io
import math

from trainer.evaluation import EvalResult, error_rates, text_normalizer, utterance_wer


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


def test_transcripts_table_keeps_tabs_and_quotes_readable() -> None:
    result = EvalResult({}, [('say "one"\ttwo', "one", 0.5), ("three", "", 1.0)])
    rows = list(csv.DictReader(io.StringIO(result.transcripts_tsv()), delimiter="\t"))
    assert rows == [
        {"reference": 'say "one"\ttwo', "hypothesis": "one", "wer": "0.5000"},
        {"reference": "three", "hypothesis": "", "wer": "1.0000"},
    ]


def test_utterance_wer_is_scored_after_normalising() -> None:
    norm = text_normalizer()
    assert utterance_wer("The cat.", "the cat", norm) == 0.0
    assert utterance_wer("the cat", "the dog", norm) == 0.5
    assert utterance_wer("three oh five", "three oh six", norm) == 1.0  # "305" vs "306"
    assert math.isnan(utterance_wer("", "x", norm))
