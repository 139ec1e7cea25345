"""Shared fixtures: the corpus every end-to-end test trains on."""

from __future__ import annotations

import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> pathlib.Path:
    if SHARED_CORPUS.is_file():
        return SHARED_CORPUS
    path = tmp_path_factory.mktemp("data") / "corpus.txt"  # generated text, no download
    words = ["to", "be", "or", "not", "the", "king", "shall", "love", "thee", "and", "my", "lord"]
    g = torch.Generator().manual_seed(0)
    picks = torch.randint(len(words), (60_000,), generator=g).tolist()
    path.write_text(" ".join(words[i] for i in picks))
    return path
