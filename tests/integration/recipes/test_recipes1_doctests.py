"""The examples in the docstrings of the Recipes I modules run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ("recipes.logit_lens", "recipes.patching", "recipes.causal_trace", "_cli_patching")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(f"oculi_dsl.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
