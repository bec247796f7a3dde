"""Helpers shared by the recipes: provenance attrs, tokens, prompt masks, pattern inputs.

Everything here uses only the public DSL (``oculi.trace``, ``model.info``, ``model.tokenizer``,
``model.family``). The recipes that score attention patterns accept either a model (and run
one trace) or a pattern the caller already has; :func:`as_pattern` turns a tensor, an array or
a ``DataArray`` into a ``DataArray`` with the DSL's dim names so both paths share one formula.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

import oculi_dsl as oculi

from ._errors import RecipeError

# Leading dims given to an unlabeled pattern tensor, by rank (the DSL's own layout).
_PATTERN_DIMS: dict[int, tuple[str, ...]] = {
    2: ("query", "key"),
    3: ("head", "query", "key"),
    4: ("layer", "head", "query", "key"),
    5: ("layer", "prompt", "head", "query", "key"),
}


def provenance(model: Any | None, recipe: str, definition: str, **params: Any) -> dict[str, Any]:
    """Attrs every recipe result carries: which recipe, which SPEC definition, model, params."""
    attrs: dict[str, Any] = {
        "recipe": f"oculi_dsl.recipes.{recipe}",
        "definition": definition,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if model is not None:
        info = model.info
        attrs.update(model_id=info.model_id, family=info.family,
                     architecture=info.architecture, dtype=str(info.dtype).removeprefix("torch."))
    for key, value in params.items():
        attrs[key] = value if value is not None else "none"
    return attrs


def as_pattern(pattern: Any) -> xr.DataArray:
    """An attention pattern as a float64 ``DataArray`` whose last two dims are (query, key).

    A ``DataArray`` keeps its dims (it must have ``query`` and ``key``); a tensor or array is
    labeled by rank: (query, key), (head, query, key), (layer, head, query, key) or
    (layer, prompt, head, query, key), the layout ``t.layers[:].attn.pattern`` saves.
    """
    if isinstance(pattern, xr.DataArray):
        missing = {"query", "key"} - set(pattern.dims)
        if missing:
            raise RecipeError(f"The pattern DataArray has dims {pattern.dims}, missing "
                              f"{sorted(missing)}; a pattern needs 'query' and 'key' dims.")
        other = [d for d in pattern.dims if d not in ("query", "key")]
        return pattern.transpose(*other, "query", "key").astype(np.float64)
    if isinstance(pattern, torch.Tensor):
        pattern = pattern.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(pattern, dtype=np.float64)
    dims = _PATTERN_DIMS.get(array.ndim)
    if dims is None or array.shape[-1] != array.shape[-2]:
        raise RecipeError(
            f"A pattern tensor must have 2 to 5 dims ending in (query, key) with query == key, "
            f"got shape {tuple(array.shape)}. Valid layouts: "
            + "; ".join(str(d) for d in _PATTERN_DIMS.values())
            + ". Pass a DataArray to label other layouts.")
    return xr.DataArray(array, dims=dims)


def as_lengths(valid: Any, pattern: xr.DataArray) -> xr.DataArray | None:
    """Turn a (prompt?, token) 0/1 validity mask into a boolean DataArray on (prompt?, key)."""
    if valid is None:
        return None
    if isinstance(valid, xr.DataArray):
        arr = valid.rename({"token": "key"}) if "token" in valid.dims else valid
        return arr.astype(bool)
    if isinstance(valid, torch.Tensor):
        valid = valid.detach().cpu().numpy()
    mask = np.asarray(valid).astype(bool)
    dims = ("key",) if mask.ndim == 1 else ("prompt", "key")
    if mask.ndim not in (1, 2) or mask.shape[-1] != pattern.sizes["key"]:
        raise RecipeError(f"The mask must be (token,) or (prompt, token) with {pattern.sizes['key']} "
                          f"tokens to match the pattern, got shape {mask.shape}.")
    return xr.DataArray(mask, dims=dims)


def encode(model: Any, prompt: Any) -> list[list[int]]:
    """Token ids per prompt, exactly as a trace encodes them (strings via ``model.tokenizer``)."""
    if isinstance(prompt, torch.Tensor):
        return [prompt.tolist()] if prompt.dim() == 1 else prompt.tolist()
    if isinstance(prompt, str):
        return [list(model.tokenizer(prompt)["input_ids"])]
    items = list(prompt)
    if items and all(isinstance(i, int) for i in items):
        return [items]
    return [encode(model, p)[0] for p in items]


def validity(ids: Sequence[Sequence[int]]) -> np.ndarray:
    """(prompt, token) bool mask of real (not left-padding) positions for a padded batch."""
    width = max(len(r) for r in ids)
    mask = np.zeros((len(ids), width), dtype=bool)
    for i, row in enumerate(ids):
        mask[i, width - len(row):] = True
    return mask


def padded(ids: Sequence[Sequence[int]], pad: int = -1) -> np.ndarray:
    """Left-pad token ids into a (prompt, token) array (``pad`` where there is no token)."""
    width = max(len(r) for r in ids)
    out = np.full((len(ids), width), pad, dtype=np.int64)
    for i, row in enumerate(ids):
        out[i, width - len(row):] = row
    return out


def is_single(prompt: Any) -> bool:
    """True when a prompt gives no ``prompt`` dim (a string, a flat id list, a 1-D tensor)."""
    if isinstance(prompt, str):
        return True
    if isinstance(prompt, torch.Tensor):
        return prompt.dim() == 1
    items = list(prompt)
    return bool(items) and all(isinstance(i, int) for i in items)


def adds_bos(tokenizer: Any) -> bool:
    """Whether this tokenizer prepends its BOS token when it encodes text."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if tokenizer is None or bos is None:
        return False
    with_special = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    return len(with_special) > len(plain) and with_special[0] == bos


