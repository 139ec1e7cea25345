"""Generation quality figures (bdh_fast/telemetry/quality.py) on texts whose answer is known."""

from __future__ import annotations

import pytest

from bdh_fast.data import DEFAULT_CORPUS
from bdh_fast.telemetry import quality


def test_words_are_lowercased_letter_runs():
    assert quality.words(b"The king's man, THE KING! 42x") == [b"the", b"king's", b"man", b"the", b"king", b"x"]


def test_repetition_and_distinct():
    loop = quality.words(b"the king the king the king the king")
    fresh = quality.words(b"now is the winter of our discontent made glorious summer")
    assert quality.repetition(loop, 2) == pytest.approx(1 - 2 / 7)  # bigrams: (the king), (king the)
    assert quality.repetition(fresh, 2) == 0.0 and quality.repetition(fresh, 4) == 0.0
    assert quality.repetition([b"one"], 2) == 0.0  # no bigram at all
    assert quality.distinct([loop, loop]) == pytest.approx(2 / 14)
    assert quality.distinct([fresh]) == 1.0


def test_gzip_ratio_separates_loops_from_prose():
    prose = DEFAULT_CORPUS.read_bytes()[:400]
    assert quality.gzip_ratio(b"ab" * 200) < 0.1 < quality.gzip_ratio(prose) < 1.0
    assert quality.gzip_ratio(b"") == 0.0


def test_invalid_utf8_counts_the_bytes_that_do_not_decode():
    assert quality.invalid_utf8("café".encode()) == 0.0
    assert quality.invalid_utf8(b"ab\xff\xfe") == 0.5
    assert quality.invalid_utf8(b"\xc3") == 1.0  # a truncated sequence


def test_valid_word_rate_against_the_training_vocabulary():
    vocab = quality.vocabulary(DEFAULT_CORPUS.read_bytes())
    assert quality.valid_word_rate(quality.words(b"To be, or not to be"), vocab) == 1.0
    assert quality.valid_word_rate(quality.words(b"To qzxv, or bnrk"), vocab) == 0.5
    assert quality.valid_word_rate([], vocab) is None
    figures = quality.sample_quality(b"First Citizen: speak, speak.", vocab)
    assert figures["valid_word_rate"] == 1.0 and set(figures) == {
        "rep_2", "rep_4", "gzip_ratio", "invalid_utf8", "valid_word_rate"}
