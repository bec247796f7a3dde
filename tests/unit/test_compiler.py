"""Unit tests of ``oculi_dsl.compiler``: scheduling, checks and early stop, without a forward.

Recordings are made on tiny models and compiled with ``compile_plan`` directly; several tests
compile against a model whose weights live on the ``meta`` device, which proves that compiling
needs metadata only. No test in this file runs a forward pass (counted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import hf_reference as ref
import pytest
import torch
import torch.fx

import oculi_dsl as oculi
from oculi_dsl.compiler import compile_plan
from oculi_dsl.errors import CompileError
from oculi_dsl.models import OculiModel
from oculi_dsl.plan import Plan
from oculi_dsl.testing import tiny_model

PROMPT = "The Eiffel Tower is in London"  # 7 tokens on the tiny Llama tokenizer
SHORT = "A cat"  # 3 tokens


@pytest.fixture(scope="module")
def meta_model() -> OculiModel:
    """A tiny Llama without weights: every parameter is on the meta device."""
    m = tiny_model("llama")
    return oculi.wrap(m.hf.to("meta"), m.tokenizer, model_id="meta-llama")


@pytest.fixture(autouse=True)
def no_forward(meta_model: OculiModel) -> Iterator[None]:
    with ref.count_calls(meta_model.hf) as calls:
        yield
    assert len(calls) == 0


def compile_only(model: OculiModel, record: Callable[[Any], Any], prompt: Any = PROMPT,
                 invokes: tuple[Any, ...] = (), stop_early: bool = True) -> Plan:
    """Record ``record(t, *invoke_handles)`` and compile it; nothing runs."""
    t = oculi.trace(model, prompt)
    handles = [t.invoke(p) for p in invokes]
    record(t, *handles)
    return compile_plan(t._recorder, t.model, [i._encoded for i in t._invokes], stop_early=stop_early)


def step_of(plan: Plan, label: str) -> Any:
    found = [s for s in plan.steps if s.site.label == label]
    assert len(found) == 1, f"no single step for {label}: {[s.site.label for s in plan.steps]}"
    return found[0]


def run_names(step: Any) -> list[str]:
    return [n.name for n in step.run]


def all_run(plan: Plan) -> set[torch.fx.Node]:
    return {n for s in plan.steps for n in s.run} | set(plan.prelude)


# -- scheduling -----------------------------------------------------------------------------------

def test_nodes_run_at_the_earliest_site(meta_model: OculiModel) -> None:
    def record(t: Any) -> None:
        a = t.layers[1].resid_post.sum()
        b = t.layers[3].mlp.out.mean()
        (a * b).save("p")
        a.save("a")

    plan = compile_only(meta_model, record)
    early = run_names(step_of(plan, "layers[1].resid_post"))
    late = run_names(step_of(plan, "layers[3].mlp.out"))
    assert "sum" in early[0] and "save_a" in early
    assert any(n.startswith("mean") for n in late) and any(n.startswith("mul") for n in late)
    assert "save_p" in late
    # every needed node runs exactly once
    names = [n.name for s in plan.steps for n in s.run]
    assert len(names) == len(set(names))


def test_steps_are_in_forward_order(meta_model: OculiModel) -> None:
    def record(t: Any) -> None:
        t.logits.save()
        t.layers[2].mlp.out.save()
        t.layers[0].resid_post.save()
        t.layers[2].resid_pre.save()
        t.embed.save()
        t.layers[2].mlp.act.save()

    plan = compile_only(meta_model, record)
    labels = [s.site.label for s in plan.steps]
    assert labels == ["embed", "layers[0].resid_post", "layers[2].resid_pre", "layers[2].mlp.act",
                      "layers[2].mlp.out", "logits"]
    orders = [s.order for s in plan.steps]
    assert orders == sorted(orders)


def test_constant_only_nodes_run_before_the_forward(meta_model: OculiModel) -> None:
    plan = compile_only(meta_model, lambda t: setattr(t.layers[2].mlp, "out", torch.ones(64)))
    assert [n.op for n in plan.prelude] == ["get_attr"]
    assert step_of(plan, "layers[2].mlp.out").writes


def test_dead_nodes_are_not_run(meta_model: OculiModel) -> None:
    def record(t: Any) -> None:
        _ = t.layers[3].resid_post.softmax(-1) * 2  # feeds nothing
        _ = t.logits[-1]  # read, never used
        t.layers[1].resid_post.norm(dim=-1).save("kept")

    plan = compile_only(meta_model, record)
    ran = {n.name for n in all_run(plan)}
    assert not any(n.startswith(("softmax", "mul")) for n in ran)
    labels = {s.site.label for s in plan.steps}
    assert labels == {"layers[1].resid_post"}
    assert plan.stop_after is not None and plan.stop_after.label == "layers[1].resid_post"


def test_cross_invoke_value_of_the_same_site_is_allowed(meta_model: OculiModel) -> None:
    def record(t: Any, a: Any, b: Any) -> None:
        a.layers[1].resid_post = b.layers[1].resid_post  # b comes later in the batch
        a.logits.save("patched")

    plan = compile_only(meta_model, record, prompt=None,
                        invokes=("The Eiffel Tower is in London", "The Eiffel Tower is in Paris"))
    step = step_of(plan, "layers[1].resid_post")
    assert [i for i, _ in step.writes] == [0]
    assert {i for i, _ in step.reads} == {0, 1}


# -- checks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("record", [
    lambda t: setattr(t.layers[0].mlp, "out", t.layers[2].mlp.out),
    lambda t: setattr(t.layers[1].attn, "out", t.layers[1].mlp.out),  # same layer, later site
    lambda t: setattr(t.layers[1], "resid_pre", t.layers[1].resid_post),
    lambda t: setattr(t.layers[3].mlp, "out", t.logits[:, :64]),
    lambda t: setattr(t.layers[1].mlp, "out", t.layers[1].mlp.out + t.layers[2].resid_pre.mean()),
], ids=["later_layer", "later_site", "own_output", "logits", "mixed"])
def test_write_depending_on_a_later_site(meta_model: OculiModel, record: Any) -> None:
    with pytest.raises(CompileError, match="later in the forward pass"):
        compile_only(meta_model, record)


def test_write_from_an_earlier_site_is_allowed(meta_model: OculiModel) -> None:
    plan = compile_only(meta_model, lambda t: (
        setattr(t.layers[2].mlp, "out", t.layers[2].attn.out * 2),
        setattr(t.layers[3], "resid_pre", t.layers[0].resid_post)))
    assert step_of(plan, "layers[2].mlp.out").writes
    assert step_of(plan, "layers[3].resid_pre").writes


def test_swap_shape_mismatch_names_both_shapes_and_the_site(meta_model: OculiModel) -> None:
    def record(t: Any, short: Any, long: Any) -> None:
        long.layers[2].mlp.out = short.layers[2].mlp.out

    with pytest.raises(CompileError) as info:
        compile_only(meta_model, record, prompt=None, invokes=(SHORT, PROMPT))
    msg = str(info.value)
    assert "(3, 64)" in msg and "(7, 64)" in msg and "layers[2].mlp.out" in msg
    assert __file__ in msg  # points at the user's line


def test_broadcastable_values_are_accepted(meta_model: OculiModel) -> None:
    plan = compile_only(meta_model, lambda t: (
        setattr(t.layers[1].mlp, "out", torch.zeros(64)),
        setattr(t.layers[2].mlp, "out", torch.zeros(7, 1)),
        setattr(t.layers[3].mlp, "out", 2)))
    assert len([s for s in plan.steps if s.writes]) == 3


@pytest.mark.parametrize("value", [torch.zeros(7, 64, 1), torch.zeros(64, 7), torch.zeros(8, 64)])
def test_non_broadcastable_values_are_refused(meta_model: OculiModel, value: torch.Tensor) -> None:
    with pytest.raises(CompileError, match=r"layers\[1\]\.mlp\.out"):
        compile_only(meta_model, lambda t: setattr(t.layers[1].mlp, "out", value))


def test_bad_index_is_found_at_compile_time(meta_model: OculiModel) -> None:
    with pytest.raises(CompileError) as info:
        compile_only(meta_model, lambda t: t.layers[1].mlp.act[:, 128].save())
    assert "128" in str(info.value) and __file__ in str(info.value)


def test_bad_op_shapes_are_found_at_compile_time(meta_model: OculiModel) -> None:
    with pytest.raises(CompileError) as info:
        compile_only(meta_model, lambda t: (t.layers[1].resid_post @ t.layers[1].mlp.act).save())
    assert "(7, 64)" in str(info.value) and "(7, 128)" in str(info.value)


def test_layer_selection_value_is_split_per_layer(meta_model: OculiModel) -> None:
    def record(t: Any, a: Any, b: Any) -> None:
        b.layers[1:3].mlp.out = a.layers[1:3].mlp.out
        b.logits.save()

    plan = compile_only(meta_model, record, prompt=None,
                        invokes=("The Eiffel Tower is in Paris", PROMPT))
    assert step_of(plan, "layers[1].mlp.out").writes and step_of(plan, "layers[2].mlp.out").writes


# -- early stop -----------------------------------------------------------------------------------

def test_stop_after_last_read(meta_model: OculiModel) -> None:
    plan = compile_only(meta_model, lambda t: (t.layers[0].resid_post.save(),
                                               t.layers[2].mlp.act.save()))
    assert plan.stop_after is not None and plan.stop_after.label == "layers[2].mlp.act"
    assert step_of(plan, "layers[2].mlp.act").stop
    assert not step_of(plan, "layers[0].resid_post").stop


def test_no_stop_when_the_end_is_needed(meta_model: OculiModel) -> None:
    plan = compile_only(meta_model, lambda t: (t.layers[0].resid_post.save(), t.logits.save()))
    assert plan.stop_after is None
    plan = compile_only(meta_model, lambda t: t.layers[0].resid_post.save(), stop_early=False)
    assert plan.stop_after is None
    assert not any(s.stop for s in plan.steps)


def test_raw_module_inside_a_layer_stops_after_that_layer(meta_model: OculiModel) -> None:
    plan = compile_only(meta_model, lambda t: t.module("model.layers.1.mlp.down_proj").output.save())
    assert plan.stop_after is not None
    assert plan.stop_after.layer == 1


def test_compiling_is_pure(meta_model: OculiModel) -> None:
    before = ref.state(meta_model)

    def record(t: Any) -> None:
        t.layers[1].mlp.out[0] = 0
        t.layers[:].resid_post.save()

    a = compile_only(meta_model, record)
    b = compile_only(meta_model, record)
    assert [s.site for s in a.steps] == [s.site for s in b.steps]
    assert [run_names(s) for s in a.steps] == [run_names(s) for s in b.steps]
    ref.assert_same_state(before, ref.state(meta_model))


def test_batch_is_left_padded(meta_model: OculiModel) -> None:
    plan = compile_only(meta_model, lambda t, a, b: (a.logits.save("a"), b.logits.save("b")),
                        prompt=None, invokes=(SHORT, PROMPT))
    batch = plan.batch
    assert batch.input_ids.shape == (2, 7)
    assert batch.attention_mask is not None
    assert batch.attention_mask.tolist()[0] == [0, 0, 0, 0, 1, 1, 1]
    ids = meta_model.tokenizer(SHORT)["input_ids"]
    assert batch.input_ids[0, 4:].tolist() == ids
    assert batch.position_ids is not None and batch.position_ids[0, 4:].tolist() == [0, 1, 2]
    assert [s.length for s in batch.segments] == [3, 7]


# -- late start: a fully assigned layer input makes earlier layers dead -----------------------------

STATE = torch.zeros(7, 64)  # resid_pre of the tiny Llama for PROMPT (7 tokens, d_model 64)


def test_assigned_input_of_every_invoke_starts_there(meta_model: OculiModel) -> None:
    def record(t: Any, a: Any, b: Any) -> None:
        a.layers[2].resid_pre = STATE
        b.layers[2].resid_pre = STATE
        b.layers[2].resid_pre[3] = a.layers[2].resid_pre[3]  # a later partial edit is fine
        b.layers[3].mlp.out.save("out")
    plan = compile_only(meta_model, record, prompt=None, invokes=(PROMPT, PROMPT))
    assert plan.start_layer == 2


def test_deepest_fully_assigned_layer_wins(meta_model: OculiModel) -> None:
    def record(t: Any) -> None:
        t.layers[1].resid_pre = STATE
        t.layers[3].resid_pre = STATE
        t.logits.save()
    assert compile_only(meta_model, record).start_layer == 3


def _assign_both(a: Any, b: Any, layer: int = 2) -> None:
    a.layers[layer].resid_pre = STATE
    b.layers[layer].resid_pre = STATE


NO_LATE_START: dict[str, Any] = {
    "one invoke not assigned": lambda a, b: setattr(a.layers[2], "resid_pre", STATE),
    "earlier read": lambda a, b: (_assign_both(a, b), a.layers[1].mlp.out.save("early")),
    # read before the assignment: the real arriving value is needed
    "arriving value saved": lambda a, b: (b.layers[2].resid_pre.save("before"), _assign_both(a, b)),
    "partial": lambda a, b: (a.layers[2].resid_pre.__setitem__(0, 0.0),
                             b.layers[2].resid_pre.__setitem__(0, 0.0)),
    "from itself": lambda a, b: (setattr(a.layers[2], "resid_pre", STATE),
                                 setattr(b.layers[2], "resid_pre", b.layers[2].resid_pre * 2)),
    "raw module before": lambda a, b: (_assign_both(a, b), a.module("model.embed_tokens").output.save("e")),
    "layer 0": lambda a, b: _assign_both(a, b, layer=0),
}


@pytest.mark.parametrize("case", sorted(NO_LATE_START))
def test_no_late_start(meta_model: OculiModel, case: str) -> None:
    def record(t: Any, a: Any, b: Any) -> None:
        NO_LATE_START[case](a, b)
        b.logits.save()
    assert compile_only(meta_model, record, prompt=None, invokes=(PROMPT, PROMPT)).start_layer == 0


def test_no_late_start_with_padding_or_without_stop_early(meta_model: OculiModel) -> None:
    def record(t: Any, a: Any, b: Any) -> None:
        a.layers[2].resid_pre = torch.zeros(a.tokens.shape[0], 64)
        b.layers[2].resid_pre = STATE
        b.logits.save()
    assert compile_only(meta_model, record, prompt=None, invokes=(PROMPT, PROMPT)).start_layer == 2
    assert compile_only(meta_model, record, prompt=None, invokes=(SHORT, PROMPT)).start_layer == 0
    assert compile_only(meta_model, record, prompt=None, invokes=(PROMPT, PROMPT),
                        stop_early=False).start_layer == 0


def test_edits_before_the_start_are_dead(meta_model: OculiModel) -> None:
    def record(t: Any) -> None:
        t.layers[0].mlp.out = torch.zeros(7, 64)  # overwritten by the assignment at layer 2
        t.layers[2].resid_pre = STATE
        t.logits.save()
    assert compile_only(meta_model, record).start_layer == 2


def test_late_start_is_pure_metadata(meta_model: OculiModel) -> None:
    """The start layer changes nothing else in the plan: same steps, same scheduled nodes."""
    def record(t: Any) -> None:
        t.layers[2].resid_pre = STATE
        t.layers[3].resid_post.save()
    late = compile_only(meta_model, record)
    full = compile_only(meta_model, record, stop_early=False)
    assert (late.start_layer, full.start_layer) == (2, 0)
    assert [s.site for s in late.steps] == [s.site for s in full.steps]
