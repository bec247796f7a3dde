"""Direct logit attribution: the components add up to the model's logit on every family.

Norm weights and biases are perturbed (``_perturbed``), so a missing γ, a wrong Gemma (1 + w),
a forgotten LayerNorm centring or bias term, or a wrong frozen scale breaks the identities.
"""

from __future__ import annotations

import hf_reference as ref
import numpy as np
import pytest
import torch
from oculi_dsl.recipes import component_attribution, direct_logit_attribution
from oculi_dsl.recipes._errors import RecipeError

import oculi_dsl as oculi

from ._perturbed import perturbed

FAMILIES = ("llama", "gemma3", "gpt2")
PROMPT = "The capital of France is"


def _attn_terms(ds: object) -> np.ndarray:
    kinds = ds["component_kind"].values  # type: ignore[index]
    return ds["dla"].values[..., kinds == "attn"]  # type: ignore[index]


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_and_per_head_sums(family: str) -> None:
    model = perturbed(family)
    with ref.count_calls(model.hf) as calls:
        ds = direct_logit_attribution(model, PROMPT, " Paris")
    assert len(calls) == 1
    with torch.no_grad():
        logits = model.hf(torch.tensor([model.tokenizer(PROMPT).input_ids])).logits[0, -1]
    target = model.tokenizer(" Paris", add_special_tokens=False).input_ids[0]
    assert float(ds["logit"]) == pytest.approx(float(logits[target]), abs=1e-5)
    assert abs(float(ds["total"]) - float(ds["logit"])) < 1e-4
    assert float(ds["dla"].sum() + ds["bias"]) == pytest.approx(float(ds["total"]), abs=1e-9)
    heads = ds["head_dla"].sum("head").values + ds["head_bias"].values
    np.testing.assert_allclose(heads, _attn_terms(ds), atol=1e-5)
    assert ds["dla"].sizes["component"] == 1 + 2 * model.info.n_layers
    assert ds["component"].values[:3].tolist() == ["embed", "L0.attn", "L0.mlp"]


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_difference_and_batches(family: str) -> None:
    model = perturbed(family, seed=2)
    prompts = [PROMPT, "Once upon a time there was"]
    ds = direct_logit_attribution(model, prompts, [" Paris", " a"], wrong=" London")
    assert ds["dla"].dims == ("prompt", "component")
    assert ds["head_dla"].dims == ("prompt", "layer", "head")
    np.testing.assert_allclose(ds["total"].values, ds["logit"].values, atol=1e-4)
    for i, (prompt, target) in enumerate(zip(prompts, [" Paris", " a"], strict=True)):
        alone = direct_logit_attribution(model, prompt, target, wrong=" London")
        np.testing.assert_allclose(ds["dla"].values[i], alone["dla"].values, atol=1e-5)
        np.testing.assert_allclose(ds["head_dla"].values[i], alone["head_dla"].values, atol=1e-5)
    ids = [model.tokenizer(x, add_special_tokens=False).input_ids[0] for x in (" Paris", " London")]
    by_id = direct_logit_attribution(model, PROMPT, ids[0], wrong=ids[1])
    first = direct_logit_attribution(model, PROMPT, " Paris", wrong=" London")
    np.testing.assert_allclose(by_id["dla"].values, first["dla"].values)
    assert by_id.attrs["target_tokens"] == [" Paris"] and by_id.attrs["wrong_ids"] == [ids[1]]


