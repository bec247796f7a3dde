"""Activation patching: which (site, layer[, head][, token]) carries the difference between runs.

Implements SPEC.md § Activation patching and causal tracing. Denoising (default) copies each
cell's activation from the clean run into the corrupted run and measures how much of the clean
behaviour comes back: ``r = (M_patched − M_corr) / (M_clean − M_corr)``. Noising copies the
corrupted activation into the clean run: ``r = (M_patched − M_clean) / (M_corr − M_clean)``.
When ``|M_clean − M_corr| < 1e-10`` every recovery is 0 and a warning says so.

Metrics M, all read at ONE position (default the last token): ``"prob"`` (softmax probability
of the target token), ``"logit_diff"`` (``z[target] − z[wrong]``, the default when ``wrong``
is given), ``"kl"`` (KL(clean ‖ run), 0 for the clean run) or a function of the logits
(a ``(vocab,)`` proxy → a scalar, written with torch ops so it records).

Batched: cells run as patched copies in as few forward passes as ``chunk_size`` /
``memory_budget`` allow (see :mod:`._batching`), plus one pass for the two unpatched runs.
Cells that cannot change the measured value are not run and get exactly ``M`` of the
unpatched run (recovery 0): a position after the measured one (causal attention), and a
position before the first token where the two prompts differ (identical activations there).

>>> import oculi_dsl as oculi
>>> from oculi_dsl.recipes import activation_patching
>>> model = oculi.testing.tiny_model("llama")
>>> ds = activation_patching(model, "The capital of France is", "The capital of Germany is",
...                          sites=["resid_post"], tokens="all", progress=False)
>>> ds["recovery"].dims
('site', 'layer', 'token')
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from . import _batching as B
from ._common import check_model, provenance, token_id
from ._errors import RecipeError
from ._patch_sites import (
    HEAD_ALIASES,
    canonical_site,
    head_axis,
    index_list,
    layer_list,
    site_index,
    token_strings,
)

__all__ = ["activation_patching", "metric_function", "recovery", "RecoveryWarning"]

DEFINITION = ("SPEC.md § Activation patching and causal tracing: denoising recovery "
              "r = (M_patched − M_corr) / (M_clean − M_corr), noising r = (M_patched − M_clean) / "
              "(M_corr − M_clean), 0 with a warning when |M_clean − M_corr| < 1e-10")
METRICS = ("prob", "logit_diff", "kl")
DIRECTIONS = ("denoise", "noise")


class RecoveryWarning(UserWarning):
    """The clean and corrupted metrics are (almost) equal, so recovery is undefined (set to 0)."""


def recovery(metric: Any, m_clean: float, m_corr: float, direction: str = "denoise") -> Any:
    """SPEC recovery of patched metric values (array or number); 0 when the runs tie."""
    if abs(m_clean - m_corr) < 1e-10:
        warnings.warn(f"metric_clean ({m_clean:.6g}) and metric_corrupt ({m_corr:.6g}) differ by "
                      "less than 1e-10, so recovery is undefined and reported as 0. Choose prompts "
                      "or a target/metric on which the two runs disagree.", RecoveryWarning,
                      stacklevel=3)
        return np.zeros_like(np.asarray(metric, dtype=np.float64))
    metric = np.asarray(metric, dtype=np.float64)
    if direction == "denoise":
        return (metric - m_corr) / (m_clean - m_corr)
    return (metric - m_clean) / (m_corr - m_clean)


def metric_function(metric: str | Callable[[Any], Any], target: int | None, wrong: int | None,
                    clean_logits: torch.Tensor | None = None) -> Callable[[Any, int], Any]:
    """``f(logits, n)``: the metric of each of ``n`` stacked (…, vocab) logits, vectorised.

    Works on proxies (inside a trace) and on tensors (the unpatched runs), so both go through
    exactly the same formula.
    """
    if callable(metric):
        user = metric

        def custom(logits: Any, n: int) -> Any:
            return torch.stack([torch.as_tensor(user(logits[i])) if isinstance(logits, torch.Tensor)
                                else user(logits[i]) for i in range(n)])
        return custom
    if metric == "prob":
        return lambda logits, n: logits.softmax(-1)[..., target]
    if metric == "logit_diff":
        return lambda logits, n: logits[..., target] - logits[..., wrong]
    assert clean_logits is not None
    ref = clean_logits.detach().float().log_softmax(-1)
    ref_p = ref.exp()
    return lambda logits, n: (ref_p * (ref - logits.float().log_softmax(-1))).sum(-1)


def _encode(model: Any, prompt: Any, what: str) -> list[int]:
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise RecipeError(f"{what} is text but the model has no tokenizer; pass token ids.")
        return list(model.tokenizer(prompt)["input_ids"])
    if isinstance(prompt, torch.Tensor) and prompt.dim() == 1:
        return [int(i) for i in prompt.tolist()]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(i, int) for i in prompt):
        return list(prompt)
    raise RecipeError(f"{what} must be ONE prompt (a string or a flat list / 1-D tensor of token "
                      f"ids), got {type(prompt).__name__}. Run the recipe once per prompt pair.")


def same_length(model: Any, clean: list[int], corrupt: list[int], what: str = "corrupt") -> None:
    if len(clean) != len(corrupt):
        strs = (token_strings(model, clean), token_strings(model, corrupt))
        raise RecipeError(
            f"The clean prompt has {len(clean)} tokens {strs[0]} but the {what} prompt has "
            f"{len(corrupt)} {strs[1]}; patching copies activations position by position, so both "
            "must tokenize to the same length. Reword one (e.g. pick a name with as many tokens).")


def _resolve_metric(model: Any, metric: Any, target: Any, wrong: Any,
                    clean_lg: torch.Tensor, corr_lg: torch.Tensor) -> tuple[str, int, int | None]:
    if metric is None:
        metric = "logit_diff" if wrong is not None else "prob"
    if not callable(metric) and metric not in METRICS:
        raise RecipeError(f"metric={metric!r} is not known. Valid: {', '.join(METRICS)}, or a "
                          "function of the logits (vocab,) proxy returning a scalar, e.g. "
                          "metric=lambda logits: logits.softmax(-1)[42].")
    tid = token_id(model, target, "target") if target is not None else int(clean_lg.argmax())
    wid = token_id(model, wrong, "wrong") if wrong is not None else None
    if metric == "logit_diff" and wid is None:
        wid = int(corr_lg.argmax())
        if wid == tid:
            raise RecipeError(f"metric='logit_diff' needs a wrong token: the corrupted run's top "
                              f"prediction is the target itself (id {tid}). Pass wrong=' London'.")
    name = metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")
    return name, tid, wid


def activation_patching(model: Any, clean: Any, corrupt: Any, *, sites: Sequence[str] | str = (
        "resid_post",), metric: str | Callable[[Any], Any] | None = None, target: int | str | None = None,
        wrong: int | str | None = None, layers: Any = None, tokens: Any = None, heads: Any = None,
        direction: str = "denoise", position: int = -1, chunk_size: int | None = None,
        memory_budget: Any = None, progress: bool = True) -> xr.Dataset:
    """Patch every (site, layer[, head][, token]) cell between two runs and measure recovery.

    Implements SPEC.md § Activation patching and causal tracing (module docstring).
    ``clean`` / ``corrupt``: one prompt each (text or token ids), same token length.
    ``sites``: canonical sites (``resid_pre``, ``resid_mid``, ``resid_post``, ``attn.out``,
    ``mlp.out``, ``attn.z``/``attn.q``/``attn.k``/``attn.v``/``attn.pattern`` …) or the guide's
    names (``residual_pre_attn``, ``attn_out``, ``mlp_out``, ``head`` …). ``layers``: None (all),
    int, slice or list. ``tokens``: None patches every position at once (no ``token`` dim);
    ``"all"`` or a list patches one position per cell. ``heads``: None, ``"all"`` or a list —
    per-head cells (head = KV head for ``attn.k``/``attn.v``); the ``head`` alias implies all
    heads. ``target``/``wrong``: token id or single-token text (default target: the clean run's
    top prediction; default wrong for ``logit_diff``: the corrupted run's). ``direction``:
    ``"denoise"`` (clean → corrupted run) or ``"noise"`` (corrupted → clean run).
    ``chunk_size`` cells per forward pass (default: from ``memory_budget``, e.g. ``"2GB"``).

    Returns a Dataset: ``recovery`` and ``metric`` over (site, layer[, head][, token]),
    ``metric_clean``, ``metric_corrupt``; coords ``site``, ``layer``, ``head``, ``token``,
    ``token_str`` (clean) and ``token_str_corrupt``; attrs with the SPEC definition, metric,
    target and the number of forward passes.

    >>> import oculi_dsl as oculi
    >>> model = oculi.testing.tiny_model("gpt2")
    >>> ds = activation_patching(model, "The capital of France is",
    ...                          "The capital of Germany is", sites=["attn_out", "mlp_out"],
    ...                          layers=[0, 1], progress=False)
    >>> ds["site"].values.tolist(), ds["recovery"].shape
    (['attn.out', 'mlp.out'], (2, 2))
    """
    model = check_model(model)
    if direction not in DIRECTIONS:
        raise RecipeError(f"direction={direction!r} is not valid: use 'denoise' (clean activations "
                          "into the corrupted run) or 'noise' (corrupted into the clean run).")
    clean_ids, corr_ids = _encode(model, clean, "clean"), _encode(model, corrupt, "corrupt")
    same_length(model, clean_ids, corr_ids)
    n_tok = len(clean_ids)
    pos = B.check_position(position, n_tok)
    names = [sites] if isinstance(sites, str) else list(sites)
    if not names:
        raise RecipeError("sites=[] is empty: give at least one site, e.g. sites=['resid_post'].")
    canon = [canonical_site(model, s) for s in names]
    if len(set(canon)) != len(canon):
        raise RecipeError(f"sites={names!r} names the same site twice (as {canon}); give each once.")
    layer_sel = layer_list(model, layers)
    per_head = heads is not None or any(s in HEAD_ALIASES for s in names)
    head_sel: list[int] | None = None
    if per_head:
        no_heads = [s for s in canon if head_axis(model, s) is None]
        if no_heads:
            raise RecipeError(f"Per-head patching (heads={heads!r}) needs sites with a head dim, "
                              f"but {no_heads} have none. Per-head sites: attn.z ('head'), attn.q, "
                              "attn.k, attn.v, attn.scores, attn.pattern, attn.result; run the "
                              "other sites in a second call without heads=.")
        info = model.info
        limit = min(info.n_kv_heads if head_axis(model, s) == "kv_head" else info.n_heads for s in canon)
        head_sel = index_list("all" if heads is None else heads, limit, "heads", "[0, 3]")
    tok_sel = index_list(tokens, n_tok, "tokens", "'all' or [4, 5]")

    source, base = (clean_ids, corr_ids) if direction == "denoise" else (corr_ids, clean_ids)
    clean_lg, corr_lg = B.baseline_logits(model, [clean_ids, corr_ids], pos)
    name, tid, wid = _resolve_metric(model, metric, target, wrong, clean_lg, corr_lg)
    fn = metric_function(metric if callable(metric) else name, tid, wid, clean_lg)
    with torch.no_grad():
        m_clean = float(fn(clean_lg[None], 1)[0])
        m_corr = float(fn(corr_lg[None], 1)[0])
    m_base = m_corr if direction == "denoise" else m_clean

    first_diff = next((i for i, (a, b) in enumerate(zip(clean_ids, corr_ids, strict=False)) if a != b), n_tok)
    grid: list[list[Any]] = [list(canon), list(layer_sel)]
    grid += [head_sel] if head_sel is not None else []
    grid += [tok_sel] if tok_sel is not None else []
    shape = tuple(len(g) for g in grid)
    values = np.full(int(np.prod(shape)), m_base, dtype=np.float64)
    cells, where = [], []
    for flat, combo in enumerate(np.ndindex(*shape)):
        site, layer = canon[combo[0]], layer_sel[combo[1]]
        head = head_sel[combo[2]] if per_head else None  # type: ignore[index]
        token = tok_sel[combo[-1]] if tok_sel is not None else None
        if token is not None and (token > pos or token < first_diff):
            continue  # cannot change the measured value: exactly the unpatched run
        cells.append([B.Edit(site, layer, site_index(model, site, head, token))])
        where.append(flat)
    per_chunk = B.cells_per_chunk(model, n_tok, 1, chunk_size, memory_budget)
    metrics, passes = B.run_sweep(model, source=source, base=base, cells=cells, position=pos,
                                  measure=fn, per_chunk=per_chunk, progress=progress,
                                  desc=f"patching {len(cells)} cells")
    values[where] = metrics.double().numpy()
    values = values.reshape(shape)
    dims = ("site", "layer") + (("head",) if per_head else ()) + (("token",) if tok_sel is not None else ())
    coords: dict[str, Any] = {"site": canon, "layer": layer_sel}
    if per_head:
        coords["head"] = head_sel
    if tok_sel is not None:
        coords["token"] = tok_sel
        coords["token_str"] = ("token", [token_strings(model, clean_ids)[i] for i in tok_sel])
        coords["token_str_corrupt"] = ("token", [token_strings(model, corr_ids)[i] for i in tok_sel])
    ds = xr.Dataset({"recovery": (dims, recovery(values, m_clean, m_corr, direction)),
                     "metric": (dims, values), "metric_clean": m_clean, "metric_corrupt": m_corr},
                    coords=coords)
    strs = token_strings(model, [tid] + ([wid] if wid is not None else []))
    ds.attrs = provenance(
        model, "patching.activation_patching", DEFINITION, clean=_text(model, clean_ids),
        corrupt=_text(model, corr_ids), metric=name, target_id=tid, target_token=strs[0],
        wrong_id=wid, wrong_token=strs[1] if wid is not None else None, direction=direction,
        position=pos, sites_requested=[str(s) for s in names], cells=len(cells),
        skipped_cells=int(values.size) - len(cells), chunk_size=per_chunk,
        forward_passes=passes + 1)
    return ds


def _text(model: Any, ids: list[int]) -> str:
    return model.tokenizer.decode(ids) if model.tokenizer is not None else " ".join(map(str, ids))
