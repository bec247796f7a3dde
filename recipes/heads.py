"""Head detection: find induction, previous-token, duplicate-token, BOS and self heads.

An induction head completes patterns ``A B … A → B``: at the second A it attends to the token
after the first A. The cleanest test (Olsson et al. 2022) feeds a sequence of random tokens
twice: in the second copy an induction head looks exactly T − 1 positions back, and the
model's loss on the second copy collapses because it can copy. :func:`head_scores` runs that
protocol in ONE forward pass and reduces the patterns inside the trace, so only
(layer, prompt, head) numbers leave it. :func:`detect_heads` scores heads on any text,
:func:`classify_heads` labels each head.

Implements SPEC.md § Head-type scores (formulas in :mod:`oculi_dsl.recipes.head_scores`):
repeated-random-tokens protocol ``seq = [BOS]? + R + R`` (R uniform over ordinary token ids,
no special tokens, T = 50, B = 10, fixed seed; BOS prepended exactly when the model's tokenizer
adds one to text), loss on each half, and the classification rule (largest of induction,
previous_token, duplicate_token, bos, self if ≥ 0.4, else ``unknown``).

>>> import oculi_dsl as oculi
>>> from oculi_dsl.recipes import classify_heads, head_scores
>>> ds = head_scores(oculi.testing.tiny_model("llama"), seq_len=8, batch=2)
>>> ds["induction"].dims
('layer', 'head')
>>> classify_heads(ds)["label"].dims
('layer', 'head')
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import xarray as xr

import oculi_dsl as oculi

from ._common import (
    adds_bos,
    check_model,
    encode,
    is_single,
    ordinary_ids,
    padded,
    provenance,
    select_layers,
    validity,
)
from ._errors import RecipeError
from .head_scores import DEFINITION, SCORE_KINDS, rrt_terms, text_scores

__all__ = ["classify_heads", "detect_heads", "head_scores", "random_repeated_tokens"]


def random_repeated_tokens(model: Any, seq_len: int = 50, batch: int = 10, *, seed: int = 0,
                           bos: bool | None = None) -> tuple[torch.Tensor, bool]:
    """The (batch, o + 2·seq_len) ids ``[BOS]? + R + R`` and whether BOS was prepended.

    R is drawn uniformly (seeded ``torch.Generator``) from the ordinary ids: the tokenizer's
    vocabulary minus its special and added tokens. ``bos=None`` prepends BOS exactly when the
    tokenizer adds it to text (SmolLM2's does not; Llama's and Gemma's do; GPT-2's does not).
    """
    for name, value, low in (("seq_len", seq_len, 2), ("batch", batch, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise RecipeError(f"{name} must be an int >= {low}, got {value!r}.")
    model = check_model(model)
    if bos is None:
        bos = adds_bos(model.tokenizer)
    bos_id: Any = getattr(model.tokenizer, "bos_token_id", None)
    if bos and bos_id is None:
        raise RecipeError("bos=True, but the tokenizer has no bos_token_id; use bos=False or None.")
    pool = ordinary_ids(model)
    gen = torch.Generator().manual_seed(int(seed))
    half = pool[torch.randint(len(pool), (batch, seq_len), generator=gen)]
    ids = torch.cat([half, half], dim=1)
    if bos:
        ids = torch.cat([torch.full((batch, 1), int(bos_id)), ids], dim=1)
    return ids, bool(bos)


def head_scores(model: Any, *, seq_len: int = 50, batch: int = 10, seed: int = 0,
                bos: bool | None = None, layers: Any = None) -> xr.Dataset:
    """Induction, duplicate-token, previous-token, BOS and self scores of every head.

    Implements SPEC.md § Head-type scores, repeated-random-tokens protocol, in ONE forward
    pass over the batch (see :func:`random_repeated_tokens` for the sequence and BOS rule).
    Returns (layer, head) variables ``induction``, ``duplicate_token``, ``previous_token``,
    ``bos``, ``self`` (all means of attention weights, so in [0, 1]); ``loss`` (token) the
    next-token loss in nats averaged over the batch, indexed by the predicted position;
    ``loss_first_half`` / ``loss_second_half`` (targets in the first / second copy of R;
    a trained LM's second half is far lower); and ``tokens`` (prompt, token).

    >>> import oculi_dsl as oculi
    >>> ds = head_scores(oculi.testing.tiny_model("gpt2"), seq_len=6, batch=2)
    >>> bool(((ds["induction"] >= 0) & (ds["induction"] <= 1)).all())
    True
    """
    model = check_model(model)
    chosen = select_layers(model, layers)
    ids, has_bos = random_repeated_tokens(model, seq_len, batch, seed=seed, bos=bos)
    offset = int(has_bos)
    with oculi.trace(model, ids) as t:
        terms = rrt_terms(t.layers[chosen].attn.pattern, seq_len, offset)
        for name, value in terms.items():
            value.save(name)  # (layer, prompt, head)
        logp = t.logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None].to(model.device))
        logp[..., 0].save("logp")  # (prompt, token - 1)
    saved = t.saved
    data: dict[str, Any] = {k: (("layer", "head"), saved[k].double().mean(1).cpu().numpy())
                            for k in terms}
    loss = -saved["logp"].double().cpu()
    first = loss[:, : offset + seq_len - 1]  # targets 1 .. o+T-1: the first copy of R
    second = loss[:, offset + seq_len - 1:]  # targets o+T .. o+2T-1: the second copy
    data["loss"] = (("token",), np.concatenate([[np.nan], loss.mean(0).numpy()]))
    data["loss_first_half"] = ((), float(first.mean()))
    data["loss_second_half"] = ((), float(second.mean()))
    data["tokens"] = (("prompt", "token"), ids.numpy())
    ds = xr.Dataset(data, coords={"layer": chosen, "head": np.arange(model.info.n_heads),
                                  "token": np.arange(ids.shape[1]), "prompt": np.arange(batch)})
    ds["loss"].attrs["units"] = "nats"
    ds.attrs = provenance(model, "heads.head_scores", DEFINITION + " (repeated random tokens)",
                          seq_len=seq_len, batch=batch, seed=seed, bos=int(has_bos))
    return ds


def detect_heads(model: Any, text: Any, *, exclude_bos: bool = False,
                 exclude_current_token: bool = False, layers: Any = None) -> xr.Dataset:
    """Head scores on arbitrary text (one string, token ids, or a list: one forward pass).

    Implements SPEC.md § Head-type scores on any text (see
    :func:`~oculi_dsl.recipes.head_scores.text_scores`): ``previous_token``,
    ``duplicate_token``, ``induction`` (same-token rule shifted by one), ``bos``, ``self`` and
    the TransformerLens masked scores ``previous_token_masked``, ``duplicate_token_masked``,
    ``induction_masked`` with ``exclude_bos`` / ``exclude_current_token``. Padding of a list
    of prompts is masked; scores pool over prompts. A score is NaN when the text offers no
    position for it (e.g. no repeated token).

    >>> import oculi_dsl as oculi
    >>> ds = detect_heads(oculi.testing.tiny_model("llama"), "the cat and the cat and the")
    >>> sorted(ds.data_vars)[:3]
    ['bos', 'duplicate_token', 'duplicate_token_masked']
    """
    model = check_model(model)
    chosen = select_layers(model, layers)
    ids = encode(model, text)
    with oculi.trace(model, text) as t:
        t.layers[chosen].attn.pattern.save("pattern")
    pattern = t.result["pattern"]
    single = is_single(text)
    tokens = padded(ids)[0] if single else padded(ids)
    valid = validity(ids)[0] if single else validity(ids)
    ds = text_scores(pattern, tokens, mask=valid, exclude_bos=exclude_bos,
                     exclude_current_token=exclude_current_token)
    ds = ds.assign_coords(layer=chosen, head=np.arange(model.info.n_heads)).transpose("layer", "head")
    ds.attrs = provenance(model, "heads.detect_heads", DEFINITION + " (arbitrary text)",
                          prompts=t.result.attrs["prompts"], exclude_bos=int(exclude_bos),
                          exclude_current_token=int(exclude_current_token))
    return ds


def classify_heads(scores: Any, *, threshold: float = 0.4, **head_scores_kwargs: Any) -> xr.Dataset:
    """Label every head with its type (SPEC.md § Head-type scores, classification rule).

    ``scores`` is a Dataset from :func:`head_scores` or :func:`detect_heads`, or a model (then
    :func:`head_scores` runs with ``head_scores_kwargs``). Each head gets the largest of
    induction, previous_token, duplicate_token, bos, self (ties: that order) as ``label`` if
    that score is ≥ ``threshold``, else ``"unknown"``; ``score`` is that largest score (also
    for unknown heads). The five scores are kept alongside.

    >>> import xarray as xr
    >>> one = lambda v: xr.DataArray([[v]], dims=("layer", "head"))
    >>> s = xr.Dataset({"induction": one(.7), "previous_token": one(.1),
    ...                 "duplicate_token": one(.0), "bos": one(.2), "self": one(.0)})
    >>> out = classify_heads(s)
    >>> str(out["label"].item()), out["score"].item()
    ('induction', 0.7)
    """
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 <= threshold <= 1:
        raise RecipeError(f"threshold must be a number in [0, 1], got {threshold!r}.")
    if not isinstance(scores, xr.Dataset):
        scores = head_scores(scores, **head_scores_kwargs)
    missing = [k for k in SCORE_KINDS if k not in scores]
    if missing:
        raise RecipeError(f"The scores Dataset lacks {missing}; it needs {list(SCORE_KINDS)} "
                          f"(from head_scores() or detect_heads()), has {sorted(scores.data_vars)}.")
    stacked = np.stack([scores[k].transpose("layer", "head").values for k in SCORE_KINDS], -1)
    filled = np.where(np.isnan(stacked), -np.inf, stacked)
    best = filled.argmax(-1)
    top = np.take_along_axis(stacked, best[..., None], -1)[..., 0]
    names = np.asarray(SCORE_KINDS)[best]
    labels = np.where(top >= threshold, names, "unknown")
    ds = xr.Dataset(
        {"label": (("layer", "head"), labels.astype(str)), "score": (("layer", "head"), top),
         **{k: scores[k].transpose("layer", "head") for k in SCORE_KINDS}},
        coords={"layer": scores["layer"].values, "head": scores["head"].values}
        if "layer" in scores.coords else None)
    ds.attrs = {**scores.attrs, "recipe": "oculi_dsl.recipes.heads.classify_heads",
                "definition": DEFINITION + ": classification (largest of "
                + ", ".join(SCORE_KINDS) + " if >= threshold, else unknown)",
                "threshold": float(threshold)}
    return ds