def test_final_norm_scale_is_the_runs_rms() -> None:
    """DLA of the embedding by hand: embed · (γ ⊙ W_U[t]) / sqrt(mean(x_L²) + ε) (Llama)."""
    model = perturbed("llama", seed=3)
    ds = direct_logit_attribution(model, PROMPT, " Paris", per_head=False)
    ids = torch.tensor([model.tokenizer(PROMPT).input_ids])
    with torch.no_grad():
        out = model.hf(ids, output_hidden_states=True)
        embed = model.hf.model.embed_tokens(ids)[0, -1].double()
    captured: list[torch.Tensor] = []
    handle = model.hf.model.norm.register_forward_hook(lambda m, a, o: captured.append(a[0]))
    try:
        with torch.no_grad():
            model.hf(ids)
    finally:
        handle.remove()
    x_last = captured[0][0, -1].detach().double()
    sigma = (x_last.pow(2).mean() + model.hf.model.norm.variance_epsilon).sqrt()
    target = model.tokenizer(" Paris", add_special_tokens=False).input_ids[0]
    u = (model.hf.model.norm.weight * model.hf.lm_head.weight[target]).detach().double()
    assert float(ds["scale"]) == pytest.approx(float(sigma), rel=1e-6)
    assert float(ds["dla"].sel(component="embed")) == pytest.approx(float(embed @ u / sigma), rel=1e-5)
    assert out.hidden_states[-1] is not None  # HF's last hidden state is already normed


def test_soft_capped_logits_are_attributed_before_the_cap() -> None:
    model = perturbed("gemma3", final_logit_softcapping=0.5)
    ds = direct_logit_attribution(model, PROMPT, " Paris")
    with torch.no_grad():
        capped = model.hf(torch.tensor([model.tokenizer(PROMPT).input_ids])).logits[0, -1]
    target = model.tokenizer(" Paris", add_special_tokens=False).input_ids[0]
    pre_cap = 0.5 * torch.atanh(capped[target].double() / 0.5)
    assert float(ds["logit"]) == pytest.approx(float(pre_cap), abs=1e-4)
    assert abs(float(ds["total"] - ds["logit"])) < 1e-4
    assert ds.attrs["logit_softcapping"] == 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_component_attribution(family: str) -> None:
    model = perturbed(family, seed=4)
    ds = component_attribution(model, PROMPT, " Paris", wrong=" London")
    assert ds["attribution"].dims == ("layer", "component")
    assert ds["component"].values.tolist() == ["attn", "mlp"]
    full = direct_logit_attribution(model, PROMPT, " Paris", wrong=" London", per_head=False)
    np.testing.assert_allclose(ds["attribution"].sel(component="attn").values, _attn_terms(full))
    total = float(ds["attribution"].sum() + ds["embed"] + ds["bias"])
    assert abs(total - float(ds["logit"])) < 1e-4
    batched = component_attribution(model, [PROMPT, "Hi"], " Paris")
    assert batched["attribution"].dims == ("prompt", "layer", "component")


def test_gpt2_bias_terms_matter() -> None:
    """LayerNorm β and the c_proj bias are attributed, not dropped."""
    model = perturbed("gpt2", seed=5)
    ds = direct_logit_attribution(model, PROMPT, " Paris")
    beta = model.hf.transformer.ln_f.bias.detach().double()
    target = model.tokenizer(" Paris", add_special_tokens=False).input_ids[0]
    assert float(ds["bias"]) == pytest.approx(float(beta @ model.hf.lm_head.weight[target].detach().double()))
    assert np.abs(ds["head_bias"].values).min() > 0


def test_round_trips_netcdf(tmp_path: object) -> None:
    ds = direct_logit_attribution(oculi.testing.tiny_model("gemma3"), PROMPT, " Paris")
    back = oculi.open_dataset(oculi.to_netcdf(ds, tmp_path / "dla.nc"))  # type: ignore[operator]
    np.testing.assert_allclose(back["head_dla"].values, ds["head_dla"].values)
    assert back["component"].values.tolist() == ds["component"].values.tolist()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"target": "Paris London"}, "encodes to"),
    ({"target": 10**6}, "out of range"),
    ({"target": " Paris", "position": 40}, "position"),
    ({"target": [" Paris", " Rome"]}, "2 entries for 1 prompts"),
    ({"target": 3.5}, "token id"),
])
def test_errors(kwargs: dict[str, object], match: str) -> None:
    model = oculi.testing.tiny_model("llama")
    with pytest.raises(RecipeError, match=match):
        direct_logit_attribution(model, PROMPT, **kwargs)  # type: ignore[arg-type]
