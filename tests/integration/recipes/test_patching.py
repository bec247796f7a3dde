"""activation_patching: equal to a plain per-cell hook loop, SPEC recovery, batching, errors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from oculi_dsl.recipes import (
    activation_patching,
    plot_recovery,
    recovery_matrix,
    summary,
    top_cells,
)
from oculi_dsl.recipes._errors import RecipeError
from oculi_dsl.recipes.patching import RecoveryWarning

import oculi_dsl as oculi
from oculi_dsl.errors import OculiError, SiteError
from oculi_dsl.models import OculiModel

from ._loops import count_forwards, patch_loop

CLEAN, CORRUPT = "The capital of France is", "The capital of Germany is"


def _ids(model: OculiModel, text: str) -> list[int]:
    return list(model.tokenizer(text)["input_ids"])


def _prob(target: int):
    return lambda logits: logits.softmax(-1)[target]


def test_token_sweep_equals_hook_loop(tiny: OculiModel) -> None:
    sites = ["resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out"]
    ds = activation_patching(tiny, CLEAN, CORRUPT, sites=sites, tokens="all", chunk_size=9,
                             progress=False)
    target = ds.attrs["target_id"]
    cells = [(s, lay, None, tok) for s in sites for lay in ds["layer"].values.tolist()
             for tok in ds["token"].values.tolist()]
    ref = patch_loop(tiny, _ids(tiny, CLEAN), _ids(tiny, CORRUPT), cells, -1, _prob(target))
    got = ds["metric"].values.reshape(-1)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # the unpatched runs, through the same hooks-free path
    base = patch_loop(tiny, _ids(tiny, CLEAN), _ids(tiny, CLEAN), [("resid_post", 0, None, 0)], -1,
                      _prob(target))
    assert abs(float(ds["metric_clean"]) - base[0]) < 1e-5
    rec = (got - float(ds["metric_corrupt"])) / (float(ds["metric_clean"]) - float(ds["metric_corrupt"]))
    np.testing.assert_allclose(ds["recovery"].values.reshape(-1), rec, rtol=1e-9, atol=1e-12)


def test_whole_site_and_heads_equal_hook_loop(tiny: OculiModel) -> None:
    ds = activation_patching(tiny, CLEAN, CORRUPT, sites=["attn_out", "mlp_out"], metric="logit_diff",
                             wrong=" Germany", target=" France", progress=False)
    t, w = ds.attrs["target_id"], ds.attrs["wrong_id"]
    cells = [(s, lay, None, None) for s in ("attn.out", "mlp.out") for lay in range(tiny.info.n_layers)]
    ref = patch_loop(tiny, _ids(tiny, CLEAN), _ids(tiny, CORRUPT), cells, -1,
                     lambda lg: lg[t] - lg[w])
    np.testing.assert_allclose(ds["metric"].values.reshape(-1), ref, atol=1e-5, rtol=0)

    heads = activation_patching(tiny, CLEAN, CORRUPT, sites=["head"], layers=[1, 3], tokens=[-1, -2],
                                progress=False)
    assert heads["recovery"].dims == ("site", "layer", "head", "token")
    target = heads.attrs["target_id"]
    n = len(_ids(tiny, CLEAN))
    cells = [("attn.z", lay, h, tok) for lay in (1, 3) for h in range(tiny.info.n_heads)
             for tok in (n - 1, n - 2)]
    ref = patch_loop(tiny, _ids(tiny, CLEAN), _ids(tiny, CORRUPT), cells, -1, _prob(target))
    np.testing.assert_allclose(heads["metric"].values.reshape(-1), ref, atol=1e-5, rtol=0)


def test_noising_direction_equals_hook_loop() -> None:
    model = oculi.testing.tiny_model("llama")
    ds = activation_patching(model, CLEAN, CORRUPT, sites=["mlp.out"], tokens="all",
                             direction="noise", metric="kl", progress=False)
    clean_ids = torch.tensor([_ids(model, CLEAN)])
    with torch.no_grad():
        ref_logp = model.hf(input_ids=clean_ids).logits[0, -1].log_softmax(-1)

    def kl(logits: torch.Tensor) -> float:
        return float((ref_logp.exp() * (ref_logp - logits.log_softmax(-1))).sum())
    cells = [("mlp.out", lay, None, tok) for lay in range(4) for tok in ds["token"].values.tolist()]
    ref = patch_loop(model, _ids(model, CORRUPT), _ids(model, CLEAN), cells, -1, kl)
    np.testing.assert_allclose(ds["metric"].values.reshape(-1), ref, atol=1e-5, rtol=0)
    m_clean, m_corr = float(ds["metric_clean"]), float(ds["metric_corrupt"])
    assert m_clean == 0.0 and m_corr > 0
    expected = (ds["metric"].values - m_clean) / (m_corr - m_clean)
    np.testing.assert_allclose(ds["recovery"].values, expected)


def test_restoring_last_resid_post_recovers_fully_and_later_positions_give_zero(tiny: OculiModel) -> None:
    last = tiny.info.n_layers - 1
    ds = activation_patching(tiny, CLEAN, CORRUPT, sites=["resid_post"], layers=[last],
                             tokens="all", metric="logit_diff", target=" France", wrong=" Germany",
                             progress=False)
    assert abs(float(ds["recovery"].isel(site=0, layer=0, token=-1)) - 1.0) < 1e-5
    # measured at the 'France'/'Germany' position: positions after it cannot influence it
    n = ds.sizes["token"]
    early = activation_patching(tiny, CLEAN, CORRUPT, sites=["resid_post", "mlp.out"], tokens="all",
                                position=n - 2, progress=False)
    later = early["recovery"].sel(token=n - 1)
    assert (later.values == 0.0).all()
    assert (early["metric"].sel(token=n - 1).values == float(early["metric_corrupt"])).all()


def test_user_metric_on_proxies(tiny: OculiModel) -> None:
    target = _ids(tiny, " France")[-1]
    ds = activation_patching(tiny, CLEAN, CORRUPT, sites=["resid_post"], tokens=[-2],
                             metric=lambda logits: logits.log_softmax(-1)[target], progress=False)
    ref = patch_loop(tiny, _ids(tiny, CLEAN), _ids(tiny, CORRUPT),
                     [("resid_post", lay, None, len(_ids(tiny, CLEAN)) - 2) for lay in range(4)], -1,
                     lambda lg: lg.log_softmax(-1)[target])
    np.testing.assert_allclose(ds["metric"].values.reshape(-1), ref, atol=1e-5, rtol=0)
    assert ds.attrs["metric"] == "<lambda>"


def test_sweep_runs_in_few_forward_passes() -> None:
    model = oculi.testing.tiny_model("llama", n_layers=4)
    clean, corrupt = "Paris is in France", "Rome is in France"  # differ at position 1 of 5
    assert len(_ids(model, clean)) == 5 == len(_ids(model, corrupt))
    for chunk in (7, 16, 60):
        with count_forwards(model) as calls:
            ds = activation_patching(model, clean, corrupt, sites=["resid_post", "attn.out", "mlp.out"],
                                     tokens="all", chunk_size=chunk, progress=False)
        cells = 4 * 3 * 5
        assert ds["recovery"].size == cells
        assert ds.attrs["cells"] == 4 * 3 * 4  # position 0 (BOS) is identical in both runs
        assert len(calls) <= math.ceil(cells / chunk) + 2, (chunk, len(calls))
        assert len(calls) == ds.attrs["forward_passes"]
    # the same cells one per pass give the same numbers
    single = activation_patching(model, clean, corrupt, sites=["resid_post", "attn.out", "mlp.out"],
                                 tokens="all", chunk_size=1, progress=False)
    np.testing.assert_allclose(single["metric"].values, ds["metric"].values, atol=1e-6)


def test_memory_budget_sets_chunks() -> None:
    model = oculi.testing.tiny_model("gpt2")
    small = activation_patching(model, CLEAN, CORRUPT, sites=["resid_post"], tokens="all",
                                memory_budget="60KB", progress=False)
    big = activation_patching(model, CLEAN, CORRUPT, sites=["resid_post"], tokens="all",
                              progress=False)
    assert small.attrs["chunk_size"] < big.attrs["chunk_size"]
    # one chunk, plus the baseline pass, plus at most one pass added to resume the rest later
    assert small.attrs["forward_passes"] > big.attrs["forward_passes"] <= 3
    np.testing.assert_allclose(small["metric"].values, big["metric"].values, atol=1e-6)


def test_equal_runs_warn_and_give_zero(tiny: OculiModel) -> None:
    with pytest.warns(RecoveryWarning, match="differ by less than 1e-10"):
        ds = activation_patching(tiny, CLEAN, CLEAN, sites=["mlp.out"], progress=False)
    assert (ds["recovery"].values == 0).all()


def test_aliases_and_result_helpers(tmp_path) -> None:
    model = oculi.testing.tiny_model("gemma3")
    ds = activation_patching(model, CLEAN, CORRUPT, sites=["residual_pre_attn", "residual_post_attn",
                             "residual_post_mlp", "attn_out", "mlp_out"], progress=False)
    assert list(ds["site"].values) == ["resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out"]
    text = summary(ds)
    assert "Clean metric:" in text and "Corrupted metric:" in text and "recovery=" in text
    top = top_cells(ds, 3)
    assert len(top) == 3 and top[0]["recovery"] >= top[1]["recovery"] >= top[2]["recovery"]
    assert recovery_matrix(ds).dims == ("layer", "site")
    fig = plot_recovery(ds, str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").stat().st_size > 1000
    fig.clf()
    path = oculi.to_netcdf(ds, tmp_path / "p.nc")
    back = oculi.open_dataset(path)
    np.testing.assert_array_equal(back["recovery"].values, ds["recovery"].values)
    assert back.attrs["definition"] == ds.attrs["definition"]


def test_head_and_token_cells_in_resumed_passes_equal_hook_loop(tiny: OculiModel) -> None:
    """Per-head z at every position, 5 cells a pass: later passes resume at their first layer
    and position (past= keys/values), and every cell equals its own plain forward."""
    ds = activation_patching(tiny, CLEAN, CORRUPT, sites=["head"], heads=[0, 3], tokens="all",
                             chunk_size=5, progress=False)
    target = ds.attrs["target_id"]
    cells = [("attn.z", lay, h, tok) for lay in range(tiny.info.n_layers) for h in (0, 3)
             for tok in ds["token"].values.tolist()]
    ref = patch_loop(tiny, _ids(tiny, CLEAN), _ids(tiny, CORRUPT), cells, -1, _prob(target))
    np.testing.assert_allclose(ds["metric"].values.reshape(-1), ref, atol=1e-5, rtol=0)
    assert ds.attrs["forward_passes"] <= math.ceil(ds.attrs["cells"] / 5) + 2


def test_q_k_v_pattern_per_head_run() -> None:
    model = oculi.testing.tiny_model("llama")
    ds = activation_patching(model, CLEAN, CORRUPT, sites=["attn.q", "attn.pattern"], heads="all",
                             tokens=[-1], layers=[0, 3], progress=False)
    assert ds["recovery"].shape == (2, 2, 4, 1)
    kv = activation_patching(model, CLEAN, CORRUPT, sites=["attn.k", "attn.v"], heads=[0, 1],
                             layers=[2], progress=False)
    assert kv["recovery"].shape == (2, 1, 2)
    assert np.isfinite(kv["metric"].values).all() and np.isfinite(ds["metric"].values).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"sites": ["mlp_output"]}, "Did you mean 'mlp_out'"),
    ({"sites": ["mlp.pre"]}, "gated"),
    ({"sites": []}, "empty"),
    ({"sites": ["head", "mlp.out"]}, "needs sites with a head dim"),
    ({"metric": "accuracy"}, "Valid: prob, logit_diff, kl"),
    ({"direction": "up"}, "'denoise'"),
    ({"tokens": [9]}, "valid are 0..5"),
    ({"layers": [4]}, "0..3"),
    ({"heads": [7], "sites": ["head"]}, "valid are 0..3"),
    ({"target": " Paris France"}, "encodes to"),
    ({"position": 6}, "out of range"),
    ({"chunk_size": 0}, "positive int"),
    ({"memory_budget": "lots"}, "not a size"),
])
def test_errors_show_value_and_fix(kwargs, match) -> None:
    model = oculi.testing.tiny_model("llama")
    args = {"sites": ["resid_post"], "progress": False, **kwargs}
    with pytest.raises(OculiError, match=match):
        activation_patching(model, CLEAN, CORRUPT, **args)


def test_unequal_lengths_are_refused() -> None:
    model = oculi.testing.tiny_model("llama")
    with pytest.raises(RecipeError, match=r"has 6 tokens .* 9 .*same length"):
        activation_patching(model, CLEAN, "The capital of Italy is", sites=["resid_post"])
    with pytest.raises(RecipeError, match="ONE prompt"):
        activation_patching(model, [CLEAN, CLEAN], CORRUPT)
    with pytest.raises(SiteError):
        activation_patching(model, CLEAN, CORRUPT, sites=[3])


def test_logit_diff_defaults_and_warning_free(tiny: OculiModel) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = activation_patching(tiny, CLEAN, CORRUPT, sites=["resid_post"], wrong=" Germany",
                                 target=" France", progress=False)
    assert ds.attrs["metric"] == "logit_diff"
    assert ds.attrs["wrong_token"] == " Germany" and ds.attrs["target_token"] == " France"
