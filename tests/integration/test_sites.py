"""Saved sites equal plain HF values, for every supported family (tiny random models).

References: ``output_hidden_states`` of a plain forward, hand-written forward hooks on the
modules each site names (``hf_reference.PATHS``), and the residual identities
``resid_mid = resid_pre + attn.out``, ``resid_post = resid_mid + mlp.out``. A trace that edits
nothing must give logits bit-identical to a bare forward.
"""

from __future__ import annotations

import hf_reference as ref
import pytest
import torch

import oculi_dsl as oculi
from oculi_dsl.models import OculiModel

PROMPT = "The capital of France is"


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def _trace_all(model: OculiModel, prompt: object = PROMPT) -> oculi.Trace:
    with oculi.trace(model, prompt) as t:
        t.layers[:].resid_pre.save("pre")
        t.layers[:].resid_mid.save("mid")
        t.layers[:].resid_post.save("post")
        t.layers[:].attn.out.save("attn_out")
        t.layers[:].mlp.out.save("mlp_out")
        t.embed.save("embed")
        t.final_norm.save("final_norm")
        t.logits.save("logits")
    return t


def test_resid_post_equals_hidden_states(tiny: OculiModel) -> None:
    t = _trace_all(tiny)
    hs = ref.hf_forward(tiny, ref.ids_of(tiny, PROMPT), output_hidden_states=True).hidden_states
    n = ref.n_layers(tiny)
    assert len(hs) == n + 1
    post = t.saved["post"]
    assert post.shape[0] == n
    for layer in range(n - 1):
        _close(post[layer], hs[layer + 1][0], atol=1e-6)
    # HF's last hidden state is taken after the final norm.
    final_norm = ref.module(tiny, "final_norm")
    with torch.no_grad():
        _close(final_norm(post[n - 1]), hs[n][0], atol=1e-6)
    # The guard that makes this test meaningful: the last layer is not already normed.
    assert not torch.allclose(post[n - 1], hs[n][0], atol=1e-3)


def test_resid_pre_equals_hidden_states(tiny: OculiModel) -> None:
    t = _trace_all(tiny)
    hs = ref.hf_forward(tiny, ref.ids_of(tiny, PROMPT), output_hidden_states=True).hidden_states
    for layer in range(ref.n_layers(tiny)):
        _close(t.saved["pre"][layer], hs[layer][0], atol=1e-6)


def test_residual_decomposition(tiny: OculiModel) -> None:
    s = _trace_all(tiny).saved
    _close(s["mid"], s["pre"] + s["attn_out"], atol=1e-5)
    _close(s["post"], s["mid"] + s["mlp_out"], atol=1e-5)
    # next layer's input is this layer's output
    _close(s["pre"][1:], s["post"][:-1], atol=1e-6)
    assert s["attn_out"].abs().max() > 1e-3 and s["mlp_out"].abs().max() > 1e-3


def test_resid_mid_and_block_outputs_match_hooks(tiny: OculiModel) -> None:
    layer = 2
    wanted = {
        "mid": ref.Capture(ref.path(tiny, "mid_norm", layer), "input"),
        "attn_out": ref.Capture(ref.path(tiny, "attn", layer)),
        "mlp_out": ref.Capture(ref.path(tiny, "mlp", layer)),
    }
    got, _ = ref.capture(tiny, ref.ids_of(tiny, PROMPT), wanted)
    s = _trace_all(tiny).saved
    _close(s["mid"][layer], got["mid"][0], atol=1e-6)
    _close(s["attn_out"][layer], got["attn_out"][0], atol=1e-6)
    _close(s["mlp_out"][layer], got["mlp_out"][0], atol=1e-6)


def test_model_sites_match_hooks(tiny: OculiModel) -> None:
    wanted = {
        "embed": ref.Capture(ref.path(tiny, "embed")),
        "final_norm": ref.Capture(ref.path(tiny, "final_norm")),
    }
    got, out = ref.capture(tiny, ref.ids_of(tiny, PROMPT), wanted)
    s = _trace_all(tiny).saved
    _close(s["embed"], got["embed"][0], atol=1e-6)
    _close(s["final_norm"], got["final_norm"][0], atol=1e-6)
    _close(s["logits"], out.logits[0], atol=1e-6)


