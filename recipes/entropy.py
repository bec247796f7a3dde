"""Attention entropy: how spread out each head's attention is, per query position.

A head that puts all its weight on one key has entropy 0; one that spreads its weight evenly
over n keys has entropy ln n. Dividing by ln n (n = keys the query may see) puts every position
on the same 0..1 scale, so early positions (few keys) and late ones (many keys) compare.

Implements SPEC.md § Attention, "Entropy": ``H(t) = −Σ_{j≤t} A[t,j] ln A[t,j]`` in nats with
``0·ln 0 = 0``, the normalized form ``H / ln(n_valid(t))``, padding masked, options to drop the
first k query positions and the first key column (BOS / attention sink), and the head summary
= nan-mean over query positions → (layer, head).

>>> import oculi_dsl as oculi
>>> from oculi_dsl.recipes import attention_entropy
>>> ds = attention_entropy(oculi.testing.tiny_model("llama"), "The cat sat on the mat")
>>> ds["head_entropy"].dims
('layer', 'head')
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

import oculi_dsl as oculi

from ._common import (
    as_lengths,
    as_pattern,
    check_model,
    encode,
    is_single,
    provenance,
    select_layers,
    validity,
)
from ._errors import RecipeError

__all__ = ["attention_entropy", "pattern_entropy", "sliding_windows"]

DEFINITION = "SPEC.md § Attention: Entropy (nats, normalized by ln n_valid, head nan-mean)"


def _first_valid(valid: np.ndarray) -> np.ndarray:
    """Index of the first real position along the last axis (left padding before it)."""
    return np.argmax(valid, axis=-1)


def pattern_entropy(pattern: Any, *, mask: Any = None, skip_queries: int = 0,
                    drop_first_key: bool = False, window: Any = None) -> xr.Dataset:
    """Entropy of an attention pattern you already have (SPEC § Attention, Entropy).

    ``pattern`` is a tensor, array or ``DataArray`` ending in (query, key) (see
    :func:`~oculi_dsl.recipes._common.as_pattern` for unlabeled layouts). ``mask`` marks real
    tokens (``(token,)`` or ``(prompt, token)``, 1 = real, 0 = padding); without it every
    position is real. Keys after the query (j > t) never count.

    ``skip_queries=k`` drops the first k real query positions (NaN in the output).
    ``drop_first_key=True`` removes each prompt's first real key (BOS / sink) and renormalizes
    the remaining weights of the row to sum to 1 before taking the entropy, so the value
    describes how the head spreads the weight it does not park on the sink (NaN when nothing
    is left). ``entropy_norm`` is NaN where fewer than 2 keys are visible (ln 1 = 0).

    Returns ``entropy`` and ``entropy_norm`` with the pattern's dims minus ``key``,
    ``head_entropy`` and ``head_entropy_norm`` nan-averaged over ``query`` (and ``prompt``),
    and ``n_valid`` (number of keys each query could see).

    >>> import torch
    >>> rows = torch.tensor([[1, 0, 0], [.5, .5, 0], [1 / 3, 1 / 3, 1 / 3]])
    >>> [round(float(h), 4) for h in pattern_entropy(rows)["entropy"]]
    [0.0, 0.6931, 1.0986]
    """
    if not isinstance(skip_queries, int) or isinstance(skip_queries, bool) or skip_queries < 0:
        raise RecipeError(f"skip_queries must be an int >= 0, got {skip_queries!r}.")
    pat = as_pattern(pattern)
    n = pat.sizes["query"]
    keep = as_lengths(mask, pat)
    if keep is None:
        keep = xr.DataArray(np.ones(n, dtype=bool), dims=("key",))
    first = _first_valid(keep.values)  # (prompt?) index of each prompt's first real token
    positions = np.arange(n)
    # rank of each position among the real ones: 0 for the first real token
    rank = xr.DataArray(np.cumsum(keep.values, axis=-1) - 1, dims=keep.dims)
    key_ok = keep & (xr.DataArray(positions, dims="key")
                     <= xr.DataArray(positions, dims="query"))
    limit = _window_limit(window, pat)
    if limit is not None:
        key_ok = key_ok & ((xr.DataArray(positions, dims="query")
                            - xr.DataArray(positions, dims="key")) < limit)
    if drop_first_key:
        first_key = xr.DataArray(first, dims=keep.dims[:-1]) if keep.ndim > 1 else int(first)
        key_ok = key_ok & (xr.DataArray(positions, dims="key") != first_key)
    query_ok = keep.rename({"key": "query"}) & (rank.rename({"key": "query"}) >= skip_queries)
    weights = pat.where(key_ok, 0.0)
    if drop_first_key:
        total = weights.sum("key")
        weights = weights / total.where(total > 0)
    logs = np.log(weights.where(weights > 0, 1.0))  # 0·ln 0 = 0
    entropy = -(weights * logs).sum("key", skipna=False) + 0.0  # + 0.0: no "-0.0"
    n_valid = key_ok.sum("key")
    entropy = entropy.where(query_ok)
    norm = (entropy / np.log(n_valid.where(n_valid > 1))).where(query_ok)
    reduce = [d for d in ("query", "prompt") if d in entropy.dims]
    ds = xr.Dataset({
        "entropy": entropy,
        "entropy_norm": norm,
        "n_valid": n_valid.where(query_ok, 0).astype(np.int64).transpose(
            *[d for d in entropy.dims if d in n_valid.dims or d in query_ok.dims]),
        "head_entropy": entropy.mean(reduce, skipna=True),
        "head_entropy_norm": norm.mean(reduce, skipna=True),
    })
    ds["entropy"].attrs["units"] = "nats"
    ds["head_entropy"].attrs["units"] = "nats"
    ds.attrs.update(provenance(None, "entropy.pattern_entropy", DEFINITION,
                               skip_queries=skip_queries, drop_first_key=drop_first_key))
    return ds


def _window_limit(window: Any, pat: xr.DataArray) -> Any:
    """Sliding-window size as a scalar or a ``layer`` DataArray (a huge number = no window)."""
    if window is None:
        return None
    if isinstance(window, (int, np.integer)) and not isinstance(window, bool):
        if window < 1:
            raise RecipeError(f"window must be >= 1 or None, got {window!r}.")
        return int(window)
    sizes = [np.iinfo(np.int64).max if w is None else int(w) for w in window]
    if "layer" not in pat.dims or len(sizes) != pat.sizes["layer"]:
        raise RecipeError(f"window has {len(sizes)} entries, but the pattern has "
                          f"{pat.sizes.get('layer', 0)} layers (dims {pat.dims}); give one window "
                          "(int or None) per layer, a single int, or None.")
    return xr.DataArray(np.asarray(sizes, dtype=np.int64), dims=("layer",))


def sliding_windows(model: Any, layers: list[int]) -> list[int | None]:
    """Each layer's sliding-window size from the config (None = full attention).

    Uses ``layer_types`` ("sliding_attention") when the config has it (Gemma 3, recent Llama
    family configs), else ``sliding_window`` for every layer unless ``use_sliding_window`` is
    False (Mistral / Qwen2 style).
    """
    config = model.hf.config
    config = getattr(config, "text_config", None) or config
    size = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not size:
        return [None] * len(layers)
    if types is not None:
        return [int(size) if types[i] == "sliding_attention" else None for i in layers]
    if getattr(config, "use_sliding_window", True) is False:
        return [None] * len(layers)
    return [int(size)] * len(layers)


def attention_entropy(model: Any, prompt: Any, *, layers: Any = None, skip_queries: int = 0,
                      drop_first_key: bool = False) -> xr.Dataset:
    """Attention entropy of every head on ``prompt``, from ONE traced forward pass.

    Implements SPEC.md § Attention, "Entropy" (see :func:`pattern_entropy` for the options).
    ``prompt`` is a string, a list of strings (left-padded, adds a ``prompt`` dim; padding is
    masked) or token ids. ``layers`` restricts the layers traced (int, slice, list; default
    all). Sliding-window layers (Gemma 3) count only the keys inside their window in
    ``n_valid``. Returns ``entropy`` / ``entropy_norm`` (layer, [prompt,] head, query), the head
    summaries ``head_entropy`` / ``head_entropy_norm`` (layer, head) and ``n_valid``.

    >>> import oculi_dsl as oculi
    >>> model = oculi.testing.tiny_model("gpt2")
    >>> ds = attention_entropy(model, "Once upon a time", skip_queries=1)
    >>> float(ds["entropy_norm"].max()) <= 1.0
    True
    """
    model = check_model(model)
    chosen = select_layers(model, layers)
    ids = encode(model, prompt)
    single = is_single(prompt)
    with oculi.trace(model, prompt) as t:
        t.layers[chosen].attn.pattern.save("pattern")
    run = t.result
    pat = run["pattern"]
    valid = validity(ids)
    mask = valid[0] if single else valid
    ds = pattern_entropy(pat, mask=mask, skip_queries=skip_queries, drop_first_key=drop_first_key,
                         window=sliding_windows(model, chosen))
    ds = ds.assign_coords(layer=("layer", chosen))
    if "query_str" in run.coords:
        ds = ds.assign_coords(query_str=run.coords["query_str"])
    if "prompt_text" in run.coords:
        ds = ds.assign_coords(prompt_text=run.coords["prompt_text"])
    ds.attrs = provenance(model, "entropy.attention_entropy", DEFINITION, prompts=run.attrs["prompts"],
                          skip_queries=skip_queries, drop_first_key=drop_first_key)
    return ds
