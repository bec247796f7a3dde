"""Edits: swaps between invokes, slice assignment, constants, layer selections, resid_mid.

Every edit is compared with the same edit written by hand as forward (pre-)hooks on a plain HF
forward (``hf_reference.capture(..., edits=...)``), or, for swaps, with the clean run.
"""

from __future__ import annotations

import hf_reference as ref
import pytest
import torch

import oculi_dsl as oculi
from oculi_dsl.models import OculiModel

CLEAN, BAD = "The Eiffel Tower is in Paris", "The Eiffel Tower is in London"
ATOL = 1e-5


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, atol=1e-4)


def test_prompts_have_same_length_and_different_logits(tiny: OculiModel) -> None:
    a, b = ref.ids_of(tiny, CLEAN), ref.ids_of(tiny, BAD)
    assert a.shape == b.shape and not torch.equal(a, b)
    assert _differs(ref.hf_forward(tiny, a).logits, ref.hf_forward(tiny, b).logits)


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_resid_post_swap_makes_later_layers_clean(tiny: OculiModel, layer: int) -> None:
    with oculi.trace(tiny) as t:
        with t.invoke(CLEAN) as c:
            h = c.layers[layer].resid_post
            c.layers[:].resid_post.save("clean_post")
            c.logits.save("clean_logits")
        with t.invoke(BAD) as x:
            x.layers[layer].resid_post = h
            x.layers[:].resid_post.save("bad_post")
            x.logits.save("bad_logits")
    s = t.saved
    _close(s["bad_post"][layer:], s["clean_post"][layer:])
    _close(s["bad_logits"], s["clean_logits"])
    if layer > 0:  # before the swap the corrupted run is still corrupted
        assert _differs(s["bad_post"][layer - 1], s["clean_post"][layer - 1])
    hs = ref.hf_forward(tiny, ref.ids_of(tiny, CLEAN)).logits[0]
    _close(s["clean_logits"], hs)


def test_swap_written_before_the_clean_invoke(tiny: OculiModel) -> None:
    """The corrupted invoke may come first: values of the same site flow across the batch."""
    with oculi.trace(tiny) as t:
        x = t.invoke(BAD)
        c = t.invoke(CLEAN)
        x.layers[1].resid_post = c.layers[1].resid_post
        x.logits.save("patched")
        c.logits.save("clean")
    _close(t.saved["patched"], t.saved["clean"])
    _close(t.saved["clean"], ref.hf_forward(tiny, ref.ids_of(tiny, CLEAN)).logits[0])


def test_swap_of_mlp_out_matches_hooks(tiny: OculiModel) -> None:
    got, _ = ref.capture(tiny, ref.ids_of(tiny, CLEAN), {"mlp": ref.Capture(ref.path(tiny, "mlp", 2))})
    clean_mlp = got["mlp"]
    _, expected = ref.capture(tiny, ref.ids_of(tiny, BAD), {},
                              edits=[(ref.path(tiny, "mlp", 2), "output", lambda v: clean_mlp)])
    with oculi.trace(tiny) as t:
        with t.invoke(CLEAN) as c:
            h = c.layers[2].mlp.out
        with t.invoke(BAD) as x:
            x.layers[2].mlp.out = h
            x.logits.save("patched")
    _close(t.saved["patched"], expected.logits[0])


# -- slice assignment ---------------------------------------------------------------------------

def test_slice_assignment_zeroes_one_token(tiny: OculiModel) -> None:
    with oculi.trace(tiny, BAD) as t:
        t.layers[2].mlp.out.save("before")
        t.layers[2].mlp.out[3] = 0
        t.layers[2].mlp.out.save("after")
        t.layers[:].resid_post.save("post")
        t.logits.save("logits")

    def zero_token_3(v: torch.Tensor) -> torch.Tensor:
        v = v.clone()
        v[:, 3] = 0
        return v

    path = ref.path(tiny, "mlp", 2)
    got, out = ref.capture(tiny, ref.ids_of(tiny, BAD), {
        f"post{i}": ref.Capture(ref.path(tiny, "layer", i)) for i in range(ref.n_layers(tiny))},
        edits=[(path, "output", zero_token_3)])
    before, after = t.saved["before"], t.saved["after"]
    assert torch.equal(after[3], torch.zeros_like(after[3]))
    keep = [i for i in range(after.shape[0]) if i != 3]
    assert torch.equal(after[keep], before[keep])
    assert before[3].abs().max() > 0  # the save made before the edit keeps the value as read
    _close(t.saved["logits"], out.logits[0])
    for i in range(ref.n_layers(tiny)):
        _close(t.saved["post"][i], got[f"post{i}"][0])


def test_slice_assignment_of_a_feature_column(tiny: OculiModel) -> None:
    with oculi.trace(tiny, BAD) as t:
        t.layers[1].resid_post[:, 5] = 2.5
        t.logits.save("logits")

    def set_col(v: torch.Tensor) -> torch.Tensor:
        v = v.clone()
        v[..., 5] = 2.5
        return v

    _, out = ref.capture(tiny, ref.ids_of(tiny, BAD), {},
                         edits=[(ref.path(tiny, "layer", 1), "output", set_col)])
    _close(t.saved["logits"], out.logits[0])


