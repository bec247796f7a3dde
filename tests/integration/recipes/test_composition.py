"""Composition scores equal a dense d × d computation of SPEC's Frobenius formula.

The dense reference below reads the raw HF weights itself (its own slicing, GQA grouping and
norm folding per family), forms W_OV and W_QK as d × d matrices and takes the ratio of norms.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oculi_dsl.recipes import composition_scores, head_scores, induction_circuits
from oculi_dsl.recipes._errors import RecipeError

from oculi_dsl.models import OculiModel

from ._perturbed import perturbed

FAMILIES = ("llama", "gemma3", "gpt2")


def _w(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


def dense_heads(model: OculiModel, layer: int, group: str = "repeat_kv") -> list[dict[str, torch.Tensor]]:
    """Per-head (W_Q, W_K, W_V, W_O) with norms folded, read straight from the HF modules."""
    info = model.info
    h, kv, dh, d = info.n_heads, info.n_kv_heads, info.d_head, info.d_model
    block = model.layers[layer]
    heads = []
    for i in range(h):
        g = i // (h // kv) if group == "repeat_kv" else i % kv
        if info.family == "gpt2":
            w = _w(block.attn.c_attn.weight)
            wq, wk, wv = (w[:, j * d + i * dh: j * d + (i + 1) * dh] for j in range(3))
            wo = _w(block.attn.c_proj.weight)[i * dh:(i + 1) * dh]
            gamma = _w(block.ln_1.weight)
            wo = wo - wo.mean(1, keepdim=True)
        else:
            attn = block.self_attn
            wq = _w(attn.q_proj.weight)[i * dh:(i + 1) * dh].T
            wk = _w(attn.k_proj.weight)[g * dh:(g + 1) * dh].T
            wv = _w(attn.v_proj.weight)[g * dh:(g + 1) * dh].T
            wo = _w(attn.o_proj.weight)[:, i * dh:(i + 1) * dh].T
            gamma = _w(block.input_layernorm.weight)
            if info.family == "gemma3":
                gamma = 1 + gamma
                wq = wq * (1 + _w(attn.q_norm.weight))
                wk = wk * (1 + _w(attn.k_norm.weight))
                wo = wo * (1 + _w(block.post_attention_layernorm.weight))
        heads.append({"Q": gamma[:, None] * wq, "K": gamma[:, None] * wk,
                      "V": gamma[:, None] * wv, "O": wo})
    return heads


def dense_scores(model: OculiModel, group: str = "repeat_kv") -> dict[str, np.ndarray]:
    info = model.info
    n, h = info.n_layers, info.n_heads
    heads = [dense_heads(model, layer, group) for layer in range(n)]
    out = {k: np.zeros((n, h, n, h)) for k in "qkv"}

    def ratio(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.linalg.norm(a @ b) / (torch.linalg.norm(a) * torch.linalg.norm(b)))

    for l1 in range(n):
        for h1 in range(h):
            ov = heads[l1][h1]["V"] @ heads[l1][h1]["O"]
            for l2 in range(l1 + 1, n):
                for h2 in range(h):
                    t = heads[l2][h2]
                    qk = t["Q"] @ t["K"].T
                    out["q"][l1, h1, l2, h2] = ratio(ov, qk)
                    out["k"][l1, h1, l2, h2] = ratio(ov, qk.T)
                    out["v"][l1, h1, l2, h2] = ratio(ov, t["V"] @ t["O"])
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_dense_frobenius_formula(family: str) -> None:
    model = perturbed(family)
    ds = composition_scores(model, progress=False)
    dense = dense_scores(model)
    for kind in "qkv":
        got = ds[f"{kind}_composition"]
        assert got.dims == ("layer1", "head1", "layer2", "head2")
        np.testing.assert_allclose(got.values, dense[kind], atol=1e-5, rtol=0)
    exact = composition_scores(model, dtype=torch.float64, progress=False, kinds="k")
    np.testing.assert_allclose(exact["k_composition"].values, dense["k"], atol=1e-10, rtol=0)


def test_bounds_and_causal_zeros(tiny: OculiModel) -> None:
    ds = composition_scores(tiny, progress=False)
    layer1 = ds["layer1"].values[:, None, None, None]
    layer2 = ds["layer2"].values[None, None, :, None]
    for kind in "qkv":
        values = ds[f"{kind}_composition"].values
        assert ((values >= 0) & (values <= 1)).all()
        assert (values[np.broadcast_to(layer1 >= layer2, values.shape)] == 0).all()
        assert (values[np.broadcast_to(layer1 < layer2, values.shape)] > 0).all()
        baseline = float(ds[f"{kind}_baseline"])
        assert baseline == pytest.approx(tiny.info.d_model ** -0.5, rel=0.15)
    assert "Composition scores" in ds.attrs["definition"]


def test_gqa_grouping_two_kv_heads() -> None:
    """4 query heads share 2 KV heads as HF repeat_kv does: heads 0,1 → KV 0; heads 2,3 → KV 1."""
    model = perturbed("llama", seed=7)
    assert (model.info.n_heads, model.info.n_kv_heads) == (4, 2)
    ds = composition_scores(model, dtype=torch.float64, progress=False)
    right, wrong = dense_scores(model), dense_scores(model, group="modulo")
    np.testing.assert_allclose(ds["k_composition"].values, right["k"], atol=1e-10)
    assert np.abs(ds["k_composition"].values - wrong["k"]).max() > 1e-3
    # give heads 1 and 2 the queries of head 0: head 1 (same KV head) becomes a copy of head 0
    # as a destination of Q- and K-composition; head 2 (other KV head) does not
    with torch.no_grad():
        for layer in model.layers:
            q = layer.self_attn.q_proj.weight
            dh = model.info.d_head
            q[dh:2 * dh] = q[:dh]
            q[2 * dh:3 * dh] = q[:dh]
    copied = composition_scores(model, dtype=torch.float64, progress=False, kinds=("q", "k"))
    for kind in ("q", "k"):
        values = copied[f"{kind}_composition"].values[:, :, 1:]
        np.testing.assert_allclose(values[..., 1], values[..., 0], atol=1e-12)
        assert np.abs(values[..., 2] - values[..., 0]).max() > 1e-3
    # W_OV stays per query head: sources 0 and 1 (same V) still differ through W_O
    assert np.abs(ds["v_composition"].values[0, 0] - ds["v_composition"].values[0, 1]).max() > 1e-3


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_mqa_and_no_grouping(kv_heads: int) -> None:
    model = perturbed("llama", num_key_value_heads=kv_heads)
    ds = composition_scores(model, progress=False)
    np.testing.assert_allclose(ds["q_composition"].values, dense_scores(model)["q"], atol=1e-5)


def test_layer_selection_and_kinds() -> None:
    model = perturbed("gemma3")
    full = composition_scores(model, progress=False)
    part = composition_scores(model, layers=[3, 1], kinds=["v"], progress=False)
    assert list(part.data_vars) == ["v_composition", "v_baseline"]
    assert part["layer1"].values.tolist() == [3, 1]
    np.testing.assert_allclose(part["v_composition"].sel(layer1=1, layer2=3).values,
                               full["v_composition"].sel(layer1=1, layer2=3).values, atol=1e-6)
    assert float(part["v_composition"].sel(layer1=3, layer2=1).max()) == 0.0
    with pytest.raises(RecipeError, match="kinds"):
        composition_scores(model, kinds="qk")


def test_induction_circuits_structure() -> None:
    model = perturbed("llama")
    scores = head_scores(model, seq_len=8, batch=2)
    circuits = induction_circuits(model, threshold=0.0, scores=scores)
    n_heads = model.info.n_heads
    expected = sum(n_heads * n_heads for a in range(4) for b in range(4) if a < b)
    assert circuits.sizes["circuit"] == expected
    values = circuits["k_composition"].values
    assert (np.diff(values) <= 0).all()
    assert (circuits["prev_layer"] < circuits["induction_layer"]).all()
    full = composition_scores(model, kinds="k", progress=False)
    first = circuits.isel(circuit=0)
    assert float(first["k_composition"]) == pytest.approx(float(full["k_composition"].sel(
        layer1=int(first.prev_layer), head1=int(first.prev_head),
        layer2=int(first.induction_layer), head2=int(first.induction_head))), abs=1e-6)
    assert float(first["previous_token_score"]) == pytest.approx(float(scores["previous_token"].sel(
        layer=int(first.prev_layer), head=int(first.prev_head))))
    none = induction_circuits(model, threshold=1.0, scores=scores)
    assert none.sizes["circuit"] == 0 and "k_baseline" in none
    with pytest.raises(RecipeError, match="threshold"):
        induction_circuits(model, threshold=-1, scores=scores)


def test_baseline_can_be_skipped() -> None:
    model = perturbed("gpt2")
    ds = composition_scores(model, kinds="v", baseline_samples=0, progress=False)
    assert np.isnan(float(ds["v_baseline"]))
    assert model.info.n_layers == ds.sizes["layer1"]
    with pytest.raises(RecipeError, match="baseline_samples"):
        composition_scores(model, baseline_samples=-1, progress=False)
