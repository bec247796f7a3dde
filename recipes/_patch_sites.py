"""Patching vocabulary: site names (canonical and the guide's aliases), layers, heads, tokens.

The guide's components map onto canonical DSL sites: ``residual_pre_attn`` → ``resid_pre``,
``residual_post_attn`` → ``resid_mid``, ``residual_post_mlp`` → ``resid_post``, ``attn_out`` →
``attn.out``, ``mlp_out`` → ``mlp.out`` and ``head`` → ``attn.z`` (one head's slice of the
output projection's input, SPEC's z_h). Any layer site of the model's family is accepted too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from oculi_dsl.errors import SiteError, did_you_mean

from ._errors import RecipeError

ALIASES: dict[str, str] = {
    "residual_pre_attn": "resid_pre", "pre_attn": "resid_pre",
    "residual_post_attn": "resid_mid", "post_attn": "resid_mid", "pre_mlp": "resid_mid",
    "residual_post_mlp": "resid_post", "post_mlp": "resid_post", "hidden": "resid_post",
    "attn_out": "attn.out", "attn": "attn.out", "mlp_out": "mlp.out", "mlp": "mlp.out",
    "head": "attn.z", "heads": "attn.z", "attn.heads": "attn.z", "z": "attn.z",
    "queries": "attn.q", "q": "attn.q", "keys": "attn.k", "k": "attn.k", "values": "attn.v",
    "v": "attn.v", "pattern": "attn.pattern", "patterns": "attn.pattern", "scores": "attn.scores",
    "result": "attn.result",
}
# Sites that can be patched one head at a time (their value has a head or kv_head dim).
HEAD_ALIASES = ("head", "heads", "attn.heads")


def canonical_site(model: Any, name: Any) -> str:
    """The canonical layer site for a canonical name or a guide alias; SiteError otherwise."""
    family = model.family
    if isinstance(name, str):
        site = ALIASES.get(name, name)
        if site in family.layer_sites:
            return site
        if site in family.absent:
            raise SiteError(f"Site {name!r} does not exist on {family.name}: {family.absent[site]}.")
    valid = sorted(family.layer_sites) + sorted(ALIASES)
    raise SiteError(f"Cannot patch site {name!r} on {model.info.model_id} ({family.name})."
                    f"{did_you_mean(str(name), valid)} Valid sites: "
                    f"{', '.join(sorted(family.layer_sites))}; guide aliases: "
                    f"{', '.join(sorted(ALIASES))}.")


def head_axis(model: Any, site: str) -> str | None:
    """``head`` / ``kv_head`` when the site's value has a per-head dim, else None."""
    dims = model.family.layer_sites[site].dims
    return next((d for d in dims if d in ("head", "kv_head")), None)


def layer_list(model: Any, layers: Any) -> list[int]:
    """None → every layer; an int, a slice, a range or a list of ints (negative from the end)."""
    n = model.info.n_layers
    if layers is None:
        return list(range(n))
    chosen = list(range(n)[layers]) if isinstance(layers, slice) else _items(layers)
    bad = _out_of_range(chosen, n)
    if bad or not chosen:
        raise RecipeError(f"layers={layers!r} is not a valid selection ({bad or 'empty'}): the "
                          f"model has {n} layers, 0..{n - 1} (or -{n}..-1). Give an int, a "
                          "slice, a range, a list of ints, or None for every layer.")
    return [i % n for i in chosen]


def index_list(value: Any, n: int, what: str, example: str) -> list[int] | None:
    """None → None; "all" → 0..n-1; an int or ints (negative from the end) → absolute indices."""
    if value is None:
        return None
    if isinstance(value, str):
        if value == "all":
            return list(range(n))
        raise RecipeError(f"{what}={value!r} is not understood: give None, 'all', an int or a "
                          f"list of ints in 0..{n - 1}, e.g. {what}={example}.")
    items = _items(value)
    bad = _out_of_range(items, n)
    if bad or not items:
        raise RecipeError(f"{what}={value!r} has invalid entries {bad or '(empty)'}: valid are "
                          f"0..{n - 1} (or -{n}..-1), 'all', or None. Example: {what}={example}.")
    out = [i % n for i in items]
    if len(set(out)) != len(out):
        raise RecipeError(f"{what}={value!r} lists the same {what[:-1]} twice; give each once.")
    return out


def _items(value: Any) -> list[Any]:
    """An int or a sequence of ints (numpy ints included) as a list; anything else as [value]."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return [int(value)]
    if isinstance(value, (list, tuple, range, np.ndarray)):
        return [int(i) if isinstance(i, np.integer) else i for i in value]
    return [value]


def _out_of_range(items: Sequence[Any], n: int) -> list[Any]:
    return [i for i in items if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n]


def site_index(model: Any, site: str, head: int | None, token: int | None) -> tuple[Any, ...] | None:
    """Index into the site's value (no batch dim) selecting one head and/or one token.

    Token-like dims are ``token`` and ``query`` (a pattern row is the query position); the head
    dim is ``head`` or ``kv_head``. None means the whole site.
    """
    if head is None and token is None:
        return None
    index: list[Any] = []
    for dim in model.family.layer_sites[site].dims:
        if dim in ("token", "query") and token is not None:
            index.append(token)
        elif dim in ("head", "kv_head") and head is not None:
            index.append(head)
        else:
            index.append(slice(None))
    while index and index[-1] == slice(None):
        index.pop()
    return tuple(index)


def token_strings(model: Any, ids: Sequence[int]) -> list[str]:
    tok = model.tokenizer
    return [tok.decode([i]) if tok is not None else str(i) for i in ids]