def test_slice_assignment_on_a_proxy_variable_keeps_earlier_save(tiny: OculiModel) -> None:
    with oculi.trace(tiny, BAD) as t:
        v = t.layers[2].mlp.act
        v.save("as_read")
        v[:, :10] = 0
        t.layers[2].mlp.act.save("edited")
    got, _ = ref.capture(tiny, ref.ids_of(tiny, BAD), {"act": ref.Capture(ref.path(tiny, "down", 2), "input")})
    _close(t.saved["as_read"], got["act"][0], atol=1e-6)
    expected = got["act"][0].clone()
    expected[:, :10] = 0
    _close(t.saved["edited"], expected, atol=1e-6)


# -- constants ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["number", "full_tensor", "row_vector", "float64_tensor"])
def test_assign_constant(tiny: OculiModel, kind: str) -> None:
    n_tok, d = ref.ids_of(tiny, BAD).shape[1], tiny.info.d_model
    gen = torch.Generator().manual_seed(1)
    value: object = {
        "number": 0.5,
        "full_tensor": torch.randn(n_tok, d, generator=gen),
        "row_vector": torch.randn(d, generator=gen),
        "float64_tensor": torch.randn(n_tok, d, generator=gen, dtype=torch.float64),
    }[kind]
    with oculi.trace(tiny, BAD) as t:
        t.layers[1].mlp.out = value
        t.layers[1].mlp.out.save("site")
        t.logits.save("logits")

    def put(v: torch.Tensor) -> torch.Tensor:
        return torch.broadcast_to(torch.as_tensor(value, dtype=v.dtype), v.shape).clone()

    _, out = ref.capture(tiny, ref.ids_of(tiny, BAD), {},
                         edits=[(ref.path(tiny, "mlp", 1), "output", put)])
    assert t.saved["site"].dtype == torch.float32
    _close(t.saved["site"], put(torch.empty(n_tok, d)), atol=1e-6)
    _close(t.saved["logits"], out.logits[0])


def test_assign_computed_from_same_site(tiny: OculiModel) -> None:
    with oculi.trace(tiny, BAD) as t:
        t.layers[2].attn.out = t.layers[2].attn.out * 3.0
        t.logits.save("logits")
    _, out = ref.capture(tiny, ref.ids_of(tiny, BAD), {},
                         edits=[(ref.path(tiny, "attn", 2), "output", lambda v: v * 3.0)])
    _close(t.saved["logits"], out.logits[0])


def test_assign_from_earlier_site_of_same_layer(tiny: OculiModel) -> None:
    got, _ = ref.capture(tiny, ref.ids_of(tiny, BAD), {"attn": ref.Capture(ref.path(tiny, "attn", 1))})
    attn = got["attn"]
    _, out = ref.capture(tiny, ref.ids_of(tiny, BAD), {},
                         edits=[(ref.path(tiny, "mlp", 1), "output", lambda v: attn.clone())])
    with oculi.trace(tiny, BAD) as t:
        t.layers[1].mlp.out = t.layers[1].attn.out
        t.logits.save("logits")
    _close(t.saved["logits"], out.logits[0])


# -- layer selections ------------------------------------------------------------------------

def test_layer_selection_assignment(tiny: OculiModel) -> None:
    with oculi.trace(tiny, BAD) as t:
        t.layers[1:3].mlp.out = 0
        t.layers[:].mlp.out.save("mlp")
        t.logits.save("logits")
    _, out = ref.capture(tiny, ref.ids_of(tiny, BAD), {}, edits=[
        (ref.path(tiny, "mlp", i), "output", torch.zeros_like) for i in (1, 2)])
    _close(t.saved["logits"], out.logits[0])
    mlp = t.saved["mlp"]
    assert torch.equal(mlp[1:3], torch.zeros_like(mlp[1:3]))
    assert mlp[0].abs().max() > 0 and mlp[3].abs().max() > 0


def test_layer_selection_swap_between_invokes(tiny: OculiModel) -> None:
    with oculi.trace(tiny) as t:
        with t.invoke(CLEAN) as c:
            h = c.layers[1:3].mlp.out
        with t.invoke(BAD) as x:
            x.layers[1:3].mlp.out = h
            x.logits.save("patched")
    clean = ref.capture(tiny, ref.ids_of(tiny, CLEAN), {
        f"m{i}": ref.Capture(ref.path(tiny, "mlp", i)) for i in (1, 2)})[0]
    _, out = ref.capture(tiny, ref.ids_of(tiny, BAD), {}, edits=[
        (ref.path(tiny, "mlp", i), "output", lambda v, i=i: clean[f"m{i}"].clone()) for i in (1, 2)])
    _close(t.saved["patched"], out.logits[0])


# -- resid_mid: the residual HF keeps inside the layer ------------------------------------------

def _resid_mid_edits(model: OculiModel, layer: int, delta: torch.Tensor) -> list:
    """By hand: add delta to the input of the mid norm AND to the layer output."""
    return [
        (ref.path(model, "mid_norm", layer), "input", lambda v: v + delta),
        (ref.path(model, "layer", layer), "output", lambda v: v + delta),
    ]


