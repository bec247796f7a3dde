"""Head-type scores computed from attention patterns you already have (no model needed).

These are the formulas behind :mod:`oculi_dsl.recipes.heads`; they take a pattern (tensor,
array or ``DataArray`` ending in (query, key), see ``as_pattern``) so they can be checked on
hand-built patterns and reused on saved traces.

Implements SPEC.md § Head-type scores (Olsson et al. 2022; TransformerLens head_detector):

* repeated random tokens ``[BOS]? + R + R`` (o = 1 with BOS, else 0; R of length T):
  induction ``mean_{b,k} A[o+T+k, o+k+1]``, duplicate-token ``mean_k A[o+T+k, o+k]``;
* previous-token ``mean_{t≥1} A[t, t−1]``, bos ``mean_t A[t, 0]``, self ``mean_t A[t, t]``;
* on any text: duplicate-token = summed attention to earlier positions holding the same token
  id, averaged over the positions that have one; this project's induction analogue uses the
  same rule with the induction target (positions j whose PREVIOUS token equals token t);
* the TransformerLens masked score ``Σ(A ⊙ P) / Σ A`` with P the previous-token, duplicate or
  induction detection mask, options ``exclude_bos`` and ``exclude_current_token``.

>>> import torch
>>> from oculi_dsl.recipes.head_scores import previous_token_score
>>> float(previous_token_score(torch.tensor([[1., 0, 0], [1, 0, 0], [0, .5, .5]])))
0.75
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import xarray as xr

from ._common import as_lengths, as_pattern, padded
from ._errors import RecipeError

__all__ = [
    "SCORE_KINDS", "bos_score", "duplicate_token_score", "induction_score", "masked_score",
    "previous_token_score", "rrt_scores", "rrt_terms", "self_score", "text_scores",
]

# The scores classify_heads compares, in tie-breaking order.
SCORE_KINDS = ("induction", "previous_token", "duplicate_token", "bos", "self")
DEFINITION = "SPEC.md § Head-type scores"


def rrt_terms(pattern: Any, seq_len: int, offset: int) -> dict[str, Any]:
    """Per-sequence score terms of an R+R pattern (…, query, key) → (…) each.

    Uses only tensor methods (diagonal, slicing, mean), so it runs on a torch tensor AND on a
    trace proxy (``rrt_terms(t.layers[:].attn.pattern, T, o)`` reduces inside the trace and
    only (layer, prompt, head) numbers leave the forward pass).
    """
    T, o = seq_len, offset
    return {
        "induction": pattern.diagonal(offset=-(T - 1), dim1=-2, dim2=-1)[..., o + 1:].mean(-1),
        "duplicate_token": pattern.diagonal(offset=-T, dim1=-2, dim2=-1)[..., o:].mean(-1),
        "previous_token": pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1),
        "bos": pattern[..., 0].mean(-1),
        "self": pattern.diagonal(offset=0, dim1=-2, dim2=-1).mean(-1),
    }


def _check_rrt(n: int, seq_len: int, offset: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 2 or n != offset + 2 * seq_len:
        raise RecipeError(
            f"A repeated-random-tokens pattern of seq_len={seq_len!r} with "
            f"{'a' if offset else 'no'} BOS has {offset} + 2·{seq_len} positions, but the "
            f"pattern has {n}. Pass the seq_len T used to build [BOS]? + R + R (T >= 2).")


def _reduce_prompt(value: xr.DataArray) -> xr.DataArray:
    return value.mean("prompt") if "prompt" in value.dims else value


def rrt_scores(pattern: Any, seq_len: int, *, bos: bool = False) -> xr.Dataset:
    """All five scores of an R+R pattern, averaged over the ``prompt`` (batch) dim if any.

    ``bos`` says whether each sequence starts with a BOS token (o = 1). Returns ``induction``,
    ``duplicate_token``, ``previous_token``, ``bos`` and ``self`` over the pattern's other dims.
    """
    pat = as_pattern(pattern)
    offset = int(bool(bos))
    _check_rrt(pat.sizes["query"], seq_len, offset)
    terms = rrt_terms(torch.from_numpy(pat.values), seq_len, offset)
    dims = pat.dims[:-2]
    coords = {k: v for k, v in pat.coords.items() if set(v.dims) <= set(dims)}
    ds = xr.Dataset({k: _reduce_prompt(xr.DataArray(v.numpy(), dims=dims, coords=coords))
                     for k, v in terms.items()})
    ds.attrs.update(definition=DEFINITION + " (repeated random tokens)", seq_len=seq_len,
                    bos=int(bool(bos)))
    return ds


def induction_score(pattern: Any, seq_len: int, *, bos: bool = False) -> xr.DataArray:
    """Induction score ``mean_{b,k=0..T-1} A[o+T+k, o+k+1]`` of an R+R pattern."""
    return rrt_scores(pattern, seq_len, bos=bos)["induction"]


def duplicate_token_score(pattern: Any, seq_len: int | None = None, *, bos: bool = False,
                          tokens: Any = None, mask: Any = None) -> xr.DataArray:
    """Duplicate-token score: on R+R (give ``seq_len``) ``mean_k A[o+T+k, o+k]``; on any text
    (give ``tokens``) the summed attention to earlier positions holding the same token id,
    averaged over the positions that have one."""
    if seq_len is not None:
        return rrt_scores(pattern, seq_len, bos=bos)["duplicate_token"]
    if tokens is None:
        raise RecipeError("duplicate_token_score needs seq_len (repeated random tokens) or "
                          "tokens (the ids of an arbitrary text).")
    return text_scores(pattern, tokens, mask=mask)["duplicate_token"]


def previous_token_score(pattern: Any) -> xr.DataArray:
    """Previous-token score ``mean_{t≥1} A[t, t−1]`` (unpadded patterns; see text_scores)."""
    pat = as_pattern(pattern)
    return _reduce_prompt(xr.DataArray(np.diagonal(pat.values, -1, -2, -1).mean(-1), dims=pat.dims[:-2]))


def bos_score(pattern: Any) -> xr.DataArray:
    """Attention to the first position, ``mean_t A[t, 0]``."""
    pat = as_pattern(pattern)
    return _reduce_prompt(pat.isel(key=0, drop=True).mean("query"))


def self_score(pattern: Any) -> xr.DataArray:
    """Attention to the query's own position, ``mean_t A[t, t]``."""
    pat = as_pattern(pattern)
    return _reduce_prompt(xr.DataArray(np.diagonal(pat.values, 0, -2, -1).mean(-1), dims=pat.dims[:-2]))


