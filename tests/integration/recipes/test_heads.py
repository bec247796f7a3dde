"""Head scores and classification on tiny models of every family (SPEC § Head-type scores)."""

from __future__ import annotations

import hf_reference as ref
import numpy as np
import pytest
import torch
from oculi_dsl.recipes import (
    classify_heads,
    detect_heads,
    head_scores,
    random_repeated_tokens,
    rrt_scores,
    text_scores,
)
from oculi_dsl.recipes._errors import RecipeError

import oculi_dsl as oculi
from oculi_dsl.models import OculiModel

KINDS = ("induction", "previous_token", "duplicate_token", "bos", "self")


def test_scores_in_unit_interval_from_one_forward(tiny: OculiModel) -> None:
    with ref.count_calls(tiny.hf) as calls:
        ds = head_scores(tiny, seq_len=10, batch=3)
    assert len(calls) == 1
    for kind in KINDS:
        assert ds[kind].dims == ("layer", "head")
        assert ((ds[kind] >= 0) & (ds[kind] <= 1)).all(), kind
    assert np.isfinite(float(ds["loss_first_half"])) and np.isfinite(float(ds["loss_second_half"]))
    assert ds["loss"].sizes["token"] == ds["tokens"].sizes["token"]
    assert "repeated random tokens" in ds.attrs["definition"]


def test_in_trace_reduction_equals_full_pattern_formula(tiny: OculiModel) -> None:
    ds = head_scores(tiny, seq_len=7, batch=2, seed=4)
    ids, bos = random_repeated_tokens(tiny, 7, 2, seed=4)
    assert torch.equal(torch.as_tensor(ds["tokens"].values), ids)
    with oculi.trace(tiny, ids) as t:
        t.layers[:].attn.pattern.save("p")
        t.logits.save("logits")
    full = rrt_scores(t.saved["p"], 7, bos=bos)
    for kind in KINDS:
        np.testing.assert_allclose(ds[kind].values, full[kind].values, atol=1e-6)
    # loss of the first half, by hand from the logits
    logp = t.saved["logits"].log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    o = int(bos)
    assert float(ds["loss_first_half"]) == pytest.approx(float(-logp[:, : o + 6].mean()), rel=1e-5)
    assert float(ds["loss_second_half"]) == pytest.approx(float(-logp[:, o + 6:].mean()), rel=1e-5)


def test_bos_per_tokenizer_and_ordinary_tokens(tiny: OculiModel) -> None:
    ids, bos = random_repeated_tokens(tiny, 20, 4, seed=0)
    expected_bos = tiny.info.family != "gpt2"  # tiny Llama / Gemma tokenizers add BOS
    assert bos is expected_bos
    o = int(bos)
    assert ids.shape == (4, o + 40)
    if bos:
        assert (ids[:, 0] == tiny.tokenizer.bos_token_id).all()
    assert torch.equal(ids[:, o:o + 20], ids[:, o + 20:])
    special = set(tiny.tokenizer.all_special_ids)
    assert not special & set(ids[:, o:].flatten().tolist())
    again, _ = random_repeated_tokens(tiny, 20, 4, seed=0)
    other, _ = random_repeated_tokens(tiny, 20, 4, seed=1)
    assert torch.equal(ids, again) and not torch.equal(ids, other)
    forced, b = random_repeated_tokens(tiny, 5, 1, bos=False)
    assert not b and forced.shape == (1, 10)


def test_detect_heads_on_text(tiny: OculiModel) -> None:
    text = "the cat sat on the mat and the cat sat on the mat"
    with ref.count_calls(tiny.hf) as calls:
        ds = detect_heads(tiny, text, exclude_bos=True)
    assert len(calls) == 1
    assert set(KINDS) <= set(ds.data_vars)
    for name in ds.data_vars:
        assert ds[name].dims == ("layer", "head")
        assert ((ds[name] >= 0) & (ds[name] <= 1 + 1e-9)).all(), name
    with oculi.trace(tiny, text) as t:
        t.layers[:].attn.pattern.save("p")
    by_hand = text_scores(t.saved["p"], tiny.tokenizer(text).input_ids, exclude_bos=True)
    for name in ds.data_vars:
        np.testing.assert_allclose(ds[name].values, by_hand[name].values, atol=1e-6)


def test_detect_heads_pools_padded_prompts(tiny: OculiModel) -> None:
    texts = ["the cat sat on the mat", "a dog and a dog and a dog ran"]
    both = detect_heads(tiny, texts)
    single = [detect_heads(tiny, x) for x in texts]
    masked = np.mean([s["duplicate_token_masked"].values for s in single], 0)
    np.testing.assert_allclose(both["duplicate_token_masked"].values, masked, atol=1e-5)


def test_classify_runs_head_scores_for_a_model(tiny: OculiModel) -> None:
    out = classify_heads(tiny, threshold=0.0, seq_len=6, batch=2)
    assert out["label"].dims == ("layer", "head")
    assert set(out["label"].values.flatten()) <= set(KINDS)
    best = np.max([out[k].values for k in KINDS], 0)
    np.testing.assert_allclose(out["score"].values, best)
    assert out.attrs["seq_len"] == 6


def test_result_round_trips_netcdf(tmp_path: object) -> None:
    model = oculi.testing.tiny_model("llama")
    ds = classify_heads(head_scores(model, seq_len=5, batch=2))
    path = oculi.to_netcdf(ds, tmp_path / "heads.nc")  # type: ignore[operator]
    back = oculi.open_dataset(path)
    assert back["label"].values.tolist() == ds["label"].values.tolist()
    np.testing.assert_allclose(back["induction"].values, ds["induction"].values)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"seq_len": 1}, "seq_len"), ({"batch": 0}, "batch"), ({"layers": [9]}, "layers"),
])
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        head_scores(oculi.testing.tiny_model("gpt2"), **kwargs)  # type: ignore[arg-type]


def test_bos_requested_without_a_bos_token() -> None:
    model = oculi.testing.tiny_model("gpt2")
    model.tokenizer.bos_token = None
    with pytest.raises(RecipeError, match="bos_token_id"):
        random_repeated_tokens(model, 5, 1, bos=True)
