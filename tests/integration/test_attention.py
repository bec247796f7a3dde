"""Attention sites (issue 3): patterns, q/k/v/scores/z/result, and routing, checked against
independent computations.

Every expectation here is computed WITHOUT oculi: HF ``eager`` attention with
``output_attentions=True``, a recomputation of q/k/v from the weights (projection → q/k norm →
rotary), and plain PyTorch hooks on the output projection. The tiny models are fp32, so the
tolerance is 1e-5 throughout. Interventions are in ``test_attention_edits.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from hf_reference import attend_calls, attn_module, eager, ids_of, out_proj
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import oculi_dsl as oculi
from oculi_dsl.models import OculiModel
from oculi_dsl.testing import tiny_model

from ._attention_ref import ATOL, PROMPT, bare, capture_layer, expected_pattern, visible

# ----------------------------------------------------------------------------- helpers


def eager_patterns(m: OculiModel, **inputs: Any) -> torch.Tensor:
    """HF eager attention weights, (batch, layer, head, query, key)."""
    with eager(m), torch.no_grad():
        out = m.hf(**inputs, output_attentions=True)
    return torch.stack(out.attentions, 1)


def rms(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """Gemma 3 RMSNorm written out: x / rms(x) * (1 + w)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * (1.0 + norm.weight)


