"""``oculi.generate`` with attention interventions (issue 3), against plain ``model.generate``.

The expectations come from HF alone: ``model.generate`` with the same kwargs, the same
generation with hand-written PyTorch hooks (gated on a hand-kept step counter where an
intervention is limited to some steps), and full no-cache forwards over the generated sequence
for the values saved at each step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hf_reference import attn_module, hooked, ids_of, layer_module, out_proj
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import oculi_dsl as oculi
from oculi_dsl.models import OculiModel
from oculi_dsl.testing import tiny_model

PROMPT = "Once upon a time"
N_NEW = 8
# min_new_tokens keeps the tiny random models from stopping on an early EOS
GREEDY = {"do_sample": False, "min_new_tokens": N_NEW}
ATOL = 1e-5
















def pad_id(m: OculiModel) -> int:
    tok = m.tokenizer
    return next(i for i in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, 0) if i is not None)


def plain_generate(m: OculiModel, ids: torch.Tensor, mask: torch.Tensor | None = None,
                   *hooks: Any, n_new: int = N_NEW) -> tuple[torch.Tensor, list[int]]:
    """``m.hf.generate`` with optional hooks; returns (sequences, step counter per forward)."""
    steps: list[int] = []
    counter = (m.hf, "pre", lambda mod, args: steps.append(len(steps)))
    with hooked(counter, *hooks), torch.no_grad():
        out = m.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                            max_new_tokens=n_new, pad_token_id=pad_id(m), **GREEDY)
    return out, steps


def zero_head(m: OculiModel, head: int, when: Callable[[], bool] = lambda: True) -> Callable[..., Any]:
    d = m.info.d_head

    def hook(mod: Any, args: Any) -> Any:
        if not when():
            return None
        x = args[0].clone()
        x[..., head * d:(head + 1) * d] = 0.0
        return (x, *args[1:])

    return hook


def full_forward(m: OculiModel, seq: torch.Tensor) -> Any:
    """A no-cache eager forward over a whole sequence (for per-position expectations)."""
    impl = m.hf.config._attn_implementation
    m.hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return m.hf(input_ids=seq[None], output_hidden_states=True, output_attentions=True,
                        use_cache=False)
    finally:
        m.hf.set_attn_implementation(impl)


# ----------------------------------------------------------------------------- equivalence


def test_scale_one_equals_plain_generate(tiny: OculiModel) -> None:
    m = tiny
    ids = ids_of(m, PROMPT)
    mapping = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    with oculi.generate(m, PROMPT, max_new_tokens=N_NEW, **GREEDY) as g:
        g.layers[1].attn.q.scale(1.0, head=0)
        g.layers[1].attn.pattern.save("pat")
    expected, _ = plain_generate(m, ids)
    assert torch.equal(g.tokens, expected[0])
    assert g.tokens.shape == (ids.shape[1] + N_NEW,)
    assert g.text == m.tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == mapping
    assert g.result["pat"].dims == ("step", "head", "query", "key")
    assert g.result["pat"].coords["step"].values.tolist() == list(range(N_NEW))


def test_no_intervention_equals_plain_generate_and_restores(tiny: OculiModel) -> None:
    m = tiny
    ids = ids_of(m, PROMPT)
    impl = m.hf.config._attn_implementation
    with oculi.generate(m, PROMPT, max_new_tokens=N_NEW, **GREEDY) as g:
        g.layers[2].resid_post[-1].save("last")
    assert torch.equal(g.tokens, plain_generate(m, ids)[0][0])
    assert m.hf.config._attn_implementation == impl


def test_strong_q_scale_changes_text_and_matches_hand_hooks() -> None:
    m = tiny_model("llama")
    ids = ids_of(m, PROMPT)
    alpha = 50.0  # tiny random weights give near-uniform attention: it takes a large alpha
    with oculi.generate(m, PROMPT, max_new_tokens=N_NEW, **GREEDY) as g:
        for h in range(m.info.n_heads):
            g.layers[:].attn.q.scale(alpha, head=h)
    plain, _ = plain_generate(m, ids)
    assert not torch.equal(g.tokens, plain[0])
    assert g.text != m.tokenizer.decode(plain[0, ids.shape[1]:], skip_special_tokens=True)

    # hand: rotary is linear and Llama has no q_norm, so scaling post-rotary q equals scaling q_proj
    def scale_q(mod: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        return out * alpha

    hooks = [(attn_module(m, i).q_proj, "fwd", scale_q) for i in range(m.info.n_layers)]
    assert torch.equal(g.tokens, plain_generate(m, ids, None, *hooks)[0][0])


def test_head_ablation_generation_matches_hand_hooks(tiny: OculiModel) -> None:
    m = tiny
    ids = ids_of(m, PROMPT)
    with oculi.generate(m, PROMPT, max_new_tokens=N_NEW, **GREEDY) as g:
        for h in (0, 1, 2):
            g.layers[:].attn.heads[h].ablate()
        g.logits[-1].save("logits")
    hooks = [(out_proj(m, i), "pre", zero_head(m, h)) for i in range(m.info.n_layers) for h in (0, 1, 2)]
    expected, _ = plain_generate(m, ids, None, *hooks)
    assert torch.equal(g.tokens, expected[0])
    # per-step logits of the last token equal a no-cache forward with the same hooks
    with hooked(*hooks):
        full = full_forward(m, g.tokens[:-1])
    n = ids.shape[1]
    torch.testing.assert_close(g.saved["logits"][0], full.logits[0, n - 1], atol=1e-4, rtol=0)
    stacked = g.result["logits"]
    assert stacked.dims == ("step", "vocab")
    torch.testing.assert_close(torch.as_tensor(stacked.values), full.logits[0, n - 1:], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- saves per step


def test_saves_stack_on_step_and_equal_full_forward(tiny: OculiModel) -> None:
    m, layer = tiny, 1
    ids = ids_of(m, PROMPT)
    n = ids.shape[1]
    with oculi.generate(m, PROMPT, max_new_tokens=N_NEW, **GREEDY) as g:
        g.layers[layer].resid_post[-1].save("last")
        g.layers[layer].resid_post.save("resid")
        g.layers[layer].attn.pattern.save("pat")
        g.layers[layer].attn.q.save("q")
    ds = g.result
    total = n + N_NEW
    assert ds["last"].dims == ("step", "d_model")
    assert ds["resid"].dims == ("step", "token", "d_model")
    assert ds["resid"].shape == (N_NEW, total, m.info.d_model)
    assert ds["pat"].shape == (N_NEW, m.info.n_heads, total, total)
    # step 0 computes the prompt, step s > 0 only the token at position n + s - 1
    computed = torch.zeros(N_NEW, total, dtype=torch.bool)
    computed[0, :n] = True
    for s in range(1, N_NEW):
        computed[s, n + s - 1] = True
    resid = torch.as_tensor(ds["resid"].values)
    assert torch.equal(~resid.isnan().all(-1), computed)
    full = full_forward(m, g.tokens[:-1])  # the last token is generated, never fed back
    hidden = full.hidden_states[layer + 1][0]  # output of block `layer`
    rows = torch.tensor([n - 1 + s for s in range(N_NEW)])
    torch.testing.assert_close(torch.as_tensor(ds["last"].values), hidden[rows], atol=1e-4, rtol=0)
    torch.testing.assert_close(resid[0, :n], hidden[:n], atol=1e-4, rtol=0)
    pat = torch.as_tensor(ds["pat"].values)
    eager = full.attentions[layer][0]  # (head, query, key) over total - 1 positions
    torch.testing.assert_close(pat[0, :, :n, :n], eager[:, :n, :n], atol=ATOL, rtol=0)
    for s in range(1, N_NEW):
        p = n + s - 1
        row = pat[s, :, p]  # (head, key): keys 0..p computed, later keys do not exist yet
        torch.testing.assert_close(row[:, :p + 1], eager[:, p, :p + 1], atol=ATOL, rtol=0)
        assert row[:, p + 1:].isnan().all()
        assert pat[s, :, :p].isnan().all() and pat[s, :, p + 1:].isnan().all()
    q = torch.as_tensor(ds["q"].values)  # (step, head, token, d_head)
    assert q.shape == (N_NEW, m.info.n_heads, total, m.info.d_head)


def test_cached_step_site_shapes() -> None:
    """At a cached step a site holds the new token only; keys span the whole cache."""
    m = tiny_model("llama")
    n = ids_of(m, PROMPT).shape[1]
    seen: list[tuple[int, ...]] = []

    def shapes(mod: Any, args: Any, out: Any) -> None:
        seen.append(tuple(out[1].shape) if out[1] is not None else ())

    greedy3 = {**GREEDY, "min_new_tokens": 3}
    with hooked((attn_module(m, 1), "fwd", shapes)), \
            oculi.generate(m, PROMPT, max_new_tokens=3, **greedy3) as g:
        g.layers[1].attn.pattern[:, -1].save("last_row")
        g.layers[1].attn.k[:, -1].save("newest_key")
    # attention weights come out of the routed layer per step: (1, head, new tokens, all keys)
    assert seen == [(1, 4, n, n), (1, 4, 1, n + 1), (1, 4, 1, n + 2)]
    rows = torch.as_tensor(g.result["last_row"].values)
    assert rows.shape == (3, 4, n + 3)  # key positions of the whole output; the last is never fed back
    for s in range(3):  # each step's row sums to 1 over the keys that exist at that step
        torch.testing.assert_close(rows[s, :, :n + s].sum(-1), torch.ones(4), atol=1e-6, rtol=0)
        assert rows[s, :, n + s:].isnan().all()
    assert g.result["newest_key"].dims == ("step", "kv_head", "d_head")


# ----------------------------------------------------------------------------- steps


def test_step_restricted_edit_touches_only_those_steps() -> None:
    m, layer = tiny_model("llama"), 1
    ids = ids_of(m, PROMPT)
    with oculi.generate(m, PROMPT, max_new_tokens=N_NEW, **GREEDY) as g:
        g.layers[layer].mlp.out[-1].save("before")
        with g.steps[2:4]:
            g.layers[layer].mlp.out = 0
        g.layers[layer].mlp.out[-1].save("after")
        g.layers[layer].resid_post[-1].save("resid")
    before, after = torch.as_tensor(g.result["before"].values), torch.as_tensor(g.result["after"].values)
    for s in range(N_NEW):
        if s in (2, 3):
            assert torch.all(after[s] == 0.0) and not torch.all(before[s] == 0.0)
        else:
            assert torch.equal(after[s], before[s])
    # hand: a step counter gates a hook that zeroes the MLP output
    plain, _ = plain_generate(m, ids)
    steps: list[int] = []

    def zero_mlp(mod: Any, args: Any, out: torch.Tensor) -> Any:
        return torch.zeros_like(out) if len(steps) - 1 in (2, 3) else None

    mlp = layer_module(m, layer).mlp
    expected, counted = plain_generate(m, ids, None, (m.hf, "pre", lambda *a: steps.append(1)),
                                       (mlp, "fwd", zero_mlp))
    assert len(counted) == N_NEW
    assert torch.equal(g.tokens, expected[0])
    # steps 0, 1 are untouched: same tokens and same values as the plain generation
    assert torch.equal(g.tokens[:ids.shape[1] + 2], plain[0, :ids.shape[1] + 2])
    with oculi.generate(m, PROMPT, max_new_tokens=N_NEW, **GREEDY) as ref:
        ref.layers[layer].resid_post[-1].save("resid")
    r, r0 = torch.as_tensor(g.result["resid"].values), torch.as_tensor(ref.result["resid"].values)
    torch.testing.assert_close(r[:2], r0[:2], atol=0, rtol=0)
    assert not torch.allclose(r[2], r0[2], atol=1e-4)


def test_step_restricted_q_scale() -> None:
    m, layer, head = tiny_model("llama"), 1, 0
    ids = ids_of(m, PROMPT)
    d = m.info.d_head
    with oculi.generate(m, PROMPT, max_new_tokens=N_NEW, **GREEDY) as g:
        g.layers[layer].attn.q[:, -1].save("q_before")
        with g.steps[1]:
            g.layers[layer].attn.q.scale(6.0, head=head)
        g.layers[layer].attn.q[:, -1].save("q_after")
        g.layers[layer].attn.pattern[head, -1].save("row")
    qb, qa = torch.as_tensor(g.result["q_before"].values), torch.as_tensor(g.result["q_after"].values)
    for s in range(N_NEW):
        expected = qb[s].clone()
        if s == 1:
            expected[head] *= 6.0
        torch.testing.assert_close(qa[s], expected, atol=ATOL, rtol=0)
    steps: list[int] = []

    def scale_q(mod: Any, args: Any, out: torch.Tensor) -> Any:
        if len(steps) - 1 != 1:
            return None
        out = out.clone()
        out[..., head * d:(head + 1) * d] *= 6.0
        return out

    expected, _ = plain_generate(m, ids, None, (m.hf, "pre", lambda *a: steps.append(1)),
                                 (attn_module(m, layer).q_proj, "fwd", scale_q))
    assert torch.equal(g.tokens, expected[0])


@pytest.mark.parametrize("index", [8, -9, slice(8, 10), [1, 9]])
def test_step_selection_out_of_range(index: Any) -> None:
    m = tiny_model("llama")
    with pytest.raises(oculi.RecordError, match="step"), \
            oculi.generate(m, PROMPT, max_new_tokens=N_NEW) as g, g.steps[index]:
        g.layers[1].attn.q.scale(2.0, head=0)


# ----------------------------------------------------------------------------- several prompts


def test_multi_prompt_generation(tiny: OculiModel) -> None:
    m, layer = tiny, 1
    prompts = ["Once upon a time there was", "The cat"]
    with oculi.generate(m, prompts, max_new_tokens=N_NEW, **GREEDY) as g:
        g.layers[layer].attn.heads[1].ablate()
        g.layers[layer].resid_post[:, -1].save("last")  # (prompt, token, d_model): last token
    batch = g.plan.batch
    assert batch.attention_mask is not None
    hook = (out_proj(m, layer), "pre", zero_head(m, 1))
    expected, _ = plain_generate(m, batch.input_ids, batch.attention_mask, hook)
    assert torch.equal(g.tokens, expected)
    assert isinstance(g.text, list) and len(g.text) == 2
    width = batch.input_ids.shape[1]
    assert g.text == [m.tokenizer.decode(r[width:], skip_special_tokens=True) for r in expected]
    last = torch.as_tensor(g.result["last"].values)
    assert g.result["last"].dims == ("step", "prompt", "d_model")
    for p, prompt in enumerate(prompts):  # each row equals its prompt run alone, no padding
        n = ids_of(m, prompt).shape[1]
        seq = g.tokens[p, width - n:-1]
        with hooked(hook):
            hidden = full_forward(m, seq).hidden_states[layer + 1][0]
        torch.testing.assert_close(last[:, p], hidden[n - 1:], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- keys and the cache


def test_k_scale_during_generation_matches_hand_hooks() -> None:
    """Scaling one KV head's keys at every step equals scaling k_proj's output for that head.

    (Llama has no k_norm and rotary is linear, so both give the same post-rotary keys; the hand
    version stores scaled keys in the cache, oculi scales cached and new keys at each step.)
    """
    m, layer, group, alpha = tiny_model("llama"), 2, 1, 40.0
    ids = ids_of(m, PROMPT)
    d = m.info.d_head
    with oculi.generate(m, PROMPT, max_new_tokens=N_NEW, **GREEDY) as g:
        g.layers[layer].attn.k.scale(alpha, kv_head=group)
        g.logits[-1].save("logits")

    def scale_k(mod: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[..., group * d:(group + 1) * d] *= alpha
        return out

    with hooked((attn_module(m, layer).k_proj, "fwd", scale_k)), torch.no_grad():
        hand = m.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW,
                             pad_token_id=pad_id(m), output_logits=True, return_dict_in_generate=True,
                             **GREEDY)
    assert torch.equal(g.tokens, hand.sequences[0])
    logits = torch.as_tensor(g.result["logits"].values)
    torch.testing.assert_close(logits, torch.cat(hand.logits), atol=1e-4, rtol=0)
    plain = m.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW,
                          pad_token_id=pad_id(m), output_logits=True, return_dict_in_generate=True, **GREEDY)
    assert not torch.allclose(logits, torch.cat(plain.logits), atol=1e-3)


def _cache_keys(m: OculiModel, seq: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's own post-rotary keys and values of every position, (kv_head, position, d_head).

    The key of position j is the newest entry of the cache after a forward over tokens 0..j
    (sliding-window layers keep only their window, so each position gets its own forward).
    """
    keys, values = [], []
    with torch.no_grad():
        for j in range(seq.shape[0]):
            cache = m.hf(input_ids=seq[None, :j + 1], use_cache=True).cache.layers[layer]
            keys.append(cache.keys[0, :, -1])
            values.append(cache.values[0, :, -1])
    return torch.stack(keys, 1), torch.stack(values, 1)