def _tokens(tokens: Any, pat: xr.DataArray) -> xr.DataArray:
    """Token ids as (prompt?, key) with -1 on padding."""
    if isinstance(tokens, xr.DataArray):
        return tokens.rename({"token": "key"}) if "token" in tokens.dims else tokens
    if isinstance(tokens, (torch.Tensor, np.ndarray)):
        tokens = tokens.tolist()
    tokens = list(tokens)
    if tokens and isinstance(tokens[0], (list, tuple)):
        ids = padded([list(map(int, r)) for r in tokens])
        dims: tuple[str, ...] = ("prompt", "key")
    else:
        ids = np.asarray([int(i) for i in tokens], dtype=np.int64)
        dims = ("key",)
    if ids.shape[-1] != pat.sizes["key"]:
        raise RecipeError(f"tokens have length {ids.shape[-1]} but the pattern has "
                          f"{pat.sizes['key']} positions; pass the token ids the pattern was run on.")
    return xr.DataArray(ids, dims=dims)


def _masks(tokens: xr.DataArray, valid: xr.DataArray) -> dict[str, xr.DataArray]:
    """Detection masks P (prompt?, query, key) of the three head types."""
    n = tokens.sizes["key"]
    q = xr.DataArray(np.arange(n), dims="query")
    k = xr.DataArray(np.arange(n), dims="key")
    tq = tokens.rename({"key": "query"})
    vq = valid.rename({"key": "query"})
    same = (tq == tokens) & (k < q) & valid & vq
    prev_tok = tokens.shift(key=1, fill_value=-1)  # token id at j-1
    prev_valid = valid.shift(key=1, fill_value=False)
    induction = (tq == prev_tok) & (k <= q) & valid & prev_valid & vq
    previous = (k == q - 1) & valid & vq
    return {"previous_token": previous, "duplicate_token": same, "induction": induction}


def _first_real(valid: xr.DataArray) -> Any:
    """Position of each prompt's first real token (its BOS or sink), as a scalar or DataArray."""
    first = np.argmax(valid.values, axis=-1)
    return xr.DataArray(first, dims=valid.dims[:-1]) if valid.ndim > 1 else int(first)


def _valid(mask: Any, pat: xr.DataArray, tokens: xr.DataArray) -> xr.DataArray:
    valid = as_lengths(mask, pat)
    if valid is None:
        valid = tokens >= 0
    return valid


