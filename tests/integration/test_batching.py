"""Batched invokes equal single-prompt traces (left padding, ``-1`` = last real token).

Every family, both ways of batching: one invoke given a list of prompts, and several
``t.invoke`` calls of different lengths. The reference is the same trace run on each prompt
alone (itself checked against HF in test_sites.py) and, for logits, a plain HF forward.
"""

from __future__ import annotations

import hf_reference as ref
import torch

import oculi_dsl as oculi
from oculi_dsl.models import OculiModel

# Different token lengths on every tiny tokenizer; the longest is in the middle.
PROMPTS = ["The capital of France is", "Once upon a time, there was a little girl", "A cat"]
ATOL = 1e-5


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def _single(model: OculiModel, prompt: str) -> dict[str, torch.Tensor]:
    with oculi.trace(model, prompt) as t:
        t.layers[:].resid_post.save("post")
        t.layers[1].mlp.act.save("act")
        t.logits.save("logits")
    return t.saved


def test_prompts_have_different_lengths(tiny: OculiModel) -> None:
    lengths = [ref.ids_of(tiny, p).shape[1] for p in PROMPTS]
    assert len(set(lengths)) == len(PROMPTS)


def test_list_of_prompts_equals_single_traces(tiny: OculiModel) -> None:
    with oculi.trace(tiny, PROMPTS) as t:
        t.layers[:].resid_post.save("post")
        t.layers[1].mlp.act.save("act")
        t.logits.save("logits")
        t.logits[:, -1].save("last")
    width = max(ref.ids_of(tiny, p).shape[1] for p in PROMPTS)
    assert t.saved["post"].shape[:3] == (ref.n_layers(tiny), len(PROMPTS), width)
    for i, prompt in enumerate(PROMPTS):
        alone = _single(tiny, prompt)
        n = alone["post"].shape[1]
        _close(t.saved["post"][:, i, width - n:], alone["post"])
        _close(t.saved["act"][i, width - n:], alone["act"])
        _close(t.saved["logits"][i, width - n:], alone["logits"])
        _close(t.saved["last"][i], alone["logits"][-1])
        bare = ref.hf_forward(tiny, ref.ids_of(tiny, prompt)).logits[0, -1]
        _close(t.saved["last"][i], bare)


def test_several_invokes_equal_single_traces(tiny: OculiModel) -> None:
    with oculi.trace(tiny) as t:
        for i, prompt in enumerate(PROMPTS):
            with t.invoke(prompt) as x:
                x.layers[:].resid_post.save(f"post{i}")
                x.layers[1].mlp.act.save(f"act{i}")
                x.logits[-1].save(f"last{i}")
    for i, prompt in enumerate(PROMPTS):
        alone = _single(tiny, prompt)
        # each invoke sees its own tokens only: no padding in its values
        assert t.saved[f"post{i}"].shape == alone["post"].shape
        _close(t.saved[f"post{i}"], alone["post"])
        _close(t.saved[f"act{i}"], alone["act"])
        _close(t.saved[f"last{i}"], alone["logits"][-1])


def test_invoke_dims_and_token_strings(tiny: OculiModel) -> None:
    with oculi.trace(tiny) as t:
        for i, prompt in enumerate(PROMPTS):
            with t.invoke(prompt) as x:
                x.layers[:].resid_post.save(f"post{i}")
    for i, prompt in enumerate(PROMPTS):
        var = t.result[f"post{i}"]
        assert len(var.dims) == 3 and var.dims[0] == "layer" and var.dims[2] == "d_model"
        tok = var.dims[1]
        assert tok.startswith("token")
        strs = [c for c in var.coords if c.startswith("token_str")]
        assert len(strs) == 1
        assert list(var[strs[0]].values) == ref.token_strs(tiny, prompt)


def test_padded_positions_have_empty_token_str(tiny: OculiModel) -> None:
    with oculi.trace(tiny, PROMPTS) as t:
        t.layers[:].resid_post.save("post")
    ds = t.result
    assert ds["post"].dims == ("layer", "prompt", "token", "d_model")
    assert ds["token_str"].dims == ("prompt", "token")
    width = ds.sizes["token"]
    for i, prompt in enumerate(PROMPTS):
        strs = ref.token_strs(tiny, prompt)
        row = list(ds["token_str"].values[i])
        assert row == [""] * (width - len(strs)) + strs
    assert ds["prompt"].values.tolist() == [0, 1, 2]
    assert list(ds["prompt_text"].values) == PROMPTS