def test_whole_k_and_v_saved_during_generation() -> None:
    """At a cached step attn.k / attn.v hold the whole cache: keys 0..p, laid out on positions."""
    m, layer = tiny_model("llama"), 1
    n = ids_of(m, PROMPT).shape[1]
    with oculi.generate(m, PROMPT, max_new_tokens=N_NEW, **GREEDY) as g:
        g.layers[layer].attn.k.save("k")
        g.layers[layer].attn.v.save("v")
    keys, values = _cache_keys(m, g.tokens[:-1], layer)  # (kv_head, position, d_head)
    for name, ref in (("k", keys), ("v", values)):
        got = torch.as_tensor(g.result[name].values)
        assert g.result[name].dims == ("step", "kv_head", "token", "d_head")
        assert got.shape == (N_NEW, m.info.n_kv_heads, n + N_NEW, m.info.d_head)
        for s in range(N_NEW):
            seen = n + s  # positions whose keys exist at step s
            torch.testing.assert_close(got[s, :, :seen], ref[:, :seen], atol=1e-4, rtol=0)
            assert got[s, :, seen:].isnan().all()


def test_patterns_of_all_layers_during_generation(tiny: OculiModel) -> None:
    """``layers[:].attn.pattern`` over a generation: every row equals the eager full forward.

    On Gemma 3 sliding layers keys outside the window are not in the cache at a cached step;
    their weight is exactly 0 or NaN (not computed), never another key's weight.
    """
    m = tiny
    n = ids_of(m, PROMPT).shape[1]
    with oculi.generate(m, PROMPT, max_new_tokens=N_NEW, **GREEDY) as g:
        g.layers[:].attn.pattern.save("pat")
    pat = torch.as_tensor(g.result["pat"].values)  # (step, layer, head, query, key)
    assert g.result["pat"].dims == ("step", "layer", "head", "query", "key")
    eager = full_forward(m, g.tokens[:-1]).attentions
    types = getattr(m.hf.config, "layer_types", None)
    for layer in range(m.info.n_layers):
        window = m.hf.config.sliding_window if types and types[layer] == "sliding_attention" else None
        torch.testing.assert_close(pat[0, layer, :, :n, :n], eager[layer][0, :, :n, :n], atol=ATOL, rtol=0)
        for s in range(1, N_NEW):
            p = n + s - 1
            row, ref = pat[s, layer, :, p], eager[layer][0, :, p]
            first = 0 if window is None else max(0, p - window + 1)
            torch.testing.assert_close(row[:, first:p + 1], ref[:, first:p + 1], atol=ATOL, rtol=0)
            outside = row[:, :first]
            assert torch.all((outside == 0) | outside.isnan()), f"layer {layer} step {s}"
            assert row[:, p + 1:].isnan().all()


