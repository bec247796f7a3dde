"""Attention interventions (issue 3): q/k scaling, head ablation, swaps and pattern edits.

Every expectation is computed WITHOUT oculi: hand-written hooks on the output projection, the
pattern written out as softmax(α · mask(q kᵀ · s)) from captured q and k, and plain forwards
(``_attention_ref``). The tiny models are fp32, so the tolerance is 1e-5 throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hf_reference import attn_module, ids_of, out_proj
from hf_reference import path as ref_path

import oculi_dsl as oculi
from oculi_dsl.models import OculiModel
from oculi_dsl.testing import tiny_model

from ._attention_ref import (
    ATOL,
    OTHER,
    PROMPT,
    bare,
    capture_layer,
    expected_pattern,
    replace_head_hook,
    visible,
)

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