@pytest.mark.parametrize("layer", [0, 3])
def test_mlp_sites_match_hooks(tiny: OculiModel, layer: int) -> None:
    gated = ref.family(tiny) != "gpt2"
    wanted = {"act": ref.Capture(ref.path(tiny, "down", layer), "input")}
    if gated:
        wanted["gate"] = ref.Capture(ref.path(tiny, "gate", layer))
        wanted["up"] = ref.Capture(ref.path(tiny, "up", layer))
    else:
        wanted["pre"] = ref.Capture(ref.path(tiny, "pre", layer))
    got, _ = ref.capture(tiny, ref.ids_of(tiny, PROMPT), wanted)
    with oculi.trace(tiny, PROMPT) as t:
        t.layers[layer].mlp.act.save("act")
        if gated:
            t.layers[layer].mlp.gate.save("gate")
            t.layers[layer].mlp.up.save("up")
        else:
            t.layers[layer].mlp.pre.save("pre")
    for name, value in got.items():
        _close(t.saved[name], value[0], atol=1e-6)
    # and the activation is the MLP's own function of what it was given
    mlp = tiny.hf.get_submodule(ref.path(tiny, "layer", layer) + ".mlp")
    with torch.no_grad():
        expected = mlp.act_fn(t.saved["gate"]) * t.saved["up"] if gated else mlp.act(t.saved["pre"])
    _close(t.saved["act"], expected, atol=1e-6)


def test_mlp_out_is_what_enters_the_stream(tiny: OculiModel) -> None:
    """mlp.out is what enters the stream: on Gemma 3 that is after post_feedforward_layernorm."""
    layer = 1
    got, _ = ref.capture(tiny, ref.ids_of(tiny, PROMPT), {
        "mlp_raw": ref.Capture(ref.path(tiny, "layer", layer) + ".mlp"),
        "mlp_out": ref.Capture(ref.path(tiny, "mlp", layer)),
    })
    with oculi.trace(tiny, PROMPT) as t:
        t.layers[layer].mlp.out.save("mlp_out")
    _close(t.saved["mlp_out"], got["mlp_out"][0], atol=1e-6)
    if ref.family(tiny) == "gemma3":
        assert not torch.allclose(got["mlp_raw"], got["mlp_out"], atol=1e-3)


# -- an untouched trace is a bare forward --------------------------------------------------------

def _bare_logits(model: OculiModel, prompt: str) -> torch.Tensor:
    return ref.hf_forward(model, ref.ids_of(model, prompt)).logits[0]


def test_untouched_trace_logits_bit_identical(tiny: OculiModel) -> None:
    with oculi.trace(tiny, PROMPT) as t:
        t.logits.save("logits")
    assert torch.equal(t.saved["logits"], _bare_logits(tiny, PROMPT))


def test_reading_sites_does_not_change_logits(tiny: OculiModel) -> None:
    t = _trace_all(tiny)
    assert torch.equal(t.saved["logits"], _bare_logits(tiny, PROMPT))


@pytest.mark.parametrize("kind", ["list", "tensor"])
def test_token_id_prompt(tiny: OculiModel, kind: str) -> None:
    ids = tiny.tokenizer(PROMPT)["input_ids"]
    prompt = list(ids) if kind == "list" else torch.tensor(ids)
    t = _trace_all(tiny, prompt)
    assert torch.equal(t.saved["logits"], _bare_logits(tiny, PROMPT))
    hs = ref.hf_forward(tiny, ref.ids_of(tiny, PROMPT), output_hidden_states=True).hidden_states
    _close(t.saved["post"][1], hs[2][0], atol=1e-6)
    assert t.result["post"].dims == ("layer", "token", "d_model")
    assert list(t.result["token_str"].values) == ref.token_strs(tiny, PROMPT)
    assert t.tokens.tolist() == list(ids)


