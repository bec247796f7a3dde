"""One trace = one forward pass; a trace that needs only early layers stops there, and one
whose every row gets its layer-s input assigned starts there.

Calls are counted with a forward pre-hook the test registers on the HF model (and on decoder
layers), removed afterwards. Values of an early-stopped trace still equal a plain HF forward.
"""

from __future__ import annotations

from typing import Any

import hf_reference as ref
import pytest
import torch

import oculi_dsl as oculi
from oculi_dsl.models import OculiModel

PROMPTS = ("The Eiffel Tower is in Paris", "The Eiffel Tower is in London", "A cat sat on the mat")


def test_one_forward_per_trace(tiny: OculiModel) -> None:
    with ref.count_calls(tiny.hf) as calls:
        with oculi.trace(tiny, PROMPTS[0]) as t:
            t.layers[:].resid_post.save("post")
            t.layers[1].mlp.act.save("act")
            t.logits[-1].softmax(-1).save("probs")
        assert len(calls) == 1


def test_one_forward_with_three_invokes_and_a_swap(tiny: OculiModel) -> None:
    with ref.count_calls(tiny.hf) as calls:
        with oculi.trace(tiny) as t:
            with t.invoke(PROMPTS[0]) as a:
                h = a.layers[1].resid_post
                a.logits.save("a")
            with t.invoke(PROMPTS[1]) as b:
                b.layers[1].resid_post = h
                b.logits.save("b")
            with t.invoke(list(PROMPTS)) as c:
                c.layers[:].mlp.out.save("c")
        assert len(calls) == 1
    assert set(t.saved) == {"a", "b", "c"}


def test_one_forward_for_a_list_of_prompts(tiny: OculiModel) -> None:
    with ref.count_calls(tiny.hf) as calls:
        with oculi.trace(tiny, list(PROMPTS)) as t:
            t.logits.save()
        assert len(calls) == 1
    assert t.saved["logits"].shape[0] == len(PROMPTS)


def test_every_layer_runs_once(tiny: OculiModel) -> None:
    layers = [ref.module(tiny, "layer", i) for i in range(ref.n_layers(tiny))]
    counters = [ref.count_calls(layer) for layer in layers]
    calls = [c.__enter__() for c in counters]
    try:
        with oculi.trace(tiny) as t:
            for p in PROMPTS:
                with t.invoke(p) as x:
                    x.logits.save(p.replace(" ", "_"))
    finally:
        for c in counters:
            c.__exit__(None, None, None)
    assert [len(c) for c in calls] == [1] * len(layers)


@pytest.mark.parametrize("site", ["resid_post", "mlp.out", "resid_pre", "resid_mid"])
def test_early_stop_skips_later_layers(tiny: OculiModel, site: str) -> None:
    with ref.count_calls(ref.module(tiny, "layer", 2)) as later, \
            ref.count_calls(ref.module(tiny, "final_norm")) as norm, \
            ref.count_calls(tiny.hf) as forward:
        with oculi.trace(tiny, PROMPTS[0]) as t:
            value = t.layers[1]
            for part in site.split("."):
                value = getattr(value, part)
            value.save("v")
        assert len(forward) == 1
        assert len(later) == 0
        assert len(norm) == 0


