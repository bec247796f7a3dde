"""logit_lens: the last layer IS the model; every statistic matches a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oculi_dsl.recipes import format_predictions, logit_lens, plot_logit_lens

import oculi_dsl as oculi
from oculi_dsl.errors import OculiError
from oculi_dsl.models import OculiModel

from ._loops import count_forwards

PROMPT = "The capital of France is"


def _hf(model: OculiModel, text: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    ids = torch.tensor([model.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        out = model.hf(input_ids=ids, output_hidden_states=True)
    return out.logits[0], out.hidden_states


def _softcapped() -> OculiModel:
    return oculi.testing.tiny_model("gemma3", final_logit_softcapping=2.0)


@pytest.fixture(params=["llama", "gemma3", "gpt2", "gemma3-softcap"])
def lens_model(request: pytest.FixtureRequest) -> OculiModel:
    if request.param == "gemma3-softcap":
        return _softcapped()
    return oculi.testing.tiny_model(request.param)


def test_last_layer_equals_model_logits(lens_model: OculiModel) -> None:
    ds = logit_lens(lens_model, PROMPT, keep_logits=True)
    logits, _ = _hf(lens_model, PROMPT)
    last = ds["logits"].isel(layer=-1).values
    np.testing.assert_allclose(last, logits.numpy(), atol=1e-5, rtol=0)
    assert float(np.abs(ds["kl"].isel(layer=-1)).max()) < 1e-5
    assert (ds["final_rank"].isel(layer=-1).values == 0).all()
    np.testing.assert_array_equal(ds["final_id"].values, logits.argmax(-1).numpy())


def test_statistics_match_direct_computation(lens_model: OculiModel) -> None:
    ds = logit_lens(lens_model, PROMPT, top_k=5, target=" Paris", keep_logits=True)
    logits, hidden = _hf(lens_model, PROMPT)
    norm = lens_model.hf.get_submodule(lens_model.family.model_sites["final_norm"].module)
    head = lens_model.hf.get_output_embeddings()
    cap = getattr(lens_model.hf.config, "final_logit_softcapping", None)
    target = lens_model.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    ref_final = logits.log_softmax(-1)
    for layer in range(lens_model.info.n_layers):
        # HF hidden_states[l + 1] is resid_post of layer l, except the last one (already normed)
        h = hidden[layer + 1][0]
        with torch.no_grad():
            z = head(h if layer == lens_model.info.n_layers - 1 else norm(h))
        if cap:
            z = torch.tanh(z / cap) * cap
        np.testing.assert_allclose(ds["logits"].isel(layer=layer).values, z.numpy(), atol=1e-5)
        logp = z.log_softmax(-1)
        row = ds.isel(layer=layer)
        np.testing.assert_allclose(row["top_probs"].values, logp.exp().topk(5).values.numpy(), atol=1e-6)
        np.testing.assert_allclose(row["target_prob"].values, logp[:, target].exp().numpy(), atol=1e-6)
        kl = (ref_final.exp() * (ref_final - logp)).sum(-1).clamp_min(0)
        np.testing.assert_allclose(row["kl"].values, kl.numpy(), atol=1e-5)
        np.testing.assert_allclose(row["entropy"].values, -(logp.exp() * logp).sum(-1).numpy(), atol=1e-5)
        rank = (z > z.gather(-1, logits.argmax(-1, keepdim=True))).sum(-1)
        np.testing.assert_array_equal(row["final_rank"].values, rank.numpy())
        np.testing.assert_array_equal(row["target_rank"].values, (z > z[:, target:target + 1]).sum(-1).numpy())
    assert ds["top_tokens"].dims == ("layer", "token", "k")
    ids = ds["top_ids"].values[0, 0]
    assert list(ds["top_tokens"].values[0, 0]) == [lens_model.tokenizer.decode([i]) for i in ids]
    assert ds.attrs["target_token"] == " Paris"


@pytest.mark.parametrize("rows", [1, 4, 13])
def test_chunked_reductions_equal_one_chunk(tiny: OculiModel, monkeypatch: pytest.MonkeyPatch,
                                            rows: int) -> None:
    """Chunks of token ranges inside a layer (1, 4 rows) or of whole layers (13 rows, 2 layers of
    6 tokens) give the same statistics as one chunk for everything."""
    import sys

    whole = logit_lens(tiny, PROMPT, top_k=4, target=" Paris", keep_logits=True)
    module = sys.modules["oculi_dsl.recipes.logit_lens"]
    monkeypatch.setattr(module, "CHUNK_BYTES", rows * 4 * tiny.info.vocab)
    chunked = logit_lens(tiny, PROMPT, top_k=4, target=" Paris", keep_logits=True)
    for name in whole.data_vars:
        if whole[name].dtype.kind in "iuU":
            np.testing.assert_array_equal(chunked[name].values, whole[name].values, err_msg=name)
        else:
            np.testing.assert_allclose(chunked[name].values, whole[name].values, atol=1e-6, err_msg=name)


def test_chunk_blocks_cover_every_row_once() -> None:
    from oculi_dsl.recipes.logit_lens import _chunks

    for n_layers, n_tok, budget, last in [(30, 10, 165, 29), (30, 10, 165, -1), (4, 6, 13, 3),
                                          (4, 6, 4, 3), (5, 77, 30, 2), (3, 1, 1, 0)]:
        blocks = _chunks(n_layers, n_tok, budget, last)
        cells = [(lay, tok) for l0, l1, a, b in blocks for lay in range(l0, l1) for tok in range(a, b)]
        assert sorted(cells) == [(lay, tok) for lay in range(n_layers) for tok in range(n_tok)]
        assert all((l1 - l0) * (b - a) <= budget for l0, l1, a, b in blocks)
        assert all(l1 - l0 == 1 for l0, l1, _, _ in blocks if l0 <= last < l1)  # the model's own


def test_one_forward_pass_and_selection(tiny: OculiModel) -> None:
    with count_forwards(tiny) as calls:
        ds = logit_lens(tiny, PROMPT, layers=[0, 2], positions=[-1, 1], top_k=3)
    assert len(calls) == 1
    n = len(tiny.tokenizer(PROMPT)["input_ids"])
    assert list(ds["layer"].values) == [0, 2] and list(ds["token"].values) == [n - 1, 1]
    full = logit_lens(tiny, PROMPT, top_k=3)
    np.testing.assert_allclose(ds["top_probs"].values,
                               full["top_probs"].sel(layer=[0, 2], token=[n - 1, 1]).values, atol=1e-6)
    # the default target is the model's own final prediction at the last position
    assert full.attrs["target_id"] == int(full["final_id"].values[-1])


def test_table_plots_and_netcdf(tmp_path) -> None:
    model = oculi.testing.tiny_model("llama")
    ds = logit_lens(model, PROMPT, top_k=4)
    table = format_predictions(ds, token=-1, k=2)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("Layer  2: [(")
    word, prob = str(ds["top_tokens"].values[2, -1, 0]), float(ds["top_probs"].values[2, -1, 0])
    assert f"({word!r}, {round(prob, 4)!r})" in lines[2]
    assert len(format_predictions(ds, every=2).splitlines()) == 3  # 0, 2 and the last layer
    for kind in ("heatmap", "trajectory"):
        plot_logit_lens(ds, str(tmp_path / f"{kind}.png"), kind=kind)
        assert (tmp_path / f"{kind}.png").stat().st_size > 2000
    back = oculi.open_dataset(oculi.to_netcdf(ds, tmp_path / "lens.nc"))
    assert list(back["top_tokens"].values[0, 0]) == list(ds["top_tokens"].values[0, 0])
    np.testing.assert_array_equal(back["top_probs"].values, ds["top_probs"].values)


@pytest.mark.parametrize("kwargs, match", [
    ({"top_k": 0}, "top_k=0"),
    ({"layers": [9]}, "0..3"),
    ({"positions": [40]}, "positions=\\[40\\]"),
    ({"target": " capital of"}, "encodes to 2 tokens"),
    ({"target": 100000}, "out of range"),
])
def test_errors(kwargs, match) -> None:
    with pytest.raises(OculiError, match=match):
        logit_lens(oculi.testing.tiny_model("llama"), PROMPT, **kwargs)


def test_refuses_a_list_of_prompts_and_bad_plot_kind() -> None:
    model = oculi.testing.tiny_model("llama")
    with pytest.raises(OculiError, match="ONE prompt"):
        logit_lens(model, [PROMPT, PROMPT])
    with pytest.raises(OculiError, match="token=7 is out of range"):
        format_predictions(logit_lens(model, PROMPT), token=7)
    with pytest.raises(OculiError, match="'heatmap' or 'trajectory'"):
        plot_logit_lens(logit_lens(model, PROMPT), kind="bars")
