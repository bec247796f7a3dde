"""Saved sites of the real default model (SmolLM2-135M-Instruct) equal plain HF values.

The slow-lane twin of tests/integration/test_sites.py, plus a clean→corrupted swap, batching
and early stop on 30 real layers. References are HF ``output_hidden_states`` and hand-written
forward hooks (``hf_reference``).
"""

from __future__ import annotations

import hf_reference as ref
import pytest
import torch

import oculi_dsl as oculi
from oculi_dsl.models import OculiModel

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
CLEAN, BAD = "The Eiffel Tower is in Paris", "The Eiffel Tower is in Rome"


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def traced(default_model: OculiModel) -> oculi.Trace:
    with oculi.trace(default_model, PROMPT) as t:
        t.layers[:].resid_pre.save("pre")
        t.layers[:].resid_mid.save("mid")
        t.layers[:].resid_post.save("post")
        t.layers[:].attn.out.save("attn_out")
        t.layers[:].mlp.out.save("mlp_out")
        t.layers[7].mlp.act.save("act")
        t.layers[7].mlp.gate.save("gate")
        t.layers[7].mlp.up.save("up")
        t.embed.save("embed")
        t.final_norm.save("final_norm")
        t.logits.save("logits")
    return t


@pytest.fixture(scope="module")
def hidden(default_model: OculiModel) -> tuple[torch.Tensor, ...]:
    return ref.hf_forward(default_model, ref.ids_of(default_model, PROMPT),
                          output_hidden_states=True).hidden_states


def test_resid_post_and_pre_equal_hidden_states(default_model: OculiModel, traced: oculi.Trace,
                                                hidden: tuple[torch.Tensor, ...]) -> None:
    n = default_model.info.n_layers
    assert n == 30 and len(hidden) == n + 1
    post, pre = traced.saved["post"], traced.saved["pre"]
    for layer in range(n - 1):
        _close(post[layer], hidden[layer + 1][0], atol=1e-6)
    with torch.no_grad():
        _close(default_model.hf.model.norm(post[n - 1]), hidden[n][0], atol=1e-6)
    for layer in range(n):
        _close(pre[layer], hidden[layer][0], atol=1e-6)


def test_residual_decomposition(traced: oculi.Trace) -> None:
    s = traced.saved
    _close(s["mid"], s["pre"] + s["attn_out"], atol=1e-5)
    _close(s["post"], s["mid"] + s["mlp_out"], atol=1e-5)


def test_mlp_and_model_sites_match_hooks(default_model: OculiModel, traced: oculi.Trace) -> None:
    got, out = ref.capture(default_model, ref.ids_of(default_model, PROMPT), {
        "act": ref.Capture(ref.path(default_model, "down", 7), "input"),
        "gate": ref.Capture(ref.path(default_model, "gate", 7)),
        "up": ref.Capture(ref.path(default_model, "up", 7)),
        "embed": ref.Capture(ref.path(default_model, "embed")),
        "final_norm": ref.Capture(ref.path(default_model, "final_norm")),
        "attn_out": ref.Capture(ref.path(default_model, "attn", 12)),
        "mid": ref.Capture(ref.path(default_model, "mid_norm", 12), "input"),
    })
    s = traced.saved
    for name in ("act", "gate", "up", "embed", "final_norm"):
        _close(s[name], got[name][0], atol=1e-6)
    _close(s["attn_out"][12], got["attn_out"][0], atol=1e-6)
    _close(s["mid"][12], got["mid"][0], atol=1e-6)
    _close(s["logits"], out.logits[0], atol=1e-6)


def test_untouched_trace_is_bit_identical(default_model: OculiModel, traced: oculi.Trace) -> None:
    bare = ref.hf_forward(default_model, ref.ids_of(default_model, PROMPT)).logits[0]
    assert torch.equal(traced.saved["logits"], bare)
    ids = default_model.tokenizer(PROMPT)["input_ids"]
    for prompt in (list(ids), torch.tensor(ids)):
        with oculi.trace(default_model, prompt) as t:
            t.logits.save()
        assert torch.equal(t.saved["logits"], bare)


def test_result_labels(default_model: OculiModel, traced: oculi.Trace) -> None:
    ds = traced.result
    assert ds["post"].dims == ("layer", "token", "d_model")
    assert ds["post"].shape == (30, 5, 576)
    assert ds["act"].dims == ("token", "neuron") and ds.sizes["neuron"] == 1536
    assert ds["logits"].dims == ("token", "vocab") and ds.sizes["vocab"] == 49152
    assert list(ds["token_str"].values) == ["The", " capital", " of", " France", " is"]
    assert ds.attrs["model_id"] == "SmolLM2-135M-Instruct"


def test_swap_makes_corrupted_run_clean(default_model: OculiModel) -> None:
    assert ref.ids_of(default_model, CLEAN).shape == ref.ids_of(default_model, BAD).shape
    with oculi.trace(default_model) as t:
        with t.invoke(CLEAN) as c:
            h = c.layers[10].resid_post
            c.layers[10:].resid_post.save("clean_post")
            c.logits[-1].save("clean")
        with t.invoke(BAD) as x:
            x.layers[10].resid_post = h
            x.layers[10:].resid_post.save("bad_post")
            x.logits[-1].save("patched")
    _close(t.saved["bad_post"], t.saved["clean_post"], atol=1e-4, rtol=1e-5)
    _close(t.saved["patched"], t.saved["clean"], atol=1e-4, rtol=1e-5)
    bare_bad = ref.hf_forward(default_model, ref.ids_of(default_model, BAD)).logits[0, -1]
    assert not torch.allclose(t.saved["patched"], bare_bad, atol=1e-2)


def test_batched_equals_single(default_model: OculiModel) -> None:
    prompts = [PROMPT, "Once upon a time there was a little girl who", "Hi"]
    with oculi.trace(default_model, prompts) as t:
        t.layers[15].resid_post[:, -1].save("mid_last")
        t.logits[:, -1].save("last")
    # Batched matmuls round differently; SmolLM2's residual stream has entries in the
    # thousands, so the tolerance is relative there.
    for i, prompt in enumerate(prompts):
        hs = ref.hf_forward(default_model, ref.ids_of(default_model, prompt),
                            output_hidden_states=True)
        _close(t.saved["mid_last"][i], hs.hidden_states[16][0, -1], atol=1e-4, rtol=1e-5)
        _close(t.saved["last"][i], hs.logits[0, -1], atol=1e-4, rtol=1e-5)


def test_early_stop(default_model: OculiModel) -> None:
    with ref.count_calls(ref.module(default_model, "layer", 4)) as later, \
            ref.count_calls(default_model.hf) as forwards:
        with oculi.trace(default_model, PROMPT) as t:
            t.layers[3].resid_post.save("l3")
        assert len(forwards) == 1 and len(later) == 0
    hs = ref.hf_forward(default_model, ref.ids_of(default_model, PROMPT), output_hidden_states=True)
    _close(t.saved["l3"], hs.hidden_states[4][0], atol=1e-6)
