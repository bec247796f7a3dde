"""Every bad input raises the right ``OculiError`` subclass before any forward runs, and no
failure (bad input, user exception, error inside the forward) leaves anything behind.

"Left behind" is checked with ``hf_reference.state``: every module's hook dicts (plain and
with-kwargs variants, backward and state-dict hooks), instance-level ``forward`` patches,
training flags, attention implementation settings, torch's global hooks and transformers'
attention function registry. The next bare forward must be bit-identical to one taken before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import hf_reference as ref
import pytest
import torch

import oculi_dsl as oculi
from oculi_dsl.errors import (
    CompileError,
    ExecutionError,
    OculiError,
    RecordError,
    SiteError,
)
from oculi_dsl.models import OculiModel

PROMPT = "The Eiffel Tower is in London"
SHORT = "A cat"


@contextmanager
def unchanged(model: OculiModel, *, forwards: int | None = 0) -> Iterator[None]:
    """Assert that the block leaves the model exactly as it was and runs ``forwards`` forwards."""
    ids = ref.ids_of(model, PROMPT)
    before_logits = ref.hf_forward(model, ids).logits
    before = ref.state(model)
    calls: list[int] = []
    # Counting through torch's global hook, so the model's own hook dicts stay comparable.
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda mod, args: calls.append(1) if mod is model.hf else None)
    try:
        yield
    finally:
        handle.remove()
    ref.assert_same_state(before, ref.state(model))
    if forwards is not None:
        assert len(calls) == forwards, f"{len(calls)} forward passes ran, expected {forwards}"
    assert torch.equal(ref.hf_forward(model, ids).logits, before_logits)


# -- errors raised while recording / compiling: nothing runs ------------------------------------

def _unknown_site(m: OculiModel) -> None:
    with oculi.trace(m, PROMPT) as t:
        t.layers[0].mlp.outt.save()


def _unknown_group(m: OculiModel) -> None:
    with oculi.trace(m, PROMPT) as t:
        t.layers[0].mlpp.out.save()


def _layer_out_of_range(m: OculiModel) -> None:
    with oculi.trace(m, PROMPT) as t:
        t.layers[m.info.n_layers].resid_post.save()


def _negative_layer_out_of_range(m: OculiModel) -> None:
    with oculi.trace(m, PROMPT) as t:
        t.layers[-m.info.n_layers - 1].resid_post.save()


def _layer_list_out_of_range(m: OculiModel) -> None:
    with oculi.trace(m, PROMPT) as t:
        t.layers[[0, 99]].resid_post.save()


def _swap_shape_mismatch(m: OculiModel) -> None:
    with oculi.trace(m) as t:
        with t.invoke(SHORT) as c:
            h = c.layers[1].resid_post
        with t.invoke(PROMPT) as x:
            x.layers[1].resid_post = h


def _constant_shape_mismatch(m: OculiModel) -> None:
    with oculi.trace(m, PROMPT) as t:
        t.layers[1].mlp.out = torch.zeros(3, m.info.d_model + 1)


def _write_from_later_layer(m: OculiModel) -> None:
    with oculi.trace(m, PROMPT) as t:
        t.layers[0].mlp.out = t.layers[2].mlp.out


def _index_out_of_range(m: OculiModel) -> None:
    with oculi.trace(m, PROMPT) as t:
        t.layers[0].resid_post[:, m.info.d_model].save()


def _if_proxy(m: OculiModel) -> None:
    with oculi.trace(m, PROMPT) as t:
        if t.layers[0].resid_post.sum() > 0:
            t.logits.save()


def _len_proxy(m: OculiModel) -> None:
    with oculi.trace(m, PROMPT) as t:
        len(t.layers[0].resid_post)


def _iter_proxy(m: OculiModel) -> None:
    with oculi.trace(m, PROMPT) as t:
        for row in t.layers[0].resid_post:
            row.save()


def _inplace(m: OculiModel) -> None:
    with oculi.trace(m, PROMPT) as t:
        t.layers[0].mlp.out.mul_(2)


def _duplicate_save_name(m: OculiModel) -> None:
    with oculi.trace(m, PROMPT) as t:
        t.layers[0].mlp.out.save("x")
        t.layers[1].mlp.out.save("x")


def _proxy_of_another_trace(m: OculiModel) -> None:
    with oculi.trace(m, PROMPT) as a, oculi.trace(m, PROMPT) as b:
        b.layers[0].mlp.out = a.layers[0].mlp.out


def _no_prompt(m: OculiModel) -> None:
    with oculi.trace(m) as t:
        t.layers[0].resid_post.save()


ERRORS: dict[str, tuple[Callable[[OculiModel], None], type[OculiError], tuple[str, ...]]] = {
    "unknown_site": (_unknown_site, SiteError, ("Did you mean 'mlp.out'", "mlp.act", "resid_post")),
    "unknown_group": (_unknown_group, SiteError, ("mlpp",)),
    "layer_out_of_range": (_layer_out_of_range, SiteError, ("0..3",)),
    "negative_layer": (_negative_layer_out_of_range, SiteError, ("0..3",)),
    "layer_list": (_layer_list_out_of_range, SiteError, ("99", "0..3")),
    "swap_shape": (_swap_shape_mismatch, CompileError, ("(3, 64)", "(7, 64)", "layers[1].resid_post")),
    "constant_shape": (_constant_shape_mismatch, CompileError, ("(3, 65)", "layers[1].mlp.out")),
    "later_layer": (_write_from_later_layer, CompileError, ("layers[0].mlp.out", "later")),
    "index": (_index_out_of_range, CompileError, ("64",)),
    "if": (_if_proxy, RecordError, ("torch.where",)),
    "len": (_len_proxy, RecordError, (".shape",)),
    "iter": (_iter_proxy, RecordError, ("Index it explicitly",)),
    "inplace": (_inplace, RecordError, (".mul_()", ".mul()")),
    "duplicate_save": (_duplicate_save_name, RecordError, ("'x'",)),
    "other_trace": (_proxy_of_another_trace, RecordError, ("another trace",)),
    "no_prompt": (_no_prompt, RecordError, ("t.invoke",)),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error_before_forward(case: str) -> None:
    model = oculi.testing.tiny_model("llama")
    fn, error, fragments = ERRORS[case]
    assert ref.ids_of(model, PROMPT).shape[1] == 7 and ref.ids_of(model, SHORT).shape[1] == 3
    with unchanged(model, forwards=0), pytest.raises(error) as info:
        fn(model)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"


def test_unknown_site_lists_valid_names(tiny: OculiModel) -> None:
    with unchanged(tiny), pytest.raises(SiteError) as info:
        _unknown_site(tiny)
    msg = str(info.value)
    assert "Did you mean 'mlp.out'" in msg
    for name in ("resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.act", "mlp.out"):
        assert name in msg


def test_gated_site_on_gpt2_explains() -> None:
    model = oculi.testing.tiny_model("gpt2")
    for name in ("gate", "up"):
        with unchanged(model), pytest.raises(SiteError) as info, oculi.trace(model, PROMPT) as t:
            getattr(t.layers[0].mlp, name).save()
        msg = str(info.value)
        assert f"mlp.{name}" in msg and "not gated" in msg and "mlp.pre" in msg


def test_non_gated_site_on_llama_explains() -> None:
    model = oculi.testing.tiny_model("llama")
    with unchanged(model), pytest.raises(SiteError) as info, oculi.trace(model, PROMPT) as t:
        t.layers[0].mlp.pre.save()
    assert "gated" in str(info.value) and "mlp.gate" in str(info.value)


@pytest.mark.parametrize("method", ["add_", "zero_", "fill_", "copy_", "clamp_"])
def test_inplace_methods_refused_with_working_advice(method: str) -> None:
    model = oculi.testing.tiny_model("llama")
    args = {"add_": (1.0,), "zero_": (), "fill_": (0.0,), "copy_": (torch.zeros(7, 64),),
            "clamp_": (0.0, 1.0)}[method]
    with unchanged(model), pytest.raises(RecordError) as info, oculi.trace(model, PROMPT) as t:
        getattr(t.layers[0].mlp.out, method)(*args)
    msg = str(info.value)
    assert f".{method}()" in msg
    # Whatever out-of-place method the message recommends must exist.
    suggested = method[:-1]
    if f".{suggested}()" in msg:
        assert hasattr(torch.Tensor, suggested), f"advice names a method that does not exist: {msg}"


INPLACE_FUNCTIONS: dict[str, Callable[[torch.Tensor], object]] = {
    "torch.relu_": lambda x: torch.relu_(x),
    "F.relu(inplace=True)": lambda x: torch.nn.functional.relu(x, inplace=True),
    "torch.add(out=)": lambda x: torch.add(x, 1, out=x),
}


@pytest.mark.parametrize("name", sorted(INPLACE_FUNCTIONS))
def test_inplace_functions_refused(name: str) -> None:
    """In-place torch functions would edit the live activation behind the user's back."""
    model = oculi.testing.tiny_model("llama")
    with unchanged(model, forwards=0), pytest.raises(RecordError):  # noqa: SIM117 - the inner block is the user code
        with oculi.trace(model, PROMPT) as t:
            INPLACE_FUNCTIONS[name](t.layers[1].mlp.out).save("r")
            t.logits.save("logits")


