"""Executor details: values are released after their last consumer, early stop at final_norm."""

from __future__ import annotations

import torch

import oculi_dsl as oculi

PROMPT = "The capital of France is"


def _calls(module: torch.nn.Module) -> list[int]:
    seen: list[int] = []
    module.register_forward_pre_hook(lambda mod, args: seen.append(1))
    return seen


def test_release_points_follow_execution_order() -> None:
    model = oculi.testing.tiny_model("llama")
    with oculi.trace(model, PROMPT) as t:
        h = t.layers[1].resid_post
        doubled = h * 2
        doubled.sum().save("total")
        t.layers[:].resid_post.save("all")
        h.save("h")  # recorded last, but runs at layer 1, before the stack at layer 3
    plan = t.plan
    by_name = {n.name: n for n in plan.graph.nodes}
    released_after = {c.name: {i.name for i in inputs} for c, inputs in plan.release.items()}
    mul = by_name["mul"]
    assert mul.name in released_after["sum_1"]
    # the layer-1 read is last used by the stack (layer 3), not by the save recorded after it
    read = next(n for n in plan.graph.nodes if n.meta.get("site_label") == "layers[1].resid_post")
    assert read.name in released_after["stack_layers"]
    torch.testing.assert_close(t.saved["total"], (t.saved["h"] * 2).sum())
    torch.testing.assert_close(t.saved["all"][1], t.saved["h"])


def test_values_assigned_to_sites_are_never_released() -> None:
    model = oculi.testing.tiny_model("llama")
    with oculi.trace(model, PROMPT) as t:
        t.layers[1].mlp.out = t.layers[1].mlp.out * 0
        t.layers[2].resid_pre.save("pre")
        t.layers[1].resid_mid.save("mid")
    released = {i for inputs in t.plan.release.values() for i in inputs}
    writes = {n for s in t.plan.steps for _, n in s.writes}
    assert writes and not writes & released
    torch.testing.assert_close(t.saved["pre"], t.saved["mid"])


def test_reading_final_norm_last_skips_the_unembedding() -> None:
    model = oculi.testing.tiny_model("llama")
    seen = _calls(model.hf.lm_head)
    try:
        with oculi.trace(model, PROMPT) as t:
            t.final_norm.save("normed")
        assert seen == []
        with torch.no_grad():
            out = model.hf(torch.tensor([model.tokenizer(PROMPT)["input_ids"]]), output_hidden_states=True)
        torch.testing.assert_close(t.saved["normed"], out.hidden_states[-1][0], atol=1e-6, rtol=0)
        seen.clear()
        with oculi.trace(model, PROMPT) as t2:
            t2.logits.save("logits")
        assert seen == [1]
    finally:
        model.hf.lm_head._forward_pre_hooks.clear()
