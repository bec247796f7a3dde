"""attention_entropy on tiny models of every family: one forward pass, padding masked."""

from __future__ import annotations

import math

import hf_reference as ref
import numpy as np
import pytest
from oculi_dsl.recipes import attention_entropy, pattern_entropy
from oculi_dsl.recipes._errors import RecipeError

import oculi_dsl as oculi
from oculi_dsl.models import OculiModel

PROMPT = "The capital of France is Paris, and the capital of Italy is Rome"


def test_one_forward_and_bounds(tiny: OculiModel) -> None:
    with ref.count_calls(tiny.hf) as calls:
        ds = attention_entropy(tiny, PROMPT)
    assert len(calls) == 1
    n = ds.sizes["query"]
    assert ds["entropy"].dims == ("layer", "head", "query")
    assert ds["head_entropy"].dims == ("layer", "head")
    values = ds["entropy"].values
    assert (values >= 0).all() and (values <= math.log(n) + 1e-9).all()
    norm = ds["entropy_norm"].values
    assert np.nanmax(norm) <= 1 + 1e-6 and np.isnan(norm[..., 0]).all()
    assert list(ds["query_str"].values[:2]) == [tiny.tokenizer.decode([i]) for i in
                                                tiny.tokenizer(PROMPT).input_ids[:2]]
    assert ds.attrs["family"] == tiny.info.family and "SPEC.md" in ds.attrs["definition"]


def test_equals_pattern_entropy_of_a_saved_pattern(tiny: OculiModel) -> None:
    with oculi.trace(tiny, PROMPT) as t:
        t.layers[[1, 2]].attn.pattern.save("p")
    ds = attention_entropy(tiny, PROMPT, layers=[1, 2], skip_queries=2, drop_first_key=True)
    from oculi_dsl.recipes.entropy import sliding_windows

    ref_ds = pattern_entropy(t.saved["p"], skip_queries=2, drop_first_key=True,
                             window=sliding_windows(tiny, [1, 2]))
    np.testing.assert_allclose(ds["entropy"].values, ref_ds["entropy"].values)
    assert ds["layer"].values.tolist() == [1, 2]


def test_batched_prompts_match_single_runs(tiny: OculiModel) -> None:
    prompts = [PROMPT, "Once upon a time"]
    both = attention_entropy(tiny, prompts)
    assert both["entropy"].dims == ("layer", "prompt", "head", "query")
    short = attention_entropy(tiny, prompts[1])
    pad = both.sizes["query"] - short.sizes["query"]
    np.testing.assert_allclose(both["entropy"].isel(prompt=1).values[..., pad:],
                               short["entropy"].values, atol=1e-5)
    assert np.isnan(both["entropy"].isel(prompt=1).values[..., :pad]).all()
    assert both["n_valid"].isel(prompt=1).values[..., :pad].max() == 0


def test_sliding_window_layers_count_fewer_keys() -> None:
    model = oculi.testing.tiny_model("gemma3")  # window 4 on even layers
    ds = attention_entropy(model, PROMPT)
    n_valid = ds["n_valid"]
    assert int(n_valid.sel(layer=0).max()) == 4
    assert int(n_valid.sel(layer=1).max()) == ds.sizes["query"]
    assert np.nanmax(ds["entropy_norm"].values) <= 1 + 1e-6


def test_bad_layers() -> None:
    model = oculi.testing.tiny_model("llama")
    with pytest.raises(RecipeError, match="0..3"):
        attention_entropy(model, PROMPT, layers=[7])