# -- proxies after the block ------------------------------------------------------------------

def test_proxy_after_block(tiny: OculiModel) -> None:
    with unchanged(tiny, forwards=1):
        with oculi.trace(tiny, PROMPT) as t:
            unsaved = t.layers[0].resid_post
            saved = t.layers[1].resid_post.save("kept")
        with pytest.raises(RecordError, match=r"\.save\(\)"):
            unsaved.value  # noqa: B018
        for op in (lambda p: p + 1, lambda p: p.sum(), lambda p: p[0], lambda p: torch.relu(p),
                   lambda p: p.save("late")):
            with pytest.raises(RecordError, match=r"\.save\(\)"):
                op(unsaved)
            with pytest.raises(RecordError, match=r"\.save\(\)"):
                op(saved)
        with pytest.raises(RecordError):
            t.layers[2].resid_post.save()
        with pytest.raises(RecordError):
            t.invoke(PROMPT)
    assert torch.equal(saved.value, t.saved["kept"])
    assert set(t.saved) == {"kept"}


def test_result_before_run_is_an_error(tiny: OculiModel) -> None:
    t = oculi.trace(tiny, PROMPT)
    with pytest.raises(RecordError):
        t.saved  # noqa: B018
    with pytest.raises(RecordError):
        t.plan  # noqa: B018


