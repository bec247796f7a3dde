"""The one error class the recipes add: a recipe was given an argument it cannot use.

:class:`RecipeError` derives from :class:`oculi_dsl.OculiError`, so ``except OculiError`` still
catches everything; the CLI turns it into a one-line message. Messages show the bad value and
the valid options, like the rest of the library.
"""

from __future__ import annotations

from oculi_dsl.errors import OculiError


class RecipeError(OculiError):
    """A recipe argument is invalid (bad token, threshold, position, kind, pattern shape …)."""