def recompute_qkv(m: OculiModel, layer: int, hidden: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, H, T, D), k and v (B, H_kv, T, D) from the weights, positions 0..T-1."""
    attn, info = attn_module(m, layer), m.info
    b, t, _ = hidden.shape
    d = info.d_head

    def heads(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(b, t, n, d).transpose(1, 2)

    with torch.no_grad():
        if info.family == "gpt2":  # Conv1D: x @ W + b, then split into q, k, v
            qkv = hidden @ attn.c_attn.weight + attn.c_attn.bias
            q, k, v = qkv.split(info.d_model, dim=-1)
            return heads(q, info.n_heads), heads(k, info.n_heads), heads(v, info.n_heads)
        lin = torch.nn.functional.linear
        q = heads(lin(hidden, attn.q_proj.weight, attn.q_proj.bias), info.n_heads)
        k = heads(lin(hidden, attn.k_proj.weight, attn.k_proj.bias), info.n_kv_heads)
        v = heads(lin(hidden, attn.v_proj.weight, attn.v_proj.bias), info.n_kv_heads)
        pos = torch.arange(t)[None]
        if info.family == "gemma3":
            q, k = rms(q, attn.q_norm), rms(k, attn.k_norm)
            cos, sin = m.hf.model.rotary_emb(hidden, pos, m.hf.config.layer_types[layer])
        else:
            cos, sin = m.hf.model.rotary_emb(hidden, pos)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def family_model(family: str) -> OculiModel:
    return tiny_model(family)


# ----------------------------------------------------------------------------- patterns


def test_pattern_equals_hf_eager(tiny: OculiModel) -> None:
    m = tiny
    impl_before = m.hf.config._attn_implementation
    with oculi.trace(m, PROMPT) as t:
        t.layers[:].attn.pattern.save("pat")
    pat = t.saved["pat"]
    n = ids_of(m, PROMPT).shape[1]
    info = m.info
    assert tuple(pat.shape) == (info.n_layers, info.n_heads, n, n)
    assert t.result["pat"].dims == ("layer", "head", "query", "key")
    ref = eager_patterns(m, input_ids=ids_of(m, PROMPT))[0]
    torch.testing.assert_close(pat, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(pat.sum(-1), torch.ones(pat.shape[:-1]), atol=1e-6, rtol=0)
    for layer in range(info.n_layers):
        hidden = ~visible(m, layer, n)
        assert hidden.any()
        assert torch.all(pat[layer][:, hidden] == 0.0), f"layer {layer}: masked keys not exactly 0"
    assert m.hf.config._attn_implementation == impl_before


def test_gemma3_sliding_window_is_masked() -> None:
    m = tiny_model("gemma3")
    prompt = "one two three four five six seven eight"
    n = ids_of(m, prompt).shape[1]
    window = m.hf.config.sliding_window
    assert n > window + 2
    with oculi.trace(m, prompt) as t:
        t.layers[0].attn.pattern.save("sliding")
        t.layers[1].attn.pattern.save("full")
    sliding, full = t.saved["sliding"], t.saved["full"]
    far = torch.arange(n)[None, :] <= torch.arange(n)[:, None] - window  # past, outside the window
    assert torch.all(sliding[:, far] == 0.0)
    assert torch.all(full[:, far] > 0.0)  # the global layer does see them
    ref = eager_patterns(m, input_ids=ids_of(m, prompt))[0]
    torch.testing.assert_close(sliding, ref[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(full, ref[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_pattern_left_padded_batch_equals_hf_eager(family: str) -> None:
    m = family_model(family)
    prompts = ["The capital of France is Paris and more", "Hi there", "one two three"]
    with oculi.trace(m, prompts) as t:
        t.layers[:].attn.pattern.save("pat")
        t.layers[2].attn.pattern.save("one")
    pat = t.saved["pat"]
    assert t.result["pat"].dims == ("layer", "prompt", "head", "query", "key")
    b = t.plan.batch
    assert b.attention_mask is not None
    ref = eager_patterns(m, input_ids=b.input_ids, attention_mask=b.attention_mask,
                         position_ids=b.position_ids)
    for p, prompt in enumerate(prompts):
        real = b.attention_mask[p].bool()
        n_real = int(real.sum())
        assert n_real == ids_of(m, prompt).shape[1]
        ours = pat[:, p][..., real, :][..., real]
        theirs = ref[p][..., real, :][..., real]
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
        # padding keys get exactly 0; padded query rows (no visible key) are all-zero rows
        assert torch.all(pat[:, p][..., ~real] == 0.0)
        assert torch.all(pat[:, p][..., ~real, :] == 0.0)
        torch.testing.assert_close(ours.sum(-1), torch.ones(ours.shape[:-1]), atol=1e-6, rtol=0)
        # the same prompt alone gives the same pattern (padding changes nothing)
        alone = eager_patterns(m, input_ids=ids_of(m, prompt))[0]
        torch.testing.assert_close(ours, alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(t.saved["one"], pat[2], atol=0, rtol=0)


def test_pattern_on_eager_model_equals_hf_eager() -> None:
    """With the model itself on ``eager``, the router sits on the 'eager' key and leaves none behind."""
    m = tiny_model("llama")
    with eager(m):
        mapping = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
        with oculi.trace(m, PROMPT) as t:
            t.layers[1].attn.pattern.save("pat")
            t.logits.save("logits")
        assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == mapping
        with torch.no_grad():
            out = m.hf(input_ids=ids_of(m, PROMPT), output_attentions=True)
    torch.testing.assert_close(t.saved["pat"], out.attentions[1][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(t.saved["logits"], out.logits[0], atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- q, k, v, z, result


def test_qkv_equal_recomputation_from_weights(tiny: OculiModel) -> None:
    m, layer = tiny, 1
    info = m.info
    with oculi.trace(m, PROMPT) as t:
        t.layers[layer].attn.q.save("q")
        t.layers[layer].attn.k.save("k")
        t.layers[layer].attn.v.save("v")
        t.layers[layer].attn.k.expanded().save("k_exp")
        t.layers[layer].attn.v.expanded().save("v_exp")
        t.layers[layer].attn.scores.save("scores")
        t.layers[layer].attn.pattern.save("pattern")
    ds = t.result
    assert ds["q"].dims == ("head", "token", "d_head")
    assert ds["k"].dims == ("kv_head", "token", "d_head")
    assert ds["k_exp"].dims == ("head", "token", "d_head")
    assert ds["scores"].dims == ("head", "query", "key")
    hand = capture_layer(m, ids_of(m, PROMPT), layer)
    q, k, v = (x[0] for x in recompute_qkv(m, layer, hand["hidden"]))
    n = q.shape[1]
    assert tuple(t.saved["q"].shape) == (info.n_heads, n, info.d_head)
    assert tuple(t.saved["k"].shape) == (info.n_kv_heads, n, info.d_head)
    torch.testing.assert_close(t.saved["q"], q, atol=ATOL, rtol=0)
    torch.testing.assert_close(t.saved["k"], k, atol=ATOL, rtol=0)
    torch.testing.assert_close(t.saved["v"], v, atol=ATOL, rtol=0)
    n_rep = info.n_heads // info.n_kv_heads
    for h in range(info.n_heads):  # query head h reads KV head h // n_rep (HF repeat_kv)
        torch.testing.assert_close(t.saved["k_exp"][h], k[h // n_rep], atol=ATOL, rtol=0)
        torch.testing.assert_close(t.saved["v_exp"][h], v[h // n_rep], atol=ATOL, rtol=0)
    # scores: pre-softmax logits with the model's scale; masked entries hold a huge negative
    seen = visible(m, layer, n)
    raw = q @ k.repeat_interleave(n_rep, 0).transpose(-1, -2) * attn_module(m, layer).scaling
    torch.testing.assert_close(t.saved["scores"][:, seen], raw[:, seen], atol=ATOL, rtol=0)
    assert torch.all(t.saved["scores"][:, ~seen] <= torch.finfo(torch.float32).min / 2)
    torch.testing.assert_close(t.saved["pattern"], expected_pattern(m, layer, q, k), atol=ATOL, rtol=0)


def test_z_and_result_equal_output_projection(tiny: OculiModel) -> None:
    m, layer = tiny, 2
    info = m.info
    with oculi.trace(m, PROMPT) as t:
        t.layers[layer].attn.z.save("z")
        t.layers[layer].attn.result.save("result")
        t.layers[layer].attn.heads[1].save("head1")
    assert t.result["z"].dims == ("token", "head", "d_head")
    assert t.result["result"].dims == ("token", "head", "d_model")
    assert t.result["head1"].dims == ("token", "d_head")
    hand = capture_layer(m, ids_of(m, PROMPT), layer)
    n = hand["z_flat"].shape[1]
    z = hand["z_flat"][0].view(n, info.n_heads, info.d_head)
    torch.testing.assert_close(t.saved["z"], z, atol=ATOL, rtol=0)
    torch.testing.assert_close(t.saved["head1"], z[:, 1], atol=ATOL, rtol=0)
    proj = out_proj(m, layer)
    bias = proj.bias if proj.bias is not None else torch.zeros(info.d_model)
    # Σ_h result_h + bias = the attention output before any post-attention norm (o_proj output)
    torch.testing.assert_close(t.saved["result"].sum(1) + bias, hand["o"][0], atol=ATOL, rtol=0)
    d = info.d_head
    w_o = proj.weight.detach() if info.family == "gpt2" else proj.weight.detach().T  # (in, out)
    for h in range(info.n_heads):  # z_h · W_O^h
        torch.testing.assert_close(t.saved["result"][:, h], z[:, h] @ w_o[h * d:(h + 1) * d],
                                   atol=ATOL, rtol=0)


def test_layer_selection_of_q_and_z(tiny: OculiModel) -> None:
    m = tiny
    with oculi.trace(m, PROMPT) as t:
        t.layers[[0, 3]].attn.q.save("q")
        t.layers[1:3].attn.z.save("z")
    assert t.result["q"].dims == ("layer", "head", "token", "d_head")
    assert t.result["q"].coords["layer"].values.tolist() == [0, 3]
    for i, layer in enumerate((0, 3)):
        hand = capture_layer(m, ids_of(m, PROMPT), layer)
        torch.testing.assert_close(t.saved["q"][i], recompute_qkv(m, layer, hand["hidden"])[0][0],
                                   atol=ATOL, rtol=0)
    for i, layer in enumerate((1, 2)):
        z = capture_layer(m, ids_of(m, PROMPT), layer)["z_flat"][0]
        torch.testing.assert_close(t.saved["z"][i].flatten(-2), z, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- routing and restore


@contextmanager
def counting_original(impl: str) -> Iterator[list[int]]:
    """Wrap the model's own attention function (e.g. SDPA) to record the layers it serves."""
    calls: list[int] = []
    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    had, previous = impl in local, local.get(impl)
    real = ALL_ATTENTION_FUNCTIONS[impl]

    def spy(module: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(module.layer_idx)
        return real(module, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[impl] = spy
    try:
        yield calls
    finally:
        if had:
            local[impl] = previous
        else:
            local.pop(impl, None)


def test_only_touched_layer_is_routed(tiny: OculiModel, monkeypatch: pytest.MonkeyPatch) -> None:
    m = tiny
    n_layers = m.info.n_layers
    ids = ids_of(m, PROMPT)
    plain = bare(m, ids).logits[0]
    impl = m.hf.config._attn_implementation
    assert impl == "sdpa"
    with attend_calls(monkeypatch) as routed, counting_original(impl) as original, \
            oculi.trace(m, PROMPT) as t:
        t.layers[3].attn.pattern.save("pat")
        t.logits.save("logits")
    assert routed == [3]
    assert original == [i for i in range(n_layers) if i != 3]  # the others stay on SDPA
    torch.testing.assert_close(t.saved["logits"], plain, atol=ATOL, rtol=0)
    # a save of an early layer stops the forward early: the router still only serves layer 1
    with attend_calls(monkeypatch) as routed, counting_original(impl) as original, \
            oculi.trace(m, PROMPT) as t:
        t.layers[1].attn.q.save("q")
    assert routed == [1]
    assert original == [0]


def test_registry_and_config_restored(tiny: OculiModel) -> None:
    m = tiny
    mapping = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    impl = m.hf.config._attn_implementation
    ids = ids_of(m, PROMPT)
    before = bare(m, ids).logits
    with oculi.trace(m, PROMPT) as t:
        t.layers[:].attn.pattern.save("pat")
        t.layers[2].attn.q.scale(2.0, head=0)
    assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == mapping
    assert m.hf.config._attn_implementation == impl
    assert torch.equal(bare(m, ids).logits, before)


def test_registry_restored_after_error_in_forward(tiny: OculiModel) -> None:
    m = tiny
    mapping = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    impl = m.hf.config._attn_implementation
    ids = ids_of(m, PROMPT)
    before = bare(m, ids).logits

    def boom(mod: Any, args: Any, out: Any) -> None:
        # the router is installed at this point: layer 1 runs after the routed layer 0
        assert ALL_ATTENTION_FUNCTIONS._local_mapping != mapping
        raise RuntimeError("boom inside the forward")

    handle = attn_module(m, 1).register_forward_hook(boom)
    try:
        with pytest.raises(oculi.ExecutionError, match="boom inside the forward"), \
                oculi.trace(m, PROMPT) as t:
            t.layers[0].attn.pattern.save("pat")
            t.layers[0].attn.heads[1].ablate()
            t.logits.save("logits")
    finally:
        handle.remove()
    assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == mapping
    assert m.hf.config._attn_implementation == impl
    assert torch.equal(bare(m, ids).logits, before)
    # and the model still traces normally afterwards
    with oculi.trace(m, PROMPT) as t:
        t.layers[0].attn.pattern.save("pat")
    torch.testing.assert_close(t.saved["pat"], eager_patterns(m, input_ids=ids)[0, 0], atol=ATOL, rtol=0)