# -- the user's own exception -------------------------------------------------------------------

class UserBug(Exception):
    pass


def test_user_exception_propagates_unchanged(tiny: OculiModel) -> None:
    err = UserBug("my mistake")
    with unchanged(tiny, forwards=0), pytest.raises(UserBug) as info:  # noqa: SIM117 - the inner block is the user code
        with oculi.trace(tiny, PROMPT) as t:
            t.layers[1].resid_post.save()
            t.layers[2].mlp.out = 0
            raise err
    assert info.value is err
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_user_exception_inside_invoke(tiny: OculiModel) -> None:
    err = KeyError("inner")
    with unchanged(tiny, forwards=0), pytest.raises(KeyError) as info, oculi.trace(tiny) as t:  # noqa: SIM117 - the inner block is the user code
        with t.invoke(PROMPT) as x:
            x.logits.save()
            raise err
    assert info.value is err


def test_trace_usable_after_failed_trace(tiny: OculiModel) -> None:
    with pytest.raises(SiteError):
        _unknown_site(tiny)
    with oculi.trace(tiny, PROMPT) as t:
        t.logits.save()
    assert torch.equal(t.saved["logits"], ref.hf_forward(tiny, ref.ids_of(tiny, PROMPT)).logits[0])


# -- errors at run time, inside the forward ----------------------------------------------------

@contextmanager
def patched_forward(mod: torch.nn.Module, exc: BaseException) -> Iterator[None]:
    def boom(*args: object, **kwargs: object) -> None:
        raise exc

    mod.forward = boom  # type: ignore[method-assign]
    try:
        yield
    finally:
        del mod.forward


