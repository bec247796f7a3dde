"""Head composition: how much a later head reads what an earlier head writes, from weights.

A head s writes ``x W_OV^s`` into the stream; a later head t reads the stream through its
query (W_Q), key (W_K) or value (W_V) side. If W_OV^s's output lands where t's reading matrix
looks, the product is large relative to the two matrices: that is Q-, K- or V-composition
(Elhage et al. 2021). K-composition between a previous-token head and a later induction head
is the signature of an induction circuit.

Implements SPEC.md § Composition scores (TransformerLens all_composition_scores):
``W_OV^h = W_V^h W_O^h``, ``W_QK^h = W_Q^h W_K^hᵀ``; Q-composition
``‖W_OV^s W_QK^t‖_F / (‖W_OV^s‖_F ‖W_QK^t‖_F)``, K-composition with ``W_QK^tᵀ``,
V-composition with ``W_OV^t``; zero unless layer(s) < layer(t); GQA siblings share K / V
while W_OV stays per query head; input-norm γ folded into W_Q, W_K, W_V (1 + w on Gemma; see
``_weights.folded_head_weights`` for q/k norms, Gemma's post-attention norm and LayerNorm
centring). Rotary position embeddings are ignored (they rotate q and k by position, which no
single weight matrix can express). A random baseline (same shapes, Gaussian entries) is
reported next to the scores.

Low-rank computation (never a d × d matrix): for a d × D matrix M let R (D × D) satisfy
RᵀR = MᵀM (the R of a thin QR M = QR, here from the D × D Gram matrix). Then
``‖W_OV^s X‖ = ‖(R_V W_O^s) X‖`` with R_V from W_V^s, and ``‖Y W_Q^t W_K^tᵀ‖ = ‖Y W_Q^t R_Kᵀ‖``
with R_K from W_K^t, so every score is the Frobenius norm of a D × D block of one
(H·D × d) @ (d × N·D) product.

>>> import oculi_dsl as oculi
>>> from oculi_dsl.recipes import composition_scores
>>> ds = composition_scores(oculi.testing.tiny_model("llama"), progress=False)
>>> ds["k_composition"].dims
('layer1', 'head1', 'layer2', 'head2')
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from ._common import check_model, provenance, select_layers
from ._errors import RecipeError
from ._weights import folded_head_weights

__all__ = ["KINDS", "composition_scores", "induction_circuits", "random_baseline"]

KINDS = ("q", "k", "v")
DEFINITION = ("SPEC.md § Composition scores (Frobenius ratio via rank-D factors, input-norm γ "
              "folded, GQA-shared K/V, rotary ignored)")


def _r_factor(m: torch.Tensor) -> torch.Tensor:
    """A D × D factor R with RᵀR = MᵀM for each (…, d, D) matrix M, so ‖M Y‖ = ‖R Y‖.

    It plays the role of the triangular factor of a thin QR (same norms) but comes from the
    D × D Gram matrix MᵀM (in M's dtype): its Cholesky factor Lᵀ, or diag(√λ) Vᵀ from an
    eigendecomposition for the rank-deficient (e.g. all-zero) heads where Cholesky fails.
    """
    gram = m.transpose(-1, -2) @ m
    lower, info = torch.linalg.cholesky_ex(gram)
    r = lower.transpose(-1, -2)
    failed = info != 0
    if failed.any():
        evals, evecs = torch.linalg.eigh(gram[failed])
        r[failed] = evals.clamp(min=0).sqrt()[..., :, None] * evecs.transpose(-1, -2)
    return r


def head_factors(weights: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Rank-D factors of one layer's heads from (H, d, D) / (H, D, d) weights (in ``dtype``).

    ``src`` (H, D, d): B_s with ‖W_OV^s X‖ = ‖B_s X‖; ``q``, ``k``, ``v`` (H, d, D): C_t with
    ‖Y M_t‖ = ‖Y C_t‖ for M_t = W_QK^t, W_QK^tᵀ, W_OV^t. Each is scaled to unit Frobenius norm,
    so a score is just ‖B_s C_t‖_F (NaN factors for an all-zero head).
    """
    wq, wk, wv, wo = (weights[k].to(dtype) for k in ("W_Q", "W_K", "W_V", "W_O"))
    factors = {
        "src": _r_factor(wv) @ wo,
        "q": wq @ _r_factor(wk).transpose(-1, -2),
        "k": wk @ _r_factor(wq).transpose(-1, -2),
        "v": wv @ _r_factor(wo.transpose(-1, -2)).transpose(-1, -2),
    }
    for key, value in factors.items():
        norm = value.flatten(-2).norm(dim=-1)
        factors[key] = value / norm.where(norm > 0, torch.nan)[:, None, None]
    return factors


def block_scores(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """‖B_s C_t‖_F for all (s, t): src (S, D, d), dst (T, d, D') → (S, T), one matmul."""
    s, dh, d = src.shape
    n, _, dh2 = dst.shape
    prod = src.reshape(s * dh, d) @ dst.permute(1, 0, 2).reshape(d, n * dh2)
    return prod.reshape(s, dh, n, dh2).pow(2).sum((1, 3)).sqrt()


def _kinds(kinds: Any) -> tuple[str, ...]:
    chosen = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in chosen if k not in KINDS]
    if bad or not chosen:
        raise RecipeError(f"kinds={kinds!r} is invalid; choose from {list(KINDS)} "
                          "(Q-, K-, V-composition), e.g. kinds=('k',).")
    return chosen


@functools.lru_cache(maxsize=16)
def random_baseline(d_model: int, d_head: int, *, samples: int = 100,
                    seed: int = 0) -> dict[str, tuple[float, float]]:
    """Mean and std of the Q-, K- and V-composition of random weights of the model's shapes.

    W_Q, W_K, W_V (d × D) and W_O (D × d) of a source and a destination head get i.i.d.
    N(0, 1) entries (the score ignores their scale), ``samples`` independent pairs, seeded,
    computed in float32 (an estimate of a chance level needs no more); cached per arguments.
    Treat the returned dict as read-only.
    The result, ≈ 1/√d_model, is the level a real pair must beat.
    """
    gen = torch.Generator().manual_seed(int(seed))

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(samples, *shape, generator=gen, dtype=torch.float32)

    src = head_factors({"W_Q": draw(d_model, 1), "W_K": draw(d_model, 1),
                        "W_V": draw(d_model, d_head), "W_O": draw(d_head, d_model)},
                       torch.float32)["src"]
    dst = head_factors({"W_Q": draw(d_model, d_head), "W_K": draw(d_model, d_head),
                        "W_V": draw(d_model, d_head), "W_O": draw(d_head, d_model)},
                       torch.float32)
    out = {}
    for kind in KINDS:
        values = (src @ dst[kind]).pow(2).sum((1, 2)).sqrt()  # source i with destination i
        out[kind] = (float(values.mean()), float(values.std()))
    return out


def composition_scores(model: Any, *, kinds: Sequence[str] | str = KINDS, layers: Any = None,
                       dtype: torch.dtype = torch.float32, baseline_samples: int = 100,
                       seed: int = 0, progress: bool = True) -> xr.Dataset:
    """Q-, K- and V-composition between every earlier head and every later head.

    Implements SPEC.md § Composition scores (see the module docstring). Returns
    ``q_composition``, ``k_composition``, ``v_composition`` (as asked in ``kinds``) over
    (layer1, head1, layer2, head2): source head (layer1, head1) writes, destination head
    (layer2, head2) reads; values in [0, 1], exactly 0 unless layer1 < layer2. Also
    ``{kind}_baseline`` (mean over ``baseline_samples`` random pairs, NaN when 0 skips it) and
    its std in attrs.
    ``layers`` restricts both sides (int, slice, list); the big products run in ``dtype``
    (factors are built in float64).

    >>> import oculi_dsl as oculi
    >>> ds = composition_scores(oculi.testing.tiny_model("gpt2"), kinds="k", progress=False)
    >>> float(ds["k_composition"].sel(layer1=2, layer2=1).max())
    0.0
    """
    model = check_model(model)
    chosen = select_layers(model, layers)
    kind_list = _kinds(kinds)
    info = model.info
    h = info.n_heads
    factors = []
    for layer in tqdm(chosen, desc="composition: factors", unit="layer", disable=not progress):
        f = head_factors(folded_head_weights(model, layer))
        factors.append({k: v.to(dtype) for k, v in f.items()})
    n = len(chosen)
    out = {k: np.zeros((n, h, n, h), dtype=np.float64) for k in kind_list}
    order = np.argsort(chosen)
    bar = tqdm(total=max(n - 1, 0) * len(kind_list), desc="composition: scores", unit="layer",
               disable=not progress)
    with torch.no_grad():
        for i_pos, i in enumerate(order):
            later = [j for j in order[i_pos + 1:] if chosen[j] > chosen[i]]
            if not later:
                continue
            for kind in kind_list:
                dst = torch.cat([factors[j][kind] for j in later])
                scores = block_scores(factors[i]["src"], dst).double().clamp(max=1.0)
                out[kind][i, :, later, :] = scores.reshape(h, len(later), h).permute(1, 0, 2).numpy()
                bar.update(1)
    bar.close()
    data: dict[str, Any] = {f"{k}_composition": (("layer1", "head1", "layer2", "head2"), v)
                            for k, v in out.items()}
    if isinstance(baseline_samples, bool) or not isinstance(baseline_samples, int) or baseline_samples < 0:
        raise RecipeError(f"baseline_samples must be an int >= 0 (0 skips the baseline), got "
                          f"{baseline_samples!r}.")
    every = (random_baseline(info.d_model, info.d_head, samples=baseline_samples, seed=seed)
             if baseline_samples else {k: (float("nan"), float("nan")) for k in KINDS})
    baselines = {k: every[k] for k in kind_list}
    for k, (mean, _) in baselines.items():
        data[f"{k}_baseline"] = ((), mean)
    ds = xr.Dataset(data, coords={"layer1": chosen, "head1": np.arange(h),
                                  "layer2": chosen, "head2": np.arange(h)})
    ds.attrs = provenance(model, "composition.composition_scores", DEFINITION,
                          kinds=list(kind_list), baseline_samples=baseline_samples, seed=seed,
                          compute_dtype=str(dtype).removeprefix("torch."),
                          **{f"{k}_baseline_std": std for k, (_, std) in baselines.items()})
    return ds


def induction_circuits(model: Any, *, threshold: float = 0.4, scores: xr.Dataset | None = None,
                       composition: xr.Dataset | None = None, progress: bool = True,
                       **head_scores_kwargs: Any) -> xr.Dataset:
    """Previous-token heads paired with later induction heads, ranked by K-composition.

    Implements SPEC.md § Composition scores, "Induction circuit": heads with previous-token
    score > ``threshold`` and heads with induction score > ``threshold`` (from ``scores``, a
    :func:`~oculi_dsl.recipes.head_scores` Dataset, computed with ``head_scores_kwargs`` when
    not given) are paired whenever the previous-token head sits in an earlier layer; pairs are
    sorted by the K-composition (from ``composition``, or computed for the layers involved with
    a progress bar unless ``progress=False``; a ``composition`` over a subset of layers limits
    the pairs to heads in those layers).
    Returns one row per pair along dim ``circuit``: ``prev_layer``, ``prev_head``,
    ``induction_layer``, ``induction_head``, ``k_composition``, ``previous_token_score``,
    ``induction_score`` and the ``k_baseline``.

    >>> import oculi_dsl as oculi
    >>> ds = induction_circuits(oculi.testing.tiny_model("llama"), threshold=0.0,
    ...                         seq_len=8, batch=2, progress=False)
    >>> bool((ds["prev_layer"] < ds["induction_layer"]).all())
    True
    """
    from .heads import head_scores

    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise RecipeError(f"threshold must be a number in [0, 1], got {threshold!r}.")
    model = check_model(model)
    if scores is None:
        scores = head_scores(model, **head_scores_kwargs)
    prev = scores["previous_token"].transpose("layer", "head")
    ind = scores["induction"].transpose("layer", "head")
    prev_heads = [(int(a), int(b)) for a, b in np.argwhere(prev.values > threshold)]
    ind_heads = [(int(a), int(b)) for a, b in np.argwhere(ind.values > threshold)]
    layer_of = prev["layer"].values
    pairs = [(a, b) for a in prev_heads for b in ind_heads if layer_of[a[0]] < layer_of[b[0]]]
    if composition is None or "k_composition" not in composition:
        needed = sorted({int(layer_of[a[0]]) for a, _ in pairs} | {int(layer_of[b[0]]) for _, b in pairs})
        composition = composition_scores(model, kinds="k", layers=needed or [0],
                                         progress=progress)
    else:  # a given composition over some layers limits the circuits to those layers
        src, dst = set(composition["layer1"].values.tolist()), set(composition["layer2"].values.tolist())
        pairs = [(a, b) for a, b in pairs if layer_of[a[0]] in src and layer_of[b[0]] in dst]
    kcomp = composition["k_composition"]
    rows = []
    for (pl, ph), (il, ih) in pairs:
        lp, li = int(layer_of[pl]), int(layer_of[il])
        value = float(kcomp.sel(layer1=lp, head1=ph, layer2=li, head2=ih))
        rows.append((lp, ph, li, ih, value, float(prev.values[pl, ph]), float(ind.values[il, ih])))
    rows.sort(key=lambda r: -r[4])
    cols = list(zip(*rows, strict=True)) if rows else [()] * 7
    names = ("prev_layer", "prev_head", "induction_layer", "induction_head", "k_composition",
             "previous_token_score", "induction_score")
    data: dict[str, Any] = {
        name: (("circuit",), np.asarray(col, dtype=np.int64 if i < 4 else np.float64))
        for i, (name, col) in enumerate(zip(names, cols, strict=True))}
    data["k_baseline"] = ((), float(composition["k_baseline"]))
    ds = xr.Dataset(data, coords={"circuit": np.arange(len(rows))})
    ds.attrs = provenance(model, "composition.induction_circuits",
                          DEFINITION + "; induction circuit = previous-token heads (> θ) paired "
                          "with later induction heads (> θ), ranked by K-composition",
                          threshold=float(threshold), n_previous_token_heads=len(prev_heads),
                          composition_layers=composition["layer1"].values.tolist(),
                          n_induction_heads=len(ind_heads))
    return ds