def test_resid_mid_edit_propagates(tiny: OculiModel) -> None:
    layer = 1
    delta = torch.randn(tiny.info.d_model, generator=torch.Generator().manual_seed(0))
    with oculi.trace(tiny, BAD) as t:
        t.layers[layer].resid_mid.save("mid_before")
        t.layers[layer].resid_mid = t.layers[layer].resid_mid + delta
        t.layers[layer].resid_mid.save("mid_after")
        t.layers[layer].mlp.out.save("mlp")
        t.layers[layer + 1].resid_pre.save("next_pre")
        t.logits.save("logits")
    got, out = ref.capture(tiny, ref.ids_of(tiny, BAD), {
        "mlp": ref.Capture(ref.path(tiny, "mlp", layer)),
        "next_pre": ref.Capture(ref.path(tiny, "layer", layer + 1), "input"),
    }, edits=_resid_mid_edits(tiny, layer, delta))
    s = t.saved
    _close(s["mid_after"], s["mid_before"] + delta)
    _close(s["mlp"], got["mlp"][0])  # the MLP saw the edited value
    _close(s["next_pre"], got["next_pre"][0])  # and the stream carries it on
    _close(s["logits"], out.logits[0])
    # not vacuous: without the edit, logits differ
    assert _differs(s["logits"], ref.hf_forward(tiny, ref.ids_of(tiny, BAD)).logits[0])


def test_resid_post_read_sees_resid_mid_edit(tiny: OculiModel) -> None:
    """resid_post = resid_mid + mlp.out must hold for the edited resid_mid too."""
    layer = 1
    with oculi.trace(tiny, BAD) as t:
        t.layers[layer].resid_mid = t.layers[layer].resid_mid + 1.0
        t.layers[layer].resid_mid.save("mid")
        t.layers[layer].mlp.out.save("mlp")
        t.layers[layer].resid_post.save("post")
        t.layers[layer + 1].resid_pre.save("next_pre")
    s = t.saved
    _close(s["next_pre"], s["mid"] + s["mlp"])
    _close(s["post"], s["mid"] + s["mlp"])


def test_resid_post_assignment_wins_over_resid_mid_edit(tiny: OculiModel) -> None:
    """Assigning resid_post replaces the layer output; an earlier resid_mid edit is not re-added."""
    layer = 1
    n_tok = ref.ids_of(tiny, BAD).shape[1]
    with oculi.trace(tiny, BAD) as t:
        t.layers[layer].resid_mid = t.layers[layer].resid_mid + 1.0
        t.layers[layer].resid_post = torch.zeros(n_tok, tiny.info.d_model)
        t.layers[layer + 1].resid_pre.save("next_pre")
    assert torch.equal(t.saved["next_pre"], torch.zeros(n_tok, tiny.info.d_model))


# -- saves keep the value as read ----------------------------------------------------------------

def test_save_before_edit_keeps_value_as_read(tiny: OculiModel) -> None:
    got, _ = ref.capture(tiny, ref.ids_of(tiny, BAD), {"mlp": ref.Capture(ref.path(tiny, "mlp", 2))})
    with oculi.trace(tiny, BAD) as t:
        before = t.layers[2].mlp.out.save("before")
        t.layers[2].mlp.out = 0
        t.layers[2].mlp.out.save("after")
        t.layers[2].resid_post.save("post")
        t.layers[2].resid_mid.save("mid")
    _close(t.saved["before"], got["mlp"][0], atol=1e-6)
    assert torch.equal(before.value, t.saved["before"])
    assert torch.equal(t.saved["after"], torch.zeros_like(t.saved["after"]))
    _close(t.saved["post"], t.saved["mid"], atol=1e-6)  # mlp.out = 0 flowed into the stream


def test_save_of_swapped_site_in_source_invoke_is_unchanged(tiny: OculiModel) -> None:
    with oculi.trace(tiny) as t:
        with t.invoke(BAD) as x:
            x.layers[1].resid_post.save("bad_as_read")
        with t.invoke(CLEAN) as c:
            x.layers[1].resid_post = c.layers[1].resid_post
            c.layers[1].resid_post.save("clean")
    hs = ref.hf_forward(tiny, ref.ids_of(tiny, BAD), output_hidden_states=True).hidden_states
    _close(t.saved["bad_as_read"], hs[2][0])
    assert _differs(t.saved["bad_as_read"], t.saved["clean"])


def test_edit_leaves_other_invokes_untouched(tiny: OculiModel) -> None:
    with oculi.trace(tiny) as t:
        with t.invoke(CLEAN) as c:
            c.logits.save("clean")
        with t.invoke(BAD) as x:
            x.layers[0].mlp.out = 0
            x.logits.save("bad")
    _close(t.saved["clean"], ref.hf_forward(tiny, ref.ids_of(tiny, CLEAN)).logits[0])
    _, out = ref.capture(tiny, ref.ids_of(tiny, BAD), {},
                         edits=[(ref.path(tiny, "mlp", 0), "output", torch.zeros_like)])
    _close(t.saved["bad"], out.logits[0])
