"""Differential test against nnsight 0.8: the same saves and the same edits, the same numbers.

nnsight wraps the same HF module (``NNsight(model.hf)``) and is traced with token-id tensors.
nnsight's base ``NNsight`` class runs one batch per trace (no invokes), so the two-prompt swap is
written the nnsight way: both prompts (same token length) in one batch, row 0's layer output
copied into row 1. nnsight requires modules to be accessed in forward order, and it runs the
``with`` body from this file's source, so the blocks below stay simple.
"""

from __future__ import annotations

import hf_reference as ref
import pytest
import torch

import oculi_dsl as oculi
from oculi_dsl.models import OculiModel
from oculi_dsl.testing import tiny_model

nnsight = pytest.importorskip("nnsight")
from nnsight import NNsight  # noqa: E402

CLEAN, BAD = "The Eiffel Tower is in Paris", "The Eiffel Tower is in London"
ATOL = 1e-5

# nnsight addresses modules by attribute path: the two families it is compared on.
LAYERS = {"llama": lambda nn: nn.model.layers, "gpt2": lambda nn: nn.transformer.h}


@pytest.fixture(params=["llama", "gpt2"])
def model(request: pytest.FixtureRequest) -> OculiModel:
    return tiny_model(request.param)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def _layers(model: OculiModel, nn: object) -> object:
    return LAYERS[ref.family(model)](nn)


def test_saves_match_nnsight(model: OculiModel) -> None:
    ids = ref.ids_of(model, CLEAN)
    nn = NNsight(model.hf)
    layers = _layers(model, nn)
    n = ref.n_layers(model)
    outs: list = []
    mlp_outs: list = []
    with torch.no_grad(), nn.trace(ids):
        for i in range(n):
            mlp_outs.append(layers[i].mlp.output.save())
            outs.append(layers[i].output.save())
        logits = nn.output.logits.save()
    with oculi.trace(model, CLEAN) as t:
        t.layers[:].resid_post.save("post")
        t.layers[:].mlp.out.save("mlp")
        t.logits.save("logits")
    assert len(outs) == n
    _close(t.saved["post"], torch.stack([ref.first(o)[0] for o in outs]))
    _close(t.saved["mlp"], torch.stack([ref.first(o)[0] for o in mlp_outs]))
    _close(t.saved["logits"], logits[0])


def test_mlp_act_matches_nnsight(model: OculiModel) -> None:
    ids = ref.ids_of(model, CLEAN)
    nn = NNsight(model.hf)
    layers = _layers(model, nn)
    down = "down_proj" if ref.family(model) == "llama" else "c_proj"
    with torch.no_grad(), nn.trace(ids):
        act = getattr(layers[1].mlp, down).input.save()
    with oculi.trace(model, CLEAN) as t:
        t.layers[1].mlp.act.save("act")
    _close(t.saved["act"], act[0])


def test_resid_post_swap_matches_nnsight(model: OculiModel) -> None:
    both = torch.cat([ref.ids_of(model, CLEAN), ref.ids_of(model, BAD)])
    nn = NNsight(model.hf)
    layers = _layers(model, nn)
    with torch.no_grad(), nn.trace(both):
        out = layers[1].output
        out[1] = out[0]
        nn_logits = nn.output.logits.save()
    with oculi.trace(model) as t:
        with t.invoke(CLEAN) as c:
            h = c.layers[1].resid_post
            c.logits.save("clean")
        with t.invoke(BAD) as x:
            x.layers[1].resid_post = h
            x.logits.save("patched")
    _close(t.saved["patched"], nn_logits[1])
    _close(t.saved["clean"], nn_logits[0])
    assert not torch.allclose(nn_logits[1], ref.hf_forward(model, ref.ids_of(model, BAD)).logits[0],
                              atol=1e-4)


def test_mlp_out_token_ablation_matches_nnsight(model: OculiModel) -> None:
    ids = ref.ids_of(model, BAD)
    nn = NNsight(model.hf)
    layers = _layers(model, nn)
    with torch.no_grad(), nn.trace(ids):
        mlp_out = layers[2].mlp.output
        mlp_out[:, 3] = 0
        nn_logits = nn.output.logits.save()
    with oculi.trace(model, BAD) as t:
        t.layers[2].mlp.out[3] = 0
        t.logits.save("logits")
    _close(t.saved["logits"], nn_logits[0])


def test_logit_lens_matches_nnsight(model: OculiModel) -> None:
    """A module call inside the trace (final norm + unembedding on layer 1) vs nnsight."""
    ids = ref.ids_of(model, CLEAN)
    hf = model.hf
    norm = hf.model.norm if ref.family(model) == "llama" else hf.transformer.ln_f
    nn = NNsight(hf)
    layers = _layers(model, nn)
    with torch.no_grad(), nn.trace(ids):
        hidden = layers[1].output.save()
    with torch.no_grad():
        expected = hf.lm_head(norm(ref.first(hidden)[0]))
    with oculi.trace(model, CLEAN) as t:
        hf.lm_head(norm(t.layers[1].resid_post)).save("lens")
    _close(t.saved["lens"], expected)