@pytest.mark.parametrize("layer", [0, 2])
def test_error_inside_forward_cleans_up(tiny: OculiModel, layer: int) -> None:
    mlp = tiny.hf.get_submodule(ref.path(tiny, "layer", layer) + ".mlp")
    boom = ValueError("kaboom")
    ids = ref.ids_of(tiny, PROMPT)
    before_logits = ref.hf_forward(tiny, ids).logits
    before = ref.state(tiny)
    with patched_forward(mlp, boom), pytest.raises(OculiError) as info, oculi.trace(tiny) as t:
        with t.invoke(PROMPT) as a:
            h = a.layers[1].resid_pre
            a.layers[:].resid_post.save("post")
        with t.invoke("The Eiffel Tower is in Paris") as b:
            b.layers[1].resid_pre = h
            b.layers[3].mlp.out[0] = 0
            b.logits.save()
    assert isinstance(info.value, ExecutionError)
    assert info.value.__cause__ is boom
    assert "kaboom" in str(info.value)
    ref.assert_same_state(before, ref.state(tiny))
    assert torch.equal(ref.hf_forward(tiny, ids).logits, before_logits)


class Abort(BaseException):
    """Not an Exception: like KeyboardInterrupt, it must still leave nothing behind."""


def test_base_exception_inside_forward_cleans_up(tiny: OculiModel) -> None:
    mlp = tiny.hf.get_submodule(ref.path(tiny, "layer", 1) + ".mlp")
    ids = ref.ids_of(tiny, PROMPT)
    before_logits = ref.hf_forward(tiny, ids).logits
    before = ref.state(tiny)
    with patched_forward(mlp, Abort()), pytest.raises(Abort), oculi.trace(tiny, PROMPT) as t:
        t.layers[0].mlp.out = 0
        t.layers[:].resid_post.save()
    ref.assert_same_state(before, ref.state(tiny))
    assert torch.equal(ref.hf_forward(tiny, ids).logits, before_logits)


def test_recorded_op_failing_at_run_time(tiny: OculiModel) -> None:
    """An index computed from values cannot be checked on meta tensors; at run time it fails."""
    with unchanged(tiny, forwards=1), pytest.raises(ExecutionError) as info:  # noqa: SIM117 - the inner block is the user code
        with oculi.trace(tiny, PROMPT) as t:
            t.layers[0].mlp.out = 0
            r = t.layers[1].resid_post
            idx = (r[0, 0] * 0 + 100).long()
            t.layers[2].mlp.out = t.layers[2].mlp.out * r[idx].sum()
            t.logits.save()
    assert "out of bounds" in str(info.value)
    assert __file__ in str(info.value)  # points at the user's line


def test_success_leaves_nothing_behind(tiny: OculiModel) -> None:
    with unchanged(tiny, forwards=1), oculi.trace(tiny) as t:
        with t.invoke(PROMPT) as a:
            h = a.layers[1].resid_post
            a.layers[1].resid_mid = a.layers[1].resid_mid * 2
        with t.invoke("The Eiffel Tower is in Paris") as b:
            b.layers[1].resid_post = h
            b.layers[2].mlp.out[3] = 0
            b.layers[3].resid_pre.save()


def test_early_stop_leaves_nothing_behind(tiny: OculiModel) -> None:
    with unchanged(tiny, forwards=1), oculi.trace(tiny, PROMPT) as t:
        t.layers[0].mlp.out = 0
        t.layers[1].resid_post.save()


def test_late_start_leaves_nothing_behind(tiny: OculiModel) -> None:
    """Layers 0-1 are stood in for while the forward runs; after success or an error they are back."""
    with oculi.trace(tiny, PROMPT) as clean:
        clean.layers[2].resid_pre.save("state")
    with unchanged(tiny, forwards=1), oculi.trace(tiny, PROMPT) as t:
        t.layers[2].resid_pre = clean.saved["state"]
        t.logits.save()
    assert t.plan.start_layer == 2
    mlp = tiny.hf.get_submodule(ref.path(tiny, "layer", 3) + ".mlp")
    before = ref.state(tiny)
    with patched_forward(mlp, ValueError("kaboom")), pytest.raises(ExecutionError), \
            oculi.trace(tiny, PROMPT) as t:
        t.layers[2].resid_pre = clean.saved["state"]
        t.logits.save()
    ref.assert_same_state(before, ref.state(tiny))


def test_errors_are_oculi_errors() -> None:
    for cls in (CompileError, ExecutionError, RecordError, SiteError):
        assert issubclass(cls, OculiError) and cls is not OculiError
