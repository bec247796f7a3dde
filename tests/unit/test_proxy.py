"""Unit tests of recording (``oculi_dsl.proxy``): what goes into the graph, and that recorded
torch functions, methods, operators, indexing and module calls compute what torch computes.

Numbers are checked against the same operations applied by hand to values captured with
forward hooks on a plain HF forward (one tiny Llama, shared by the module).
"""

from __future__ import annotations

from typing import Any

import hf_reference as ref
import numpy as np
import pytest
import torch

import oculi_dsl as oculi
from oculi_dsl.errors import RecordError
from oculi_dsl.models import OculiModel
from oculi_dsl.testing import tiny_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model() -> OculiModel:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def hooked(model: OculiModel) -> dict[str, torch.Tensor]:
    """resid_post of layers 1 and 2, mlp.act of layer 1, logits: from hand-written hooks."""
    got, out = ref.capture(model, ref.ids_of(model, PROMPT), {
        "r1": ref.Capture(ref.path(model, "layer", 1)),
        "r2": ref.Capture(ref.path(model, "layer", 2)),
        "act": ref.Capture(ref.path(model, "down", 1), "input"),
    })
    values = {k: v[0] for k, v in got.items()}
    values["logits"] = out.logits[0]
    return values


def _close(actual: Any, expected: Any) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


# -- nothing runs while recording ---------------------------------------------------------------

def test_recording_runs_nothing(model: OculiModel) -> None:
    with ref.count_calls(model.hf) as calls:
        with oculi.trace(model, PROMPT) as t:
            x = t.layers[1].resid_post
            y = (x * 2 + 1).softmax(-1)[-1]
            y.save("y")
            assert len(calls) == 0  # still inside the block
            assert isinstance(y, torch.fx.Proxy)
        assert len(calls) == 1


def test_graph_text_lists_the_ops(model: OculiModel) -> None:
    with oculi.trace(model, PROMPT) as t:
        x = t.layers[1].resid_post
        y = torch.cat([x * 2.0, x - 1.0], dim=-1)
        z = (y @ torch.ones(2 * model.info.d_model, 3)).softmax(-1)[-1]
        z.save("z")
        t.layers[2].mlp.out[0] = 0
    graph = t.graph
    for op in ("read_site", "layers[1].resid_post", "mul", "sub", "cat", "matmul", "softmax",
               "getitem", "save", "'z'", "setitem", "layers[2].mlp.out"):
        assert op in graph, f"{op!r} not in graph:\n{graph}"
    assert graph == t.result.attrs["graph"]


def test_proxy_repr_names_the_site(model: OculiModel) -> None:
    t = oculi.trace(model, PROMPT)
    assert "layers[1].mlp.act" in repr(t.layers[1].mlp.act)


# -- recorded values equal torch's ------------------------------------------------------------

OPS: dict[str, tuple[Any, Any]] = {
    # name: (recorded op on proxies, same op on tensors); args: (r1, r2, act, logits)
    "add": (lambda r1, r2, a, lg: r1 + r2, None),
    "radd": (lambda r1, r2, a, lg: 1.5 + r1, None),
    "sub_mul_div": (lambda r1, r2, a, lg: (r1 - r2) * 3 / (r2.abs() + 1), None),
    "neg_pow": (lambda r1, r2, a, lg: (-r1) ** 2, None),
    "matmul": (lambda r1, r2, a, lg: r1 @ r2.T, None),
    "compare_where": (lambda r1, r2, a, lg: torch.where(r1 > r2, r1, r2), None),
    "softmax_method": (lambda r1, r2, a, lg: lg.softmax(-1), None),
    "log_softmax_fn": (lambda r1, r2, a, lg: torch.log_softmax(lg, dim=-1), None),
    "functional": (lambda r1, r2, a, lg: torch.nn.functional.gelu(a), None),
    "cat_stack": (lambda r1, r2, a, lg: torch.stack([r1, torch.cat([r2[:2], r1[2:]])]), None),
    "reductions": (lambda r1, r2, a, lg: r1.norm(dim=-1) + a.mean(0).sum() + lg.amax(), None),
    "argmax_topk": (lambda r1, r2, a, lg: lg.topk(3, dim=-1).indices + lg.argmax(-1, keepdim=True), None),
    "index_int": (lambda r1, r2, a, lg: lg[-1], None),
    "index_slice_step": (lambda r1, r2, a, lg: r1[1::2, :10], None),
    "index_list": (lambda r1, r2, a, lg: a[[0, 3], 5], None),
    "index_ellipsis_none": (lambda r1, r2, a, lg: r1[..., None, 3], None),
    "index_bool_mask": (lambda r1, r2, a, lg: r1[r1 > 0], None),
    "index_tensor": (lambda r1, r2, a, lg: lg[-1][torch.tensor([3, 1, 4])], None),
    "attribute_T": (lambda r1, r2, a, lg: r1.T, None),
    "attribute_values": (lambda r1, r2, a, lg: lg.max(dim=-1).values, None),
    "shape_view": (lambda r1, r2, a, lg: r1.reshape(-1)[: r1.shape[-1]], None),
    "dtype_cast": (lambda r1, r2, a, lg: r1.to(torch.float64).double().sum(-1), None),
    "numpy_constant": (lambda r1, r2, a, lg: r1 + np.arange(r1.shape[-1] if isinstance(r1, torch.Tensor)
                                                             else 64, dtype=np.float32), None),
}