def test_last_token_index_is_last_real_token(tiny: OculiModel) -> None:
    with oculi.trace(tiny, PROMPTS) as t:
        t.layers[2].resid_post[:, -1].save("last_resid")
        t.tokens  # noqa: B018 - recorded access must not fail
    hs = [ref.hf_forward(tiny, ref.ids_of(tiny, p), output_hidden_states=True).hidden_states[3][0, -1]
          for p in PROMPTS]
    _close(t.saved["last_resid"], torch.stack(hs))
    assert t.result["last_resid"].dims == ("prompt", "d_model")


def test_tokens_are_left_padded(tiny: OculiModel) -> None:
    with oculi.trace(tiny, PROMPTS) as t:
        t.logits.save()
    tokens = t.tokens
    width = tokens.shape[1]
    for i, prompt in enumerate(PROMPTS):
        ids = tiny.tokenizer(prompt)["input_ids"]
        assert tokens[i, width - len(ids):].tolist() == ids


def test_edit_in_a_padded_invoke_equals_single_edit(tiny: OculiModel) -> None:
    """Slice assignment indexes the invoke's own tokens, even when the batch pads it."""
    short, long = PROMPTS[2], PROMPTS[1]
    with oculi.trace(tiny) as t:
        with t.invoke(long) as b:
            b.logits[-1].save("long")
        with t.invoke(short) as a:
            a.layers[1].mlp.out[-1] = 0
            a.layers[1].mlp.out[0] = 0
            a.logits.save("short")
    with oculi.trace(tiny, short) as s:
        s.layers[1].mlp.out[-1] = 0
        s.layers[1].mlp.out[0] = 0
        s.logits.save("short")
    _close(t.saved["short"], s.saved["short"])
    # the other invoke is untouched
    _close(t.saved["long"], ref.hf_forward(tiny, ref.ids_of(tiny, long)).logits[0, -1])
    # and the edit did something
    assert not torch.allclose(s.saved["short"], ref.hf_forward(tiny, ref.ids_of(tiny, short)).logits[0],
                              atol=1e-4)


def test_swap_inside_a_padded_batch(tiny: OculiModel) -> None:
    """Clean and corrupted prompts of equal length, batched with a longer third prompt."""
    clean, bad = "The Eiffel Tower is in Paris", "The Eiffel Tower is in London"
    with oculi.trace(tiny) as t:
        with t.invoke(PROMPTS[1]) as other:
            other.logits[-1].save("other")
        with t.invoke(clean) as c:
            h = c.layers[1].resid_post
            c.logits.save("clean")
        with t.invoke(bad) as x:
            x.layers[1].resid_post = h
            x.logits.save("patched")
    _close(t.saved["patched"], t.saved["clean"])
    _close(t.saved["clean"], ref.hf_forward(tiny, ref.ids_of(tiny, clean)).logits[0])
    _close(t.saved["other"], ref.hf_forward(tiny, ref.ids_of(tiny, PROMPTS[1])).logits[0, -1])


def test_list_invoke_next_to_single_invoke(tiny: OculiModel) -> None:
    with oculi.trace(tiny) as t:
        with t.invoke(PROMPTS[:2]) as pair:
            pair.logits[:, -1].save("pair")
        with t.invoke(PROMPTS[2]) as one:
            one.logits[-1].save("one")
    assert t.result["pair"].dims == ("prompt", "vocab")
    assert t.result["one"].dims == ("vocab",)
    for i, prompt in enumerate(PROMPTS[:2]):
        _close(t.saved["pair"][i], ref.hf_forward(tiny, ref.ids_of(tiny, prompt)).logits[0, -1])
    _close(t.saved["one"], ref.hf_forward(tiny, ref.ids_of(tiny, PROMPTS[2])).logits[0, -1])