def test_gemma3_sliding_layer_keys_during_generation() -> None:
    """A sliding layer's cache holds the last window of keys; saved keys sit on their positions."""
    m = tiny_model("gemma3")
    layer, window = 0, m.hf.config.sliding_window
    assert m.hf.config.layer_types[layer] == "sliding_attention"
    n = ids_of(m, PROMPT).shape[1]
    with oculi.generate(m, PROMPT, max_new_tokens=N_NEW, **GREEDY) as g:
        g.layers[layer].attn.k.save("k")
        g.layers[layer].attn.pattern[:, -1].save("row")
    full = full_forward(m, g.tokens[:-1])
    ref_keys, _ = _cache_keys(m, g.tokens[:-1], layer)
    keys = torch.as_tensor(g.result["k"].values)  # (step, kv_head, token, d_head)
    rows = torch.as_tensor(g.result["row"].values)  # (step, head, key)
    torch.testing.assert_close(keys[0, :, :n], ref_keys[:, :n], atol=1e-4, rtol=0)
    for s in range(1, N_NEW):
        p = n + s - 1
        first = max(0, p - window + 1)  # the keys this step's cache holds
        torch.testing.assert_close(keys[s, :, first:p + 1], ref_keys[:, first:p + 1], atol=1e-4, rtol=0)
        assert keys[s, :, p + 1:].isnan().all()
        torch.testing.assert_close(rows[s, :, first:p + 1], full.attentions[layer][0, :, p, first:p + 1],
                                   atol=ATOL, rtol=0)
        assert torch.all((rows[s, :, :first] == 0) | rows[s, :, :first].isnan())


