"""oculi-dsl: trace a transformer once, read and edit its internals, get labeled xarray results.

>>> import oculi_dsl as oculi
>>> model = oculi.testing.tiny_model("llama")
>>> with oculi.trace(model, "The capital of France is") as t:
...     _ = t.layers[:].resid_post.save("resid")
>>> t.result["resid"].dims
('layer', 'token', 'd_model')

Public API: :func:`trace`, :func:`load`, :func:`wrap`, :func:`to_netcdf`, :func:`open_dataset`,
the error classes, and the ``testing`` module (tiny random models).
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    CompileError,
    ExecutionError,
    ModelError,
    OculiError,
    RecordError,
    ResultError,
    SiteError,
    StorageError,
)
from .generate import Generate, generate
from .io import open_dataset, to_netcdf
from .models import ModelInfo, OculiModel, wrap
from .trace import Trace, trace

__all__ = [
    "CompileError",
    "ExecutionError",
    "Generate",
    "ModelError",
    "ModelInfo",
    "OculiError",
    "OculiModel",
    "RecordError",
    "ResultError",
    "SiteError",
    "StorageError",
    "Trace",
    "generate",
    "load",
    "open_dataset",
    "testing",
    "to_netcdf",
    "trace",
    "wrap",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `testing` and `load` pull in tokenizer training / model loading code: import on first use.
    if name == "testing":
        return importlib.import_module(".testing", __name__)
    if name == "load":
        return importlib.import_module(".models", __name__).load
    raise AttributeError(f"module 'oculi_dsl' has no attribute '{name}'")