def test_early_stopped_values_equal_hf(tiny: OculiModel) -> None:
    with ref.count_calls(ref.module(tiny, "layer", 2)) as later:
        with oculi.trace(tiny, PROMPTS[1]) as t:
            t.layers[0:2].resid_post.save("post")
            t.layers[1].mlp.out.save("mlp")
            t.embed.save("embed")
        assert len(later) == 0
    hs = ref.hf_forward(tiny, ref.ids_of(tiny, PROMPTS[1]), output_hidden_states=True).hidden_states
    got, _ = ref.capture(tiny, ref.ids_of(tiny, PROMPTS[1]),
                         {"mlp": ref.Capture(ref.path(tiny, "mlp", 1))})
    torch.testing.assert_close(t.saved["post"], torch.stack([hs[1][0], hs[2][0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(t.saved["mlp"], got["mlp"][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(t.saved["embed"], hs[0][0], atol=1e-6, rtol=0)


def test_early_stop_with_swap_between_invokes(tiny: OculiModel) -> None:
    """Swap at layer 0, read layer 1: layers 2.. never run, values equal a full swapped run."""
    with ref.count_calls(ref.module(tiny, "layer", 2)) as later:
        with oculi.trace(tiny) as t:
            with t.invoke(PROMPTS[0]) as a:
                h = a.layers[0].resid_post
            with t.invoke(PROMPTS[1]) as b:
                b.layers[0].resid_post = h
                b.layers[1].resid_post.save("patched")
        assert len(later) == 0
    with oculi.trace(tiny, PROMPTS[0], stop_early=False) as full:
        full.layers[1].resid_post.save("clean")
    torch.testing.assert_close(t.saved["patched"], full.saved["clean"], atol=1e-5, rtol=0)


def test_early_stop_ignores_reads_that_are_never_used(tiny: OculiModel) -> None:
    """A dead read of layer 3 (not saved, not assigned) must not keep layers 2-3 running."""
    with ref.count_calls(ref.module(tiny, "layer", 2)) as later:
        with oculi.trace(tiny, PROMPTS[0]) as t:
            _ = t.layers[3].resid_post * 2  # recorded, but feeds nothing
            t.layers[1].resid_post.save("kept")
        assert len(later) == 0
    assert set(t.saved) == {"kept"}


def test_stop_early_false_runs_everything(tiny: OculiModel) -> None:
    with ref.count_calls(ref.module(tiny, "layer", 3)) as last, \
            ref.count_calls(ref.module(tiny, "final_norm")) as norm:
        with oculi.trace(tiny, PROMPTS[0], stop_early=False) as t:
            t.layers[1].resid_post.save()
        assert len(last) == 1
        assert len(norm) == 1


def test_logits_read_runs_whole_model(tiny: OculiModel) -> None:
    with ref.count_calls(ref.module(tiny, "final_norm")) as norm:
        with oculi.trace(tiny, PROMPTS[0]) as t:
            t.layers[0].resid_post.save()
            t.logits[-1].save("last")
        assert len(norm) == 1
    assert torch.equal(t.saved["last"], ref.hf_forward(tiny, ref.ids_of(tiny, PROMPTS[0])).logits[0, -1])


# -- late start: layers before a fully assigned input are not run ---------------------------------

def _late_start_trace(tiny: OculiModel, states: dict[str, torch.Tensor], stop_early: bool) -> Any:
    with oculi.trace(tiny, stop_early=stop_early) as t:
        with t.invoke(PROMPTS[0]) as a:
            a.layers[2].resid_pre = states["a"]
            h = a.layers[2].mlp.out
            a.logits.save("a")
        with t.invoke(PROMPTS[1]) as b:
            b.layers[2].resid_pre = states["b"]
            b.layers[2].mlp.out[3] = h[3]
            b.layers[3].resid_post.save("b_post")
            b.logits.save("b")
    return t


def test_assigned_layer_input_skips_earlier_layers(tiny: OculiModel) -> None:
    with oculi.trace(tiny) as clean:
        with clean.invoke(PROMPTS[0]) as a:
            a.layers[2].resid_pre.save("a")
        with clean.invoke(PROMPTS[1]) as b:
            b.layers[2].resid_pre.save("b")
    layers = [ref.module(tiny, "layer", i) for i in range(ref.n_layers(tiny))]
    runs = {}
    for stop_early in (True, False):
        counters = [ref.count_calls(layer) for layer in layers]
        calls = [c.__enter__() for c in counters]
        try:
            runs[stop_early] = _late_start_trace(tiny, clean.saved, stop_early)
        finally:
            for c in counters:
                c.__exit__(None, None, None)
        assert [len(c) for c in calls] == ([0, 0, 1, 1] if stop_early else [1, 1, 1, 1])
    late, full = runs[True], runs[False]
    assert (late.plan.start_layer, full.plan.start_layer) == (2, 0)
    for name in ("a", "b", "b_post"):
        assert torch.equal(late.saved[name], full.saved[name]), name
    hf = ref.hf_forward(tiny, ref.ids_of(tiny, PROMPTS[0])).logits[0]
    torch.testing.assert_close(late.saved["a"], hf, atol=1e-5, rtol=0)
