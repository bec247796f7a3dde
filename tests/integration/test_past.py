"""past=: a trace resumed after cached keys/values equals the full forward at the new positions.

The full run and the hand-written reference are plain HF forwards; keys and values come from
the trace's own attn.k / attn.v of the full prompt. Gemma 3's tiny model has a sliding window
of 4, so prefixes longer than the window are covered too.
"""

from __future__ import annotations

import hf_reference as ref
import pytest
import torch

import oculi_dsl as oculi
from oculi_dsl.models import OculiModel

PROMPT = "The Eiffel Tower is in Paris and"
OTHER = "The Eiffel Tower is in Rome and"  # same length, differs at one position


def full_run(model: OculiModel, prompt: str = PROMPT) -> dict[str, torch.Tensor]:
    with oculi.trace(model, prompt) as t:
        t.layers[:].attn.k.save("k")
        t.layers[:].attn.v.save("v")
        t.layers[:].resid_pre.save("pre")
        t.layers[:].resid_post.save("post")
        t.layers[2].attn.q.save("q")
        t.layers[2].attn.z.save("z")
        t.logits.save("logits")
    return t.saved


def past_of(saved: dict[str, torch.Tensor], c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return saved["k"][..., :c, :], saved["v"][..., :c, :]


@pytest.mark.parametrize("c", [1, 3, 6])
def test_resumed_trace_equals_the_full_forward(tiny: OculiModel, c: int) -> None:
    full = full_run(tiny)
    hf = ref.hf_forward(tiny, ref.ids_of(tiny, PROMPT), output_hidden_states=True)
    with ref.count_calls(tiny.hf) as calls, oculi.trace(tiny, PROMPT, past=past_of(full, c)) as t:
        t.layers[:].resid_post.save("post")
        t.layers[2].attn.q.save("q")
        t.layers[2].attn.z.save("z")
        t.logits.save("logits")
    assert len(calls) == 1
    torch.testing.assert_close(t.saved["logits"], hf.logits[0, c:], atol=5e-5, rtol=0)
    torch.testing.assert_close(t.saved["post"], full["post"][:, c:], atol=5e-5, rtol=0)
    torch.testing.assert_close(t.saved["q"], full["q"][:, c:], atol=1e-5, rtol=0)
    torch.testing.assert_close(t.saved["z"], full["z"][c:], atol=1e-5, rtol=0)
    post = t.result["post"]
    assert list(post["token"].values) == list(range(c, len(ref.ids_of(tiny, PROMPT)[0])))
    assert list(post["token_str"].values) == [tiny.tokenizer.decode([i]) for i in ref.ids_of(tiny, PROMPT)[0, c:]]


def test_resumed_edits_equal_edits_in_a_full_run(tiny: OculiModel) -> None:
    """Patch position 4 of layer 1's MLP from another prompt: resumed at position 2 (indices
    shift by 2) and late at layer 1, against the same patch in a full run."""
    clean, corrupt = full_run(tiny), full_run(tiny, OTHER)
    with oculi.trace(tiny) as full:
        with full.invoke(PROMPT) as a:
            h = a.layers[1].mlp.out
        with full.invoke(OTHER) as b:
            b.layers[1].mlp.out[4] = h[4]
            b.logits.save("patched")
    c = 2
    with oculi.trace(tiny) as t:
        with t.invoke(PROMPT, past=past_of(clean, c)) as a:
            a.layers[1].resid_pre = clean["pre"][1, c:]
            h = a.layers[1].mlp.out
        with t.invoke(OTHER, past=past_of(corrupt, c)) as b:
            b.layers[1].resid_pre = corrupt["pre"][1, c:]
            b.layers[1].mlp.out[4 - c] = h[4 - c]
            b.logits.save("patched")
    assert t.plan.start_layer == 1 and t.plan.batch.first == c
    torch.testing.assert_close(t.saved["patched"], full.saved["patched"][c:], atol=5e-5, rtol=0)


def test_a_list_of_prompts_takes_one_past_per_prompt(tiny: OculiModel) -> None:
    a, b = full_run(tiny), full_run(tiny, OTHER)
    c = 3
    keys = torch.stack([a["k"][..., :c, :], b["k"][..., :c, :]], dim=1)
    values = torch.stack([a["v"][..., :c, :], b["v"][..., :c, :]], dim=1)
    with oculi.trace(tiny) as t:
        t.invoke([PROMPT, OTHER], past=(keys, values)).logits.save("both")
    torch.testing.assert_close(t.saved["both"][0], a["logits"][c:], atol=5e-5, rtol=0)
    torch.testing.assert_close(t.saved["both"][1], b["logits"][c:], atol=5e-5, rtol=0)


def test_resuming_leaves_the_model_as_it_was(tiny: OculiModel) -> None:
    full = full_run(tiny)
    before = ref.state(tiny)
    ids = ref.ids_of(tiny, PROMPT)
    logits = ref.hf_forward(tiny, ids).logits
    with oculi.trace(tiny, PROMPT, past=past_of(full, 3)) as t:
        t.layers[1].resid_post[0] = 0
        t.logits.save()
    ref.assert_same_state(before, ref.state(tiny))
    assert torch.equal(ref.hf_forward(tiny, ids).logits, logits)
