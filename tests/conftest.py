"""Shared fixtures: the corpus every end-to-end test trains on."""

from __future__ import annotations

import pathlib

import pytest

from bdh_fast.data import DEFAULT_CORPUS


@pytest.fixture(scope="session")
def corpus() -> pathlib.Path:
    """tiny Shakespeare as the package ships it: the same bytes as ../shared/data's copy."""
    return DEFAULT_CORPUS
