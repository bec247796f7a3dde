"""Shared fixtures: the real default model (loaded once per session) and tiny random models."""

from __future__ import annotations

import pytest

import oculi_dsl
from oculi_dsl.models import OculiModel


@pytest.fixture(scope="session")
def default_model() -> OculiModel:
    """SmolLM2-135M-Instruct via ``oculi.load()``: fetched and cached on first use, ~1 s after."""
    return oculi_dsl.load()


@pytest.fixture(params=("llama", "gemma3", "gpt2"))
def tiny(request: pytest.FixtureRequest) -> OculiModel:
    """A tiny random-weight model of each supported family (no download)."""
    from oculi_dsl.testing import tiny_model

    return tiny_model(request.param)
