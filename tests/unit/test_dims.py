"""Unit tests of ``oculi_dsl.dims``: how dim labels follow values through recorded operations.

First ``propagate`` on meta tensors directly, then the labels the compiler derives for saves
of a recorded trace (compiled only: no forward runs in this file).
"""

from __future__ import annotations

import operator
from typing import Any

import pytest
import torch

import oculi_dsl as oculi
from oculi_dsl.compiler import compile_plan
from oculi_dsl.dims import DIMS, Axis, propagate, site_labels
from oculi_dsl.testing import tiny_model

T, D, V, L = 5, 4, 7, 3
TD = site_labels(("token", "d_model"), {"token": T, "d_model": D})
LTD = (Axis("layer", (0, 1, 2)),) + TD


def meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device="meta")


def names(labels: Any) -> tuple[str, ...] | None:
    return None if labels is None else tuple(a.name for a in labels)


def index(labels: Any, x: torch.Tensor, idx: Any) -> Any:
    return propagate(operator.getitem, [x, idx], {}, [labels, None], x[idx])


def call(name: str, x: torch.Tensor, labels: Any, *args: Any, **kwargs: Any) -> Any:
    out = getattr(x, name)(*args, **kwargs)
    return propagate(name, [x, *args], kwargs, [labels] + [None] * len(args), out)


def test_vocabulary() -> None:
    for d in ("prompt", "step", "layer", "head", "kv_head", "token", "query", "key", "d_model",
              "d_head", "neuron", "vocab", "component", "k"):
        assert d in DIMS


def test_site_labels_keep_positions() -> None:
    assert (Axis("token", (0, 1, 2, 3, 4)), Axis("d_model", (0, 1, 2, 3))) == TD
    prefixed = site_labels(("token",), {"token": 2}, (Axis("prompt", (0, 1)),))
    assert names(prefixed) == ("prompt", "token")
    assert site_labels(("token", "x"), {"token": 1})[1] == Axis("x", None)


# -- indexing -------------------------------------------------------------------------------------

def test_int_index_drops_dim() -> None:
    assert names(index(TD, meta(T, D), -1)) == ("d_model",)
    assert names(index(TD, meta(T, D), (slice(None), 2))) == ("token",)


def test_slices_keep_positions() -> None:
    assert index(TD, meta(T, D), slice(1, 3))[0] == Axis("token", (1, 2))
    assert index(TD, meta(T, D), slice(-2, None))[0] == Axis("token", (3, 4))
    assert index(TD, meta(T, D), slice(None, None, 2))[0] == Axis("token", (0, 2, 4))


def test_list_index_keeps_chosen_positions() -> None:
    assert index(TD, meta(T, D), [4, 0])[0] == Axis("token", (4, 0))


def test_ellipsis_and_none() -> None:
    x = meta(L, T, D)
    assert names(index(LTD, x, (Ellipsis, -1, slice(None)))) == ("layer", "d_model")
    assert names(index(LTD, x, (Ellipsis, 0))) == ("layer", "token")
    out = index(TD, meta(T, D), (None, slice(None)))
    assert names(out) == ("new", "token", "d_model")


# -- reductions, elementwise, shape ops ------------------------------------------------------------

def test_reductions_remove_dims() -> None:
    x = meta(L, T, D)
    assert names(call("sum", x, LTD, -1)) == ("layer", "token")
    assert names(call("mean", x, LTD, dim=1)) == ("layer", "d_model")
    assert names(call("norm", x, LTD, dim=-1)) == ("layer", "token")
    assert names(call("amax", x, LTD, dim=(0, 2))) == ("token",)
    assert call("sum", x, LTD) == ()


def test_keepdim_keeps_a_size_one_dim() -> None:
    out = call("sum", meta(L, T, D), LTD, 1, keepdim=True)
    assert names(out) == ("layer", "token", "d_model")
    assert out[1] == Axis("token", (0,))


def test_softmax_and_elementwise_keep_labels() -> None:
    x = meta(T, D)
    assert call("softmax", x, TD, -1) == TD
    assert propagate(torch.softmax, [x, -1], {}, [TD, None], torch.softmax(x, -1)) == TD
    assert propagate(operator.mul, [x, 2.0], {}, [TD, None], x * 2.0) == TD
    vec = meta(D)
    assert propagate(operator.add, [vec, x], {}, [None, TD], vec + x) == TD