def test_padded_prompts_on_sliding_layer_during_generation() -> None:
    """Left padding + sliding window + cache: each prompt's rows equal its own eager forward."""
    m, layer = tiny_model("gemma3"), 0
    window = m.hf.config.sliding_window
    prompts = ["Once upon a time there was", "The cat"]
    with oculi.generate(m, prompts, max_new_tokens=N_NEW, **GREEDY) as g:
        g.layers[layer].attn.pattern[:, :, -1].save("row")  # (prompt, head, query, key): last query
    rows = torch.as_tensor(g.result["row"].values)  # (step, prompt, head, key)
    assert g.result["row"].dims == ("step", "prompt", "head", "key")
    width = g.plan.batch.length
    for p, prompt in enumerate(prompts):
        n = ids_of(m, prompt).shape[1]
        pad = width - n
        eager = full_forward(m, g.tokens[p, pad:-1]).attentions[layer][0]  # own positions
        for s in range(N_NEW):
            q = n - 1 + s  # the query this step computes, in the prompt's own positions
            first = max(0, q - window + 1)
            got = rows[s, p, :, pad + first:pad + q + 1]
            torch.testing.assert_close(got, eager[:, q, first:q + 1], atol=ATOL, rtol=0)
            assert torch.all((rows[s, p, :, :pad + first] == 0) | rows[s, p, :, :pad + first].isnan())
