"""Attention sites on the real default model (SmolLM2-135M: 30 layers, 9 heads, 3 KV heads).

Expectations come from HF alone: eager attention with ``output_attentions=True``, the model's
own projections + rotary, plain hooks on ``o_proj`` and ``model.generate``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_reference import attend_calls, eager, ids_of
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import oculi_dsl as oculi
from oculi_dsl.models import OculiModel

pytestmark = pytest.mark.slow

PROMPT = "The Eiffel Tower is in the city of Paris, and the Colosseum is in"
ATOL = 1e-5





def eager_run(m: OculiModel, **inputs: Any) -> Any:
    with eager(m), torch.no_grad():
        return m.hf(**inputs, output_attentions=True)


def causal(n: int) -> torch.Tensor:
    return torch.arange(n)[None, :] <= torch.arange(n)[:, None]


def test_all_patterns_equal_hf_eager(default_model: OculiModel) -> None:
    m = default_model
    ids = ids_of(m, PROMPT)
    n = ids.shape[1]
    impl = m.hf.config._attn_implementation
    mapping = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    with oculi.trace(m, PROMPT) as t:
        t.layers[:].attn.pattern.save("pat")
        t.logits[-1].save("last")
    pat = t.saved["pat"]
    assert tuple(pat.shape) == (30, 9, n, n)
    out = eager_run(m, input_ids=ids)
    torch.testing.assert_close(pat, torch.stack(out.attentions, 1)[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(pat.sum(-1), torch.ones(pat.shape[:-1]), atol=1e-5, rtol=0)
    assert torch.all(pat[..., ~causal(n)] == 0.0)
    torch.testing.assert_close(t.saved["last"], out.logits[0, -1], atol=1e-4, rtol=0)
    assert m.hf.config._attn_implementation == impl
    assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == mapping


def test_padded_batch_patterns_equal_hf_eager(default_model: OculiModel) -> None:
    m = default_model
    prompts = [PROMPT, "The capital of France is"]
    with oculi.trace(m, prompts) as t:
        t.layers[[0, 7, 29]].attn.pattern.save("pat")
    b = t.plan.batch
    out = eager_run(m, input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
    for p, prompt in enumerate(prompts):
        real = b.attention_mask[p].bool()
        alone = eager_run(m, input_ids=ids_of(m, prompt))
        for i, layer in enumerate((0, 7, 29)):
            ours = t.saved["pat"][i, p][:, real][..., real]
            torch.testing.assert_close(ours, out.attentions[layer][p][:, real][..., real], atol=ATOL, rtol=0)
            torch.testing.assert_close(ours, alone.attentions[layer][0], atol=ATOL, rtol=0)
            assert torch.all(t.saved["pat"][i, p][..., ~real] == 0.0)


def test_q_k_v_equal_recomputation(default_model: OculiModel) -> None:
    m, layer = default_model, 11
    ids = ids_of(m, PROMPT)
    attn = m.hf.model.layers[layer].self_attn
    got: dict[str, torch.Tensor] = {}
    handles = [
        attn.register_forward_pre_hook(lambda mod, a, kw: got.update(x=kw["hidden_states"]), with_kwargs=True),
        attn.o_proj.register_forward_pre_hook(lambda mod, a: got.update(z=a[0])),
        attn.o_proj.register_forward_hook(lambda mod, a, o: got.update(o=o)),
    ]
    try:
        with torch.no_grad():
            m.hf(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    with oculi.trace(m, PROMPT) as t:
        t.layers[layer].attn.q.save("q")
        t.layers[layer].attn.k.save("k")
        t.layers[layer].attn.v.save("v")
        t.layers[layer].attn.z.save("z")
        t.layers[layer].attn.result.save("result")
    x, n = got["x"], ids.shape[1]
    with torch.no_grad():
        q = attn.q_proj(x).view(1, n, 9, 64).transpose(1, 2)
        k = attn.k_proj(x).view(1, n, 3, 64).transpose(1, 2)
        v = attn.v_proj(x).view(1, n, 3, 64).transpose(1, 2)
        cos, sin = m.hf.model.rotary_emb(x, torch.arange(n)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(t.saved["q"], q[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(t.saved["k"], k[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(t.saved["v"], v[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(t.saved["z"].flatten(-2), got["z"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(t.saved["result"].sum(1), got["o"][0], atol=ATOL, rtol=0)


def test_only_layer_3_routed_and_logits_unchanged(default_model: OculiModel,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    m = default_model
    ids = ids_of(m, PROMPT)
    with torch.no_grad():
        plain = m.hf(input_ids=ids).logits[0]
    with attend_calls(monkeypatch) as calls, oculi.trace(m, PROMPT) as t:
        t.layers[3].attn.pattern.save("pat")
        t.logits.save("logits")
    assert calls == [3]
    torch.testing.assert_close(t.saved["logits"], plain, atol=1e-4, rtol=1e-5)


def test_q_scale_one_head(default_model: OculiModel) -> None:
    m, layer, head, alpha = default_model, 5, 4, 2.0
    with oculi.trace(m, PROMPT) as base:
        base.layers[layer].attn.scores.save("scores")
        base.layers[layer].attn.pattern.save("pat")
    with oculi.trace(m, PROMPT) as t:
        t.layers[layer].attn.q.scale(alpha, head=head)
        t.layers[layer].attn.pattern.save("pat")
    before, after = base.saved["pat"], t.saved["pat"]
    others = [h for h in range(9) if h != head]
    assert torch.equal(after[others], before[others])  # siblings 3 and 5 share KV head 1
    n = before.shape[-1]
    s = base.saved["scores"][head].masked_fill(~causal(n), float("-inf"))
    torch.testing.assert_close(after[head], (alpha * s).softmax(-1), atol=ATOL, rtol=0)
    assert not torch.allclose(after[head], before[head], atol=1e-3)


def test_head_ablation_equals_hand_hook(default_model: OculiModel) -> None:
    m, layer, head = default_model, 10, 7
    ids = ids_of(m, PROMPT)
    with oculi.trace(m, PROMPT) as t:
        t.layers[layer].attn.heads[head].ablate()
        t.logits[-1].save("logits")

    def zero(mod: Any, args: Any) -> Any:
        x = args[0].clone()
        x[..., head * 64:(head + 1) * 64] = 0.0
        return (x,)

    handle = m.hf.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(zero)
    try:
        with torch.no_grad():
            expected = m.hf(input_ids=ids).logits[0, -1]
    finally:
        handle.remove()
    torch.testing.assert_close(t.saved["logits"], expected, atol=1e-4, rtol=1e-5)


def test_generation_scale_one_equals_plain(default_model: OculiModel) -> None:
    m = default_model
    prompt = "Once upon a time"
    ids = ids_of(m, prompt)
    with oculi.generate(m, prompt, max_new_tokens=12, do_sample=False) as g:
        g.layers[20].attn.q.scale(1.0, head=5)
    with torch.no_grad():
        plain = m.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                              do_sample=False, pad_token_id=m.tokenizer.pad_token_id or m.tokenizer.eos_token_id)
    assert torch.equal(g.tokens, plain[0])
    assert g.text == m.tokenizer.decode(plain[0, ids.shape[1]:], skip_special_tokens=True)