def ordinary_ids(model: Any) -> torch.Tensor:
    """Token ids that are not special or added tokens (the ids random sequences draw from)."""
    tok = model.tokenizer
    size = model.info.vocab if tok is None else min(model.info.vocab, len(tok))
    special: set[int] = set()
    if tok is not None:
        special.update(int(i) for i in getattr(tok, "all_special_ids", []) or [])
        special.update(int(i) for i in (getattr(tok, "added_tokens_decoder", None) or {}))
    keep = torch.ones(size, dtype=torch.bool)
    keep[[i for i in special if 0 <= i < size]] = False
    return torch.nonzero(keep).flatten()


def token_id(model: Any, token: int | str, what: str = "target") -> int:
    """A single token id from an id or a text that must encode to exactly one token."""
    vocab = model.info.vocab
    if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
        if not 0 <= int(token) < vocab:
            raise RecipeError(f"{what} id {token} is out of range: valid ids are 0..{vocab - 1}.")
        return int(token)
    if not isinstance(token, str) or model.tokenizer is None:
        raise RecipeError(f"{what} must be a token id (int) or a text (str) with a tokenizer, "
                          f"got {token!r}.")
    ids = list(model.tokenizer(token, add_special_tokens=False)["input_ids"])
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        hint = f" Did you mean {pieces[0]!r} (id {ids[0]})?" if ids else ""
        raise RecipeError(f"{what} {token!r} encodes to {len(ids)} tokens {pieces}, not one. Pass "
                          f"a single token (mind the leading space, e.g. ' Paris') or its id.{hint}")
    return int(ids[0])


def labels_to_str(values: Sequence[str]) -> np.ndarray:
    """A string array netCDF stores as text (fixed-width unicode)."""
    return np.asarray(list(values), dtype=str)


def check_model(model: Any) -> Any:
    """Accept an OculiModel or a bare HF model (wrapped); anything else is refused."""
    try:
        return oculi.wrap(model, getattr(model, "tokenizer", None))
    except oculi.OculiError as err:
        raise RecipeError(f"Expected a model from oculi.load() or oculi.wrap(), got "
                          f"{type(model).__name__}: {err}") from err


def select_layers(model: Any, layers: Any) -> list[int]:
    """Layer indices from None (all), an int, a slice or a list (negative ones wrap)."""
    n = model.info.n_layers
    if layers is None:
        return list(range(n))
    if isinstance(layers, slice):
        chosen = list(range(n)[layers])
    elif isinstance(layers, int) and not isinstance(layers, bool):
        chosen = [layers]
    else:
        chosen = list(layers)
    bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, (int, np.integer))
           or not -n <= i < n]
    if bad or not chosen:
        raise RecipeError(f"layers={layers!r} is not a valid selection: the model has {n} layers "
                          f"(0..{n - 1}); give an int, a slice, a list of ints or None for all.")
    return [int(i) % n for i in chosen]
