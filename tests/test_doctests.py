"""Every docstring example in the package and its recipes runs and prints what it claims."""

from __future__ import annotations

import doctest
import importlib

import pytest

# Modules whose docstrings carry examples; each must have at least one.
MODULES = (
    "oculi_dsl", "oculi_dsl.trace", "oculi_dsl.past", "oculi_dsl.generate", "oculi_dsl.models", "oculi_dsl.sites",
    "oculi_dsl.io", "oculi_dsl.testing", "oculi_dsl._cli_patching", "oculi_dsl.recipes",
    "oculi_dsl.recipes.logit_lens", "oculi_dsl.recipes.patching", "oculi_dsl.recipes.causal_trace",
    "oculi_dsl.recipes.entropy", "oculi_dsl.recipes.head_scores", "oculi_dsl.recipes.heads",
    "oculi_dsl.recipes.attribution", "oculi_dsl.recipes.composition",
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
