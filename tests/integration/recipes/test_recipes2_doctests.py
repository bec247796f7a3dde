"""The examples in the docstrings of the Recipes II modules run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ("entropy", "head_scores", "heads", "attribution", "composition")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(f"oculi_dsl.recipes.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