def test_argmax_and_transpose() -> None:
    x = meta(T, V)
    tv = site_labels(("token", "vocab"), {"token": T})
    assert names(call("argmax", x, tv, -1)) == ("token",)
    assert names(call("transpose", x, tv, 0, 1)) == ("vocab", "token")


def test_matmul_with_labelled_weight() -> None:
    x, w = meta(T, D), meta(D, V)
    w_labels = (Axis("d_model"), Axis("vocab"))
    out = propagate(operator.matmul, [x, w], {}, [TD, w_labels], x @ w)
    assert names(out) == ("token", "vocab")


def test_unknown_op_gives_no_labels() -> None:
    x = meta(T, D)
    assert propagate(torch.flatten, [x], {}, [TD], torch.flatten(x)) is None


# -- labels of saves, as compiled from a recording -------------------------------------------------

@pytest.fixture(scope="module")
def model() -> oculi.OculiModel:
    return tiny_model("llama")


def labels_of(model: oculi.OculiModel, prompt: Any, record: Any) -> dict[str, tuple[str, ...] | None]:
    """Record ``record(t)`` and compile it; no forward runs."""
    t = oculi.trace(model, prompt)
    record(t)
    plan = compile_plan(t._recorder, t.model, [i._encoded for i in t._invokes])
    return {s.name: names(s.labels) for s in plan.saves}


CASES = {
    "site": (lambda t: t.layers[1].mlp.act, ("token", "neuron")),
    "stack": (lambda t: t.layers[:].resid_post, ("layer", "token", "d_model")),
    "last": (lambda t: t.logits[-1], ("vocab",)),
    "probs": (lambda t: t.logits[-1].softmax(-1), ("vocab",)),
    "tsoftmax": (lambda t: torch.softmax(t.logits, dim=-1), ("token", "vocab")),
    "norms": (lambda t: t.layers[:].resid_post.norm(dim=-1), ("layer", "token")),
    "col": (lambda t: t.layers[1].mlp.act[:, 3], ("token",)),
    "ellipsis": (lambda t: t.layers[:].resid_post[..., -1, :], ("layer", "d_model")),
    "argmax": (lambda t: t.logits.argmax(-1), ("token",)),
    "scalar": (lambda t: t.logits.max(), ()),
    "lens": (lambda t: t.model.hf.lm_head(t.layers[1].resid_post), ("token", "vocab")),
    "topk_index0": (lambda t: t.logits[-1].topk(5)[0], ("k",)),
    "topk_fn_index1": (lambda t: torch.topk(t.logits, 3, dim=-1)[1], ("token", "k")),
    "topk_values": (lambda t: t.logits[-1].topk(5).values, ("k",)),
    "max_values": (lambda t: t.logits.max(dim=-1).values, ("token",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_saved_labels(model: oculi.OculiModel, case: str) -> None:
    fn, expected = CASES[case]
    got = labels_of(model, "The capital of France is", lambda t: fn(t).save(case))
    assert got == {case: expected}


def test_prompt_dim_comes_from_a_list_invoke(model: oculi.OculiModel) -> None:
    got = labels_of(model, ["The capital", "A cat sat on the mat"], lambda t: (
        t.layers[:].resid_post.save("stack"), t.logits[:, -1].save("last"),
        t.layers[2].mlp.out.save("one")))
    assert got == {"stack": ("layer", "prompt", "token", "d_model"), "last": ("prompt", "vocab"),
                   "one": ("prompt", "token", "d_model")}


def test_result_dims_follow_labels(model: oculi.OculiModel) -> None:
    """The one place this file runs a forward: labels reach the Dataset unchanged."""
    with oculi.trace(model, "The capital of France is") as t:
        t.layers[:].resid_post[:, 2:4].save("window")
        t.logits.flatten().save("flat")  # no rule: positional fallback names
    ds = t.result
    assert ds["window"].dims == ("layer", "token", "d_model")
    assert ds["window"]["token"].values.tolist() == [2, 3]
    assert list(ds["window"]["token_str"].values) == [" capital", " of"]
    assert ds["flat"].dims == ("flat_dim0",)
