"""The error hierarchy: one base class, one subclass per stage of the pipeline.

Every error raised by oculi-dsl derives from :class:`OculiError`, so callers can catch
everything the library raises with one ``except``. The subclass tells which stage refused:
recording a proxy, naming a site, compiling the plan, running the forward pass, labelling
results, storing them, or loading a model. Messages show the bad value, list the valid
options and suggest a fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class OculiError(Exception):
    """Base class of every error raised by oculi-dsl."""


class RecordError(OculiError):
    """A proxy was used in a way that cannot be recorded (control flow, use after the trace)."""


class SiteError(OculiError):
    """A site, component, layer or module name does not exist on this model."""


class CompileError(OculiError):
    """The recorded graph cannot run: shapes, dtypes, ordering or indices are wrong."""


class ExecutionError(OculiError):
    """The forward pass failed while the intervention graph was running."""


class ResultError(OculiError):
    """Saved values could not be labelled into an ``xarray.Dataset``."""


class StorageError(OculiError):
    """A result file could not be written or read."""


class ModelError(OculiError):
    """A model could not be loaded, wrapped or recognised."""


def did_you_mean(bad: str, valid: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest valid name, or ``""`` when none is close."""
    close = difflib.get_close_matches(bad, list(valid), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""
