"""Attention sites and interventions (issue 3), checked against independent computations.

Every expectation here is computed WITHOUT oculi: HF ``eager`` attention with
``output_attentions=True``, a recomputation of q/k/v from the weights (projection → q/k norm →
rotary), and plain PyTorch hooks on the output projection. The tiny models are fp32, so the
tolerance is 1e-5 throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from hf_reference import attn_module, eager, hooked, ids_of, out_proj
from hf_reference import path as ref_path
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import oculi_dsl as oculi
import oculi_dsl.attention as attention_mod
from oculi_dsl.models import OculiModel
from oculi_dsl.testing import tiny_model

PROMPT = "The capital of France is Paris"
OTHER = "The capital of Germany is Berlin"  # same token length as PROMPT in the tiny tokenizer
ATOL = 1e-5




# ----------------------------------------------------------------------------- helpers





def eager_patterns(m: OculiModel, **inputs: Any) -> torch.Tensor:
    """HF eager attention weights, (batch, layer, head, query, key)."""
    with eager(m), torch.no_grad():
        out = m.hf(**inputs, output_attentions=True)
    return torch.stack(out.attentions, 1)


def bare(m: OculiModel, ids: torch.Tensor, *hooks: Any, **kwargs: Any) -> Any:
    with hooked(*hooks), torch.no_grad():
        return m.hf(input_ids=ids, **kwargs)


def capture_layer(m: OculiModel, ids: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """Hand capture of one layer: attention input, o_proj input and output, logits."""
    got: dict[str, torch.Tensor] = {}

    def attn_in(mod: Any, args: Any, kwargs: Any) -> None:
        got["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def proj_in(mod: Any, args: Any) -> None:
        got["z_flat"] = args[0].detach().clone()

    def proj_out(mod: Any, args: Any, out: torch.Tensor) -> None:
        got["o"] = out.detach().clone()

    out = bare(m, ids, (attn_module(m, layer), "pre_kw", attn_in),
               (out_proj(m, layer), "pre", proj_in), (out_proj(m, layer), "fwd", proj_out))
    got["logits"] = out.logits
    return got


def replace_head_hook(m: OculiModel, head: int, values: torch.Tensor | None) -> Callable[..., Any]:
    """o_proj pre-hook putting ``values`` (token, d_head) — or zeros — into one head's slice."""
    d = m.info.d_head

    def hook(mod: Any, args: Any) -> Any:
        x = args[0].clone()
        x[..., head * d:(head + 1) * d] = 0.0 if values is None else values
        return (x, *args[1:])

    return hook


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


def visible(m: OculiModel, layer: int, n: int) -> torch.Tensor:
    """(query, key) bool: causal, and the sliding window on Gemma 3's sliding layers."""
    qpos, kpos = torch.arange(n)[:, None], torch.arange(n)[None, :]
    mask = kpos <= qpos
    types = getattr(m.hf.config, "layer_types", None)
    if types is not None and types[layer] == "sliding_attention":
        mask &= kpos > qpos - m.hf.config.sliding_window
    return mask


