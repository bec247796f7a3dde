"""past=: what is refused before anything runs (record and compile time), with what message."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import hf_reference as ref
import pytest
import torch

import oculi_dsl as oculi
from oculi_dsl.errors import CompileError, RecordError
from oculi_dsl.models import OculiModel
from oculi_dsl.testing import tiny_model

PROMPT = "The Eiffel Tower is in London"  # 7 tokens on the tiny Llama tokenizer
SHORT = "A cat"


@pytest.fixture(scope="module")
def model() -> OculiModel:
    return tiny_model("llama")


@pytest.fixture(autouse=True)
def no_forward(model: OculiModel) -> Iterator[None]:
    with ref.count_calls(model.hf) as calls:
        yield
    assert len(calls) == 0


def kv(model: OculiModel, c: int, *prompt_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    info = model.info
    shape = (info.n_layers, *prompt_dim, info.n_kv_heads, c, info.d_head)
    return torch.zeros(shape), torch.zeros(shape)


def compile_error(model: OculiModel, record: Any) -> str:
    with pytest.raises(CompileError) as info:  # noqa: SIM117 - the inner block is the user code
        with oculi.trace(model) as t:
            record(t)
    return str(info.value)


@pytest.mark.parametrize("past, match", [
    (torch.zeros(3), "pair of tensors"),
    ((torch.zeros(4, 2, 3, 16), torch.zeros(4, 2, 2, 16)), "same shape"),
    ((torch.zeros(2, 3), torch.zeros(2, 3)), "same shape"),
    (([1, 2], [3]), "pair of tensors"),
])
def test_bad_past_is_refused_when_recorded(model: OculiModel, past: Any, match: str) -> None:
    with pytest.raises(RecordError, match=match):
        oculi.trace(model, PROMPT, past=past)


def test_proxies_are_refused(model: OculiModel) -> None:
    with pytest.raises(RecordError, match="saved tensors"), oculi.trace(model, PROMPT) as t:
        k = t.layers[:].attn.k
        t.invoke(PROMPT, past=(k, k))


def test_past_without_prompt_and_in_generation(model: OculiModel) -> None:
    with pytest.raises(RecordError, match="belongs to a prompt"):
        oculi.trace(model, past=kv(model, 2))
    with pytest.raises(RecordError, match="oculi.trace"), oculi.generate(model, PROMPT, max_new_tokens=2) as g:
        g.invoke(PROMPT, past=kv(model, 2))


def test_wrong_sizes_name_the_expected_shape(model: OculiModel) -> None:
    info = model.info
    bad = (torch.zeros(info.n_layers - 1, info.n_kv_heads, 2, info.d_head),) * 2
    msg = compile_error(model, lambda t: t.invoke(PROMPT, past=bad).logits.save())
    assert f"layer={info.n_layers}" in msg and f"kv_head={info.n_kv_heads}" in msg and "(3, 2, 2, 16)" in msg


@pytest.mark.parametrize("c", [0, 7, 9])
def test_past_must_leave_positions_to_run(model: OculiModel, c: int) -> None:
    msg = compile_error(model, lambda t: t.invoke(PROMPT, past=kv(model, c)).logits.save())
    assert f"covers {c} positions of a 7-token prompt" in msg


def test_every_invoke_at_one_position_without_padding(model: OculiModel) -> None:
    def some(t: Any) -> None:
        t.invoke(PROMPT, past=kv(model, 2)).logits.save("a")
        t.invoke(PROMPT).logits.save("b")
    assert "Invokes [1] have no past=" in compile_error(model, some)

    def lengths(t: Any) -> None:
        t.invoke(PROMPT, past=kv(model, 2)).logits.save("a")
        t.invoke(PROMPT, past=kv(model, 3)).logits.save("b")
    assert "covers 3 positions, invoke 0 covers 2" in compile_error(model, lengths)

    def padded(t: Any) -> None:
        t.invoke(PROMPT, past=kv(model, 2)).logits.save("a")
        t.invoke(SHORT, past=kv(model, 2)).logits.save("b")
    assert "one length (no padding)" in compile_error(model, padded)

    def rows(t: Any) -> None:
        t.invoke([PROMPT, PROMPT], past=kv(model, 2, 3)).logits.save()
    assert "prompt=2 after layer" in compile_error(model, rows)


@pytest.mark.parametrize("site", ["k", "v", "scores", "pattern"])
def test_key_axis_sites_are_refused(model: OculiModel, site: str) -> None:
    msg = compile_error(model, lambda t: getattr(t.invoke(PROMPT, past=kv(model, 2)).layers[1].attn,
                                                  site).save())
    assert f"layers[1].attn.{site}" in msg and "without past=" in msg


def test_token_axes_are_labelled_from_the_first_new_position(model: OculiModel) -> None:
    from oculi_dsl.compiler import compile_plan

    t = oculi.trace(model, PROMPT, past=kv(model, 3))
    t.layers[1].resid_post.save("post")
    t.layers[1].attn.q.save("q")
    plan = compile_plan(t._recorder, t.model, [i._encoded for i in t._invokes],
                        pasts=[i._past for i in t._invokes])
    labels = {s.name: s.labels for s in plan.saves}
    assert labels["post"][0].name == "token" and list(labels["post"][0].index) == [3, 4, 5, 6]
    assert labels["q"][1].name == "token" and list(labels["q"][1].index) == [3, 4, 5, 6]
    assert plan.batch.first == 3 and plan.batch.model_kwargs(torch.device("cpu"))["input_ids"].shape == (1, 4)
