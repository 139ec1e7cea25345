"""Generation quality of a sample, from its bytes alone (host-side, pure Python, microseconds).

    rep_n            1 - unique / total word n-grams of one sample (0: no n-gram repeats; near 1: a loop)
    distinct_2       unique / total word bigrams over all the samples of one step (diversity across them)
    gzip_ratio       deflate-compressed size / size (low: repetitive; natural English is ~0.4-0.6 at length)
    valid_word_rate  share of the sample's words found in the training split's vocabulary
    invalid_utf8     share of the sample's bytes that are not part of valid UTF-8

Words are runs of ASCII letters (and inner apostrophes), lower-cased: the unit a reader judges
degeneration and spelling by; a byte-level model's n-grams of bytes repeat by nature.
"""

from __future__ import annotations

import re
import zlib
from typing import Iterable, Sequence

WORD = re.compile(rb"[A-Za-z]+(?:'[A-Za-z]+)*")


def words(data: bytes) -> list[bytes]:
    return [w.lower() for w in WORD.findall(data)]


def vocabulary(corpus: bytes) -> frozenset[bytes]:
    """The words of a training text, as `words` splits them."""
    return frozenset(words(corpus))


def _ngrams(tokens: Sequence[bytes], n: int) -> list[tuple[bytes, ...]]:
    return list(zip(*(tokens[i:] for i in range(n))))


def repetition(tokens: Sequence[bytes], n: int) -> float:
    """1 - unique / total n-grams; 0.0 when there is no n-gram at all."""
    grams = _ngrams(tokens, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct(samples: Iterable[Sequence[bytes]], n: int = 2) -> float:
    """unique / total n-grams pooled over several samples' words; 0.0 when there is none."""
    grams = [g for tokens in samples for g in _ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def gzip_ratio(data: bytes) -> float:
    """Deflate-compressed size over raw size (no gzip header, which would dominate short samples)."""
    if not data:
        return 0.0
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return len(compressor.compress(data) + compressor.flush()) / len(data)


def invalid_utf8(data: bytes) -> float:
    """Share of bytes that do not decode as UTF-8 (each such byte becomes one lone surrogate)."""
    if not data:
        return 0.0
    text = data.decode("utf-8", errors="surrogateescape")
    return sum(0xDC80 <= ord(c) <= 0xDCFF for c in text) / len(data)


def valid_word_rate(tokens: Sequence[bytes], vocab: frozenset[bytes]) -> float | None:
    """Share of the words found in `vocab`; None for a sample without a word."""
    return sum(w in vocab for w in tokens) / len(tokens) if tokens else None


def sample_quality(sample: bytes, vocab: frozenset[bytes] | None = None) -> dict[str, float]:
    """The per-sample figures, by their metric names without the `samples/` prefix."""
    tokens = words(sample)
    out = {"rep_2": repetition(tokens, 2), "rep_4": repetition(tokens, 4), "gzip_ratio": gzip_ratio(sample),
           "invalid_utf8": invalid_utf8(sample)}
    rate = valid_word_rate(tokens, vocab) if vocab is not None else None
    if rate is not None:
        out["valid_word_rate"] = rate
    return out