# -- labels of the result ----------------------------------------------------------------------

def test_result_dims_and_coords(tiny: OculiModel) -> None:
    t = _trace_all(tiny)
    ds = t.result
    n, info = ref.n_layers(tiny), tiny.info
    n_tok = len(tiny.tokenizer(PROMPT)["input_ids"])
    for name in ("pre", "mid", "post", "attn_out", "mlp_out"):
        assert ds[name].dims == ("layer", "token", "d_model"), name
        assert ds[name].shape == (n, n_tok, info.d_model)
    assert ds["embed"].dims == ("token", "d_model")
    assert ds["final_norm"].dims == ("token", "d_model")
    assert ds["logits"].dims == ("token", "vocab")
    assert ds["logits"].shape == (n_tok, len(tiny.tokenizer))
    assert ds["layer"].values.tolist() == list(range(n))
    assert ds["token"].values.tolist() == list(range(n_tok))
    assert list(ds["token_str"].values) == ref.token_strs(tiny, PROMPT)
    assert ds["token_str"].dims == ("token",)
    assert ds.attrs["family"] == ref.family(tiny)
    assert ds.attrs["n_layers"] == n
    # data are exactly the saved tensors
    assert (ds["post"].values == t.saved["post"].numpy()).all()
    assert ds["post"].dtype == "float32"


def test_result_single_site_default_names(tiny: OculiModel) -> None:
    gated = ref.family(tiny) != "gpt2"
    with oculi.trace(tiny, PROMPT) as t:
        t.layers[1].mlp.act.save()
        t.layers[:].resid_post.save()
        t.logits[-1].save("last")
        (t.layers[1].mlp.gate if gated else t.layers[1].mlp.pre).save()
    ds = t.result
    assert ds["l1_mlp_act"].dims == ("token", "neuron")
    assert ds["l1_mlp_act"].shape[1] == tiny.info.n_neurons
    assert ds["resid_post"].dims == ("layer", "token", "d_model")
    assert ds["last"].dims == ("vocab",)
    assert ds["l1_mlp_gate" if gated else "l1_mlp_pre"].dims == ("token", "neuron")
    _close(t.saved["last"], _bare_logits(tiny, PROMPT)[-1], atol=0)


def test_layer_selections(tiny: OculiModel) -> None:
    hs = ref.hf_forward(tiny, ref.ids_of(tiny, PROMPT), output_hidden_states=True).hidden_states
    with oculi.trace(tiny, PROMPT) as t:
        t.layers[1:3].resid_pre.save("slice")
        t.layers[[3, 0]].resid_pre.save("listed")
        t.layers[-1].resid_pre.save("neg")
    for name, layers in (("slice", [1, 2]), ("listed", [3, 0])):
        var = t.result[name]  # the two selections disagree, so one gets its own layer dim
        assert var.dims[0].startswith("layer") and var.dims[1:] == ("token", "d_model")
        assert var[var.dims[0]].values.tolist() == layers
    _close(t.saved["slice"], torch.stack([hs[1][0], hs[2][0]]), atol=1e-6)
    _close(t.saved["listed"], torch.stack([hs[3][0], hs[0][0]]), atol=1e-6)
    _close(t.saved["neg"], hs[3][0], atol=1e-6)


def test_raw_module_access(tiny: OculiModel) -> None:
    down = ref.path(tiny, "down", 1)
    got, _ = ref.capture(tiny, ref.ids_of(tiny, PROMPT), {
        "in": ref.Capture(down, "input"), "out": ref.Capture(down)})
    with oculi.trace(tiny, PROMPT) as t:
        t.module(down).input.save("in")
        t.module(down).output.save("out")
    # raw module values are the whole batch (batch dim kept)
    _close(t.saved["in"].reshape(got["in"].shape), got["in"], atol=1e-6)
    _close(t.saved["out"].reshape(got["out"].shape), got["out"], atol=1e-6)