@pytest.mark.parametrize("name", list(OPS))
def test_recorded_op_values(model: OculiModel, hooked: dict[str, torch.Tensor], name: str) -> None:
    fn, _ = OPS[name]
    with oculi.trace(model, PROMPT) as t:
        fn(t.layers[1].resid_post, t.layers[2].resid_post, t.layers[1].mlp.act, t.logits).save(name)
    expected = fn(hooked["r1"], hooked["r2"], hooked["act"], hooked["logits"])
    assert name in t.saved, f"save of {name!r} was dropped"
    got = t.saved[name]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    _close(got, expected)


def test_module_call_inside_trace_equals_logits(model: OculiModel) -> None:
    hf = model.hf
    last = model.info.n_layers - 1
    with oculi.trace(model, PROMPT) as t:
        hf.lm_head(hf.model.norm(t.layers[last].resid_post)).save("lens")
        hf.lm_head(hf.model.norm(t.layers[1].resid_post)).save("lens1")
        t.logits.save("logits")
    _close(t.saved["lens"], t.saved["logits"])
    with torch.no_grad():
        _close(t.saved["lens1"], hf.lm_head(hf.model.norm(ref.capture(
            model, ref.ids_of(model, PROMPT), {"r": ref.Capture(ref.path(model, "layer", 1))})[0]["r"][0])))


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_module_call_inside_trace_other_families(family: str) -> None:
    m = tiny_model(family)
    norm = ref.module(m, "final_norm")
    head = m.hf.get_output_embeddings()
    with oculi.trace(m, PROMPT) as t:
        head(norm(t.layers[m.info.n_layers - 1].resid_post)).save("lens")
        t.logits.save("logits")
    torch.testing.assert_close(t.saved["lens"], t.saved["logits"], atol=1e-5, rtol=1e-5)


def test_constants_are_stored_once(model: OculiModel) -> None:
    w = torch.randn(model.info.d_model)
    with oculi.trace(model, PROMPT) as t:
        ((t.layers[1].resid_post * w) + (t.layers[2].resid_post * w)).save("s")
    assert t.graph.count("constant") == 1


# -- saves ---------------------------------------------------------------------------------------

def test_default_save_names(model: OculiModel) -> None:
    with oculi.trace(model, PROMPT) as t:
        t.layers[1].mlp.act.save()
        t.layers[:].resid_post.save()
        t.logits.save()
        t.embed.save()
    assert set(t.saved) == {"l1_mlp_act", "resid_post", "logits", "embed"}


def test_save_returns_the_proxy_and_value_after_the_block(model: OculiModel,
                                                          hooked: dict[str, torch.Tensor]) -> None:
    with oculi.trace(model, PROMPT) as t:
        p = t.layers[1].resid_post.save("r1")
        assert isinstance(p, torch.fx.Proxy)
    _close(p.value, hooked["r1"])
    assert p.value is t.saved["r1"]


def test_duplicate_save_name_refused(model: OculiModel) -> None:
    with pytest.raises(RecordError, match="'x'"), oculi.trace(model, PROMPT) as t:
        t.layers[1].resid_post.save("x")
        t.layers[2].resid_post.save("x")


def test_same_proxy_saved_twice_under_two_names(model: OculiModel) -> None:
    with oculi.trace(model, PROMPT) as t:
        p = t.layers[1].resid_post
        p.save("a")
        p.save("b")
    assert torch.equal(t.saved["a"], t.saved["b"])


# -- control flow is refused ------------------------------------------------------------------

@pytest.mark.parametrize("use,advice", [
    (lambda p: bool(p), "torch.where"),
    (lambda p: p.sum() > 0 and 1, "torch.where"),
    (lambda p: len(p), ".shape"),
    (lambda p: list(p), "Index it explicitly"),
    (lambda p: [row for row in p], "Index it explicitly"),
    (lambda p: (lambda a, b, *rest: a)(*p), "Index it explicitly"),
])
def test_control_flow_refused(model: OculiModel, use: Any, advice: str) -> None:
    t = oculi.trace(model, PROMPT)
    with pytest.raises(RecordError) as info:
        use(t.layers[1].resid_post)
    assert advice in str(info.value)


def test_control_flow_message_names_the_site(model: OculiModel) -> None:
    t = oculi.trace(model, PROMPT)
    with pytest.raises(RecordError, match=r"layers\[1\]\.resid_post"):
        bool(t.layers[1].resid_post)


def test_proxy_from_another_trace_refused(model: OculiModel) -> None:
    a = oculi.trace(model, PROMPT)
    b = oculi.trace(model, PROMPT)
    with pytest.raises(RecordError, match="another trace"):
        (a.layers[1].resid_post + b.layers[1].resid_post).save()


def test_assignment_to_unknown_attribute_refused(model: OculiModel) -> None:
    t = oculi.trace(model, PROMPT)
    with pytest.raises(RecordError, match="Assignable"):
        t._default.resid = 0  # noqa: SLF001 - an invoke refuses unknown names
    with pytest.raises(RecordError, match="group of sites"):
        t.layers[1].mlp = 0


def test_assigning_an_unknown_trace_attribute_is_refused() -> None:
    model = oculi.testing.tiny_model("llama")
    with pytest.raises(oculi.RecordError, match="Did you mean 'logits'"), oculi.trace(model, "hi") as t:
        t.logit = 0