def expected_pattern(m: OculiModel, layer: int, q: torch.Tensor, k: torch.Tensor,
                     alpha: torch.Tensor | float = 1.0) -> torch.Tensor:
    """softmax(alpha · mask(q kᵀ · s)) by hand: (head, query, key), k per KV head."""
    n_rep = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(n_rep, dim=-3)
    scores = q @ k.transpose(-1, -2) * attn_module(m, layer).scaling
    scores = scores * (alpha if not isinstance(alpha, torch.Tensor) else alpha[:, None, None])
    scores = scores.masked_fill(~visible(m, layer, q.shape[-2]), float("-inf"))
    return scores.softmax(-1)


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
def counting_attend(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Record the layer index of every call of ``oculi_dsl.attention.attend``."""
    calls: list[int] = []
    real = attention_mod.attend

    def spy(fire: Any, steps: Any, module: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(module.layer_idx)
        return real(fire, steps, module, *args, **kwargs)

    monkeypatch.setattr(attention_mod, "attend", spy)
    yield calls


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
    with counting_attend(monkeypatch) as routed, counting_original(impl) as original, \
            oculi.trace(m, PROMPT) as t:
        t.layers[3].attn.pattern.save("pat")
        t.logits.save("logits")
    assert routed == [3]
    assert original == [i for i in range(n_layers) if i != 3]  # the others stay on SDPA
    torch.testing.assert_close(t.saved["logits"], plain, atol=ATOL, rtol=0)
    # a save of an early layer stops the forward early: the router still only serves layer 1
    with counting_attend(monkeypatch) as routed, counting_original(impl) as original, \
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


# ----------------------------------------------------------------------------- q.scale / k.scale


@pytest.mark.parametrize("alpha", [0.5, 2.0, 4.0])
def test_q_scale_changes_only_that_head(tiny: OculiModel, alpha: float) -> None:
    m, layer, head = tiny, 2, 1
    info = m.info
    with oculi.trace(m, PROMPT) as base:
        base.layers[layer].attn.q.save("q")
        base.layers[layer].attn.k.save("k")
        base.layers[layer].attn.pattern.save("pat")
    with oculi.trace(m, PROMPT) as t:
        t.layers[layer].attn.q.scale(alpha, head=head)
        t.layers[layer].attn.q.save("q")
        t.layers[layer].attn.pattern.save("pat")
    before, after = base.saved["pat"], t.saved["pat"]
    others = [h for h in range(info.n_heads) if h != head]
    assert torch.equal(after[others], before[others])
    assert not torch.allclose(after[head], before[head], atol=1e-4)
    torch.testing.assert_close(t.saved["q"][head], alpha * base.saved["q"][head], atol=ATOL, rtol=0)
    alphas = torch.ones(info.n_heads)
    alphas[head] = alpha
    expected = expected_pattern(m, layer, base.saved["q"], base.saved["k"], alphas)
    torch.testing.assert_close(after, expected, atol=ATOL, rtol=0)
    n = after.shape[-1]
    assert torch.all(after[:, ~visible(m, layer, n)] == 0.0)
    # the sharpened / flattened head: entropy moves the right way
    ent = lambda p: -(p * p.clamp_min(1e-30).log()).sum(-1)[1:].mean()  # noqa: E731
    assert (ent(after[head]) < ent(before[head])) == (alpha > 1)


def test_q_scale_spares_gqa_siblings() -> None:
    m = tiny_model("llama")  # 4 query heads, 2 KV heads: heads 0, 1 share KV head 0
    assert (m.info.n_heads, m.info.n_kv_heads) == (4, 2)
    with oculi.trace(m, PROMPT) as base:
        base.layers[1].attn.pattern.save("pat")
    with oculi.trace(m, PROMPT) as t:
        t.layers[1].attn.q.scale(3.0, head=0)
        t.layers[1].attn.pattern.save("pat")
    assert not torch.allclose(t.saved["pat"][0], base.saved["pat"][0], atol=1e-4)
    assert torch.equal(t.saved["pat"][1], base.saved["pat"][1])  # sibling on the same KV head
    assert torch.equal(t.saved["pat"][2:], base.saved["pat"][2:])


def test_q_scale_one_is_no_intervention(tiny: OculiModel) -> None:
    m, layer = tiny, 2
    ids = ids_of(m, PROMPT)
    with oculi.trace(m, PROMPT) as base:
        base.layers[layer].attn.q.save("q")  # same routing, no edit
        base.logits.save("logits")
    with oculi.trace(m, PROMPT) as t:
        t.layers[layer].attn.q.scale(1.0, head=0)
        t.logits.save("logits")
    # same attention math on the routed layer: bit-identical
    assert torch.equal(t.saved["logits"], base.saved["logits"])
    # and equal to a bare (SDPA) forward to float tolerance
    torch.testing.assert_close(t.saved["logits"], bare(m, ids).logits[0], atol=1e-6, rtol=0)


def test_k_scale_changes_exactly_its_kv_group(tiny: OculiModel) -> None:
    m, layer = tiny, 1
    info = m.info
    group = info.n_kv_heads - 1
    n_rep = info.n_heads // info.n_kv_heads
    members = [h for h in range(info.n_heads) if h // n_rep == group]
    with oculi.trace(m, PROMPT) as base:
        base.layers[layer].attn.q.save("q")
        base.layers[layer].attn.k.save("k")
        base.layers[layer].attn.pattern.save("pat")
    with oculi.trace(m, PROMPT) as t:
        t.layers[layer].attn.k.scale(2.5, kv_head=group)
        t.layers[layer].attn.pattern.save("pat")
        t.layers[layer].attn.k.save("k")
    before, after = base.saved["pat"], t.saved["pat"]
    for h in range(info.n_heads):
        if h in members:
            assert not torch.allclose(after[h], before[h], atol=1e-4), f"head {h} unchanged"
        else:
            assert torch.equal(after[h], before[h]), f"head {h} changed"
    torch.testing.assert_close(t.saved["k"][group], 2.5 * base.saved["k"][group], atol=ATOL, rtol=0)
    alphas = torch.tensor([2.5 if h in members else 1.0 for h in range(info.n_heads)])
    expected = expected_pattern(m, layer, base.saved["q"], base.saved["k"], alphas)
    torch.testing.assert_close(after, expected, atol=ATOL, rtol=0)


def test_scale_over_layer_selection() -> None:
    m = tiny_model("llama")
    ids = ids_of(m, PROMPT)
    with oculi.trace(m, PROMPT) as t:
        t.layers[:].attn.q.scale(2.0, head=3)
        t.logits.save("logits")
    # hand: scaling post-rotary q_h by alpha == scaling q_proj's head-h output (rotary is linear)
    d = m.info.d_head

    def scale_q(mod: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[..., 3 * d:4 * d] *= 2.0
        return out

    hooks = [(attn_module(m, i).q_proj, "fwd", scale_q) for i in range(m.info.n_layers)]
    torch.testing.assert_close(t.saved["logits"], bare(m, ids, *hooks).logits[0], atol=ATOL, rtol=0)
    assert not torch.allclose(t.saved["logits"], bare(m, ids).logits[0], atol=1e-4)


@pytest.mark.parametrize(
    ("verb", "match"),
    [
        (lambda a: a.q.scale(0.0, head=0), "alpha"),
        (lambda a: a.q.scale(-1.5, head=0), "alpha"),
        (lambda a: a.k.scale(0, kv_head=0), "alpha"),
        (lambda a: a.q.scale(2.0, head=4), "out of range"),
        (lambda a: a.q.scale(2.0, head=-5), "out of range"),
        (lambda a: a.k.scale(2.0, kv_head=2), "out of range"),
        (lambda a: a.k.scale(2.0, head=1), "kv_head"),
        (lambda a: a.q.scale(2.0, kv_head=0), "head"),
        (lambda a: a.q.scale(2.0), "head"),
        (lambda a: a.k.scale(2.0), "kv_head"),
        (lambda a: a.v.scale(2.0, head=0), "attn.q"),
        (lambda a: a.pattern.scale(2.0, head=0), "attn.q"),
    ],
)
def test_scale_errors_before_running(verb: Callable[[Any], None], match: str) -> None:
    m = tiny_model("llama")  # 4 heads, 2 KV heads
    forwards: list[int] = []
    handle = m.hf.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        with pytest.raises(oculi.OculiError, match=match), oculi.trace(m, PROMPT) as t:
            verb(t.layers[1].attn)
            t.logits.save("logits")
    finally:
        handle.remove()
    assert forwards == []


def test_head_index_out_of_range() -> None:
    m = tiny_model("llama")
    with pytest.raises(oculi.SiteError, match="out of range"), oculi.trace(m, PROMPT) as t:
        t.layers[1].attn.heads[4].ablate()


# ----------------------------------------------------------------------------- ablation


def test_zero_ablation_equals_hand_hook(tiny: OculiModel) -> None:
    m, layer, head = tiny, 2, 3
    ids = ids_of(m, PROMPT)
    path = ref_path(m, "out_proj", layer)
    with oculi.trace(m, PROMPT) as base:
        base.layers[layer].attn.z.save("z")
    with oculi.trace(m, PROMPT) as t:
        t.layers[layer].attn.heads[head].ablate()
        t.layers[layer].attn.z.save("z")  # read after the edit: the ablated value
        t.module(path).output.save("o")
        t.logits.save("logits")
    got: dict[str, torch.Tensor] = {}
    out = bare(m, ids, (out_proj(m, layer), "pre", replace_head_hook(m, head, None)),
               (out_proj(m, layer), "fwd", lambda mod, a, o: got.update(o=o.clone())))
    torch.testing.assert_close(t.saved["o"][0], got["o"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(t.saved["logits"], out.logits[0], atol=ATOL, rtol=0)
    z, z0 = t.saved["z"], base.saved["z"]
    assert torch.all(z[:, head] == 0.0)
    others = [h for h in range(m.info.n_heads) if h != head]
    assert torch.equal(z[:, others], z0[:, others])
    assert not torch.allclose(t.saved["logits"], bare(m, ids).logits[0], atol=1e-5)


def test_ablation_over_all_layers_equals_hand_hooks(tiny: OculiModel) -> None:
    m, head = tiny, 3
    ids = ids_of(m, PROMPT)
    with oculi.trace(m, PROMPT) as t:
        t.layers[:].attn.heads[head].ablate()
        t.logits.save("logits")
    hooks = [(out_proj(m, i), "pre", replace_head_hook(m, head, None)) for i in range(m.info.n_layers)]
    torch.testing.assert_close(t.saved["logits"], bare(m, ids, *hooks).logits[0], atol=ATOL, rtol=0)


def test_mean_ablation_with_reference_invoke(tiny: OculiModel) -> None:
    m, layer, head = tiny, 1, 2
    refs = ["The capital of Germany is Berlin", "The city of France is Paris", "The cat of Rome is blue"]
    n = ids_of(m, PROMPT).shape[1]
    assert all(ids_of(m, r).shape[1] == n for r in refs)
    with oculi.trace(m) as t:
        with t.invoke(PROMPT) as x:
            pass
        ref = t.invoke(refs)
        x.layers[layer].attn.heads[head].ablate("mean", reference=ref.layers[layer].attn.heads[head])
        x.layers[layer].attn.heads[head].save("ablated")
        x.logits.save("logits")
    d = m.info.d_head
    mean = torch.stack([capture_layer(m, ids_of(m, r), layer)["z_flat"][0, :, head * d:(head + 1) * d]
                        for r in refs]).mean(0)
    torch.testing.assert_close(t.saved["ablated"], mean, atol=ATOL, rtol=0)
    out = bare(m, ids_of(m, PROMPT), (out_proj(m, layer), "pre", replace_head_hook(m, head, mean)))
    torch.testing.assert_close(t.saved["logits"], out.logits[0], atol=ATOL, rtol=0)


def test_mean_ablation_errors() -> None:
    m = tiny_model("llama")
    with pytest.raises(oculi.OculiError, match="reference"), oculi.trace(m, PROMPT) as t:
        t.layers[1].attn.heads[0].ablate("mean")
    with pytest.raises(oculi.OculiError, match="kind"), oculi.trace(m, PROMPT) as t:
        t.layers[1].attn.heads[0].ablate("median")
    with pytest.raises(oculi.OculiError, match="heads"), oculi.trace(m, PROMPT) as t:
        t.layers[1].attn.z.ablate()


# ----------------------------------------------------------------------------- swaps and edits


def test_head_swap_clean_into_corrupted_one_pass(tiny: OculiModel) -> None:
    m, layer, head = tiny, 2, 1
    clean_ids, bad_ids = ids_of(m, PROMPT), ids_of(m, OTHER)
    assert clean_ids.shape == bad_ids.shape
    forwards: list[int] = []
    handle = m.hf.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        with oculi.trace(m) as t:
            with t.invoke(PROMPT) as c:
                c.logits[-1].save("clean")
            with t.invoke(OTHER) as x:
                x.layers[layer].attn.heads[head] = c.layers[layer].attn.heads[head]
                x.layers[layer].attn.z.save("z")
                x.logits[-1].save("patched")
    finally:
        handle.remove()
    assert forwards == [1]
    # hand, two passes: capture the clean head, write it into the corrupted run
    d = m.info.d_head
    clean = capture_layer(m, clean_ids, layer)
    clean_head = clean["z_flat"][0, :, head * d:(head + 1) * d]
    bad = capture_layer(m, bad_ids, layer)
    out = bare(m, bad_ids, (out_proj(m, layer), "pre", replace_head_hook(m, head, clean_head)))
    torch.testing.assert_close(t.saved["patched"], out.logits[0, -1], atol=ATOL, rtol=0)
    torch.testing.assert_close(t.saved["clean"], clean["logits"][0, -1], atol=ATOL, rtol=0)
    z = t.saved["z"]
    torch.testing.assert_close(z[:, head], clean_head, atol=ATOL, rtol=0)
    others = [h for h in range(m.info.n_heads) if h != head]
    bad_z = bad["z_flat"][0].view(-1, m.info.n_heads, d)
    torch.testing.assert_close(z[:, others], bad_z[:, others], atol=ATOL, rtol=0)


def test_pattern_edit_flows_into_z_and_output(tiny: OculiModel) -> None:
    m, layer = tiny, 1
    info = m.info
    ids = ids_of(m, PROMPT)
    with oculi.trace(m, PROMPT) as base:
        base.layers[layer].attn.pattern.save("pat")
        base.layers[layer].attn.v.save("v")
    with oculi.trace(m, PROMPT) as t:
        t.layers[layer].attn.pattern[..., 0] = 0.5
        t.layers[layer].attn.pattern.save("pat")
        t.layers[layer].attn.z.save("z")
        t.logits.save("logits")
    edited = base.saved["pat"].clone()
    edited[..., 0] = 0.5
    torch.testing.assert_close(t.saved["pat"], edited, atol=0, rtol=0)
    n_rep = info.n_heads // info.n_kv_heads
    v = base.saved["v"].repeat_interleave(n_rep, 0)  # (head, token, d_head)
    z = (edited @ v).transpose(0, 1)  # (token, head, d_head)
    torch.testing.assert_close(t.saved["z"], z, atol=ATOL, rtol=0)

    def put_z(mod: Any, args: Any) -> Any:
        return (z.reshape(1, z.shape[0], -1), *args[1:])

    out = bare(m, ids, (out_proj(m, layer), "pre", put_z))
    torch.testing.assert_close(t.saved["logits"], out.logits[0], atol=ATOL, rtol=0)
    assert not torch.allclose(t.saved["logits"], bare(m, ids).logits[0], atol=1e-4)


def test_scores_edit_flows_into_pattern(tiny: OculiModel) -> None:
    m, layer, head = tiny, 1, 2
    with oculi.trace(m, PROMPT) as base:
        base.layers[layer].attn.scores.save("scores")
    with oculi.trace(m, PROMPT) as t:
        t.layers[layer].attn.scores[head] = t.layers[layer].attn.scores[head] * 3.0
        t.layers[layer].attn.pattern.save("pat")
    n = base.saved["scores"].shape[-1]
    s = base.saved["scores"].clone().masked_fill(~visible(m, layer, n), float("-inf"))
    s[head] = s[head] * 3.0
    torch.testing.assert_close(t.saved["pat"], s.softmax(-1), atol=ATOL, rtol=0)


def test_swap_q_from_other_invoke() -> None:
    m, layer = tiny_model("llama"), 1
    with oculi.trace(m) as t:
        with t.invoke(PROMPT) as a:
            a.layers[layer].attn.k.save("k_a")
        with t.invoke(OTHER) as b:
            b.layers[layer].attn.q = a.layers[layer].attn.q
            b.layers[layer].attn.k.save("k_b")
            b.layers[layer].attn.pattern.save("pat")
        a.layers[layer].attn.q.save("q_a")
    expected = expected_pattern(m, layer, t.saved["q_a"], t.saved["k_b"])
    torch.testing.assert_close(t.saved["pat"], expected, atol=ATOL, rtol=0)