def masked_score(pattern: Any, tokens: Any, kind: str, *, exclude_bos: bool = False,
                 exclude_current_token: bool = False, mask: Any = None) -> xr.DataArray:
    """TransformerLens-style score ``Σ(A ⊙ P) / Σ A`` (SPEC § Head-type scores).

    ``kind`` is ``"previous_token"`` (P = sub-diagonal), ``"duplicate_token"`` (equal ids, key
    before query) or ``"induction"`` (the duplicate mask shifted right by one). With
    ``exclude_bos`` the first real key column, and with ``exclude_current_token`` the
    diagonal, are zeroed in A before both sums (as TransformerLens does). Computed per prompt
    and averaged over prompts. ``tokens`` are the ids per position ((token,) or a list of
    per-prompt id lists, left-padded); ``mask`` (optional) marks real tokens.
    """
    pat = as_pattern(pattern)
    toks = _tokens(tokens, pat)
    valid = _valid(mask, pat, toks)
    masks = _masks(toks, valid)
    if kind not in masks:
        raise RecipeError(f"Unknown masked-score kind {kind!r}. Valid kinds: {', '.join(masks)}.")
    n = pat.sizes["key"]
    weights = pat.where(valid & valid.rename({"key": "query"}), 0.0)
    if exclude_bos:
        weights = weights.where(xr.DataArray(np.arange(n), dims="key") != _first_real(valid), 0.0)
    if exclude_current_token:
        weights = weights.where(xr.DataArray(np.arange(n), dims="key")
                                != xr.DataArray(np.arange(n), dims="query"), 0.0)
    score = weights.where(masks[kind], 0.0).sum(("query", "key")) / weights.sum(("query", "key"))
    return _reduce_prompt(score)


def _pooled(values: xr.DataArray, where: xr.DataArray) -> xr.DataArray:
    """Mean of ``values`` over (prompt?, query) where ``where`` holds (NaN when nowhere)."""
    dims = [d for d in ("prompt", "query") if d in values.dims or d in where.dims]
    w = where.astype(np.float64)
    return (values.where(where, 0.0) * w).sum(dims) / w.sum(dims).where(w.sum(dims) > 0)


def text_scores(pattern: Any, tokens: Any, *, mask: Any = None, exclude_bos: bool = False,
                exclude_current_token: bool = False) -> xr.Dataset:
    """Head scores of a pattern on arbitrary text (padding-aware), pooled over prompts.

    ``previous_token`` = mean over real t with a real t−1 of A[t, t−1]; ``duplicate_token`` =
    Σ A[t, j] over earlier j with the same id, averaged over the positions t that have one;
    ``induction`` = Σ A[t, j] over j whose previous token equals token t (j − 1 < t), averaged
    over the positions that have one; ``bos`` = mean A[t, first real token]; ``self`` = mean
    A[t, t]; and the TransformerLens masked scores ``*_masked`` (see :func:`masked_score`).
    """
    pat = as_pattern(pattern)
    toks = _tokens(tokens, pat)
    valid = _valid(mask, pat, toks)
    masks = _masks(toks, valid)
    vq = valid.rename({"key": "query"})
    n = pat.sizes["key"]
    out: dict[str, xr.DataArray] = {}
    prev_ok = vq & valid.shift(key=1, fill_value=False).rename({"key": "query"})
    out["previous_token"] = _pooled(pat.where(masks["previous_token"], 0.0).sum("key"), prev_ok)
    for kind in ("duplicate_token", "induction"):
        has = masks[kind].any("key")
        out[kind] = _pooled(pat.where(masks[kind], 0.0).sum("key"), has)
    is_first = xr.DataArray(np.arange(n), dims="key") == _first_real(valid)
    out["bos"] = _pooled(pat.where(is_first, 0.0).sum("key"), vq)
    out["self"] = _pooled(pat.where(xr.DataArray(np.arange(n), dims="key")
                                    == xr.DataArray(np.arange(n), dims="query"), 0.0).sum("key"), vq)
    for kind in ("previous_token", "duplicate_token", "induction"):
        out[f"{kind}_masked"] = masked_score(pat, toks, kind, exclude_bos=exclude_bos,
                                             exclude_current_token=exclude_current_token,
                                             mask=valid)
    ds = xr.Dataset(out)
    ds.attrs.update(definition=DEFINITION + " (arbitrary text; *_masked = TransformerLens score)",
                    exclude_bos=int(exclude_bos), exclude_current_token=int(exclude_current_token))
    return ds
