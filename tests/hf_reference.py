"""Independent reference computations for the acceptance tests: plain HF, hand-written hooks.

Nothing here uses oculi-dsl's site tables, compiler or executor: module paths are written out
per family by hand (``PATHS``), values are captured with ``register_forward_hook`` /
``register_forward_pre_hook`` and every hook is removed in ``finally``. Test files import this
module by name (pytest puts ``tests/`` on ``sys.path`` because of ``tests/conftest.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.modules.module as torch_module

# Hand-written per-family module paths (deliberately not read from oculi_dsl.sites).
PATHS: dict[str, dict[str, str]] = {
    "llama": {
        "layers": "model.layers",
        "embed": "model.embed_tokens",
        "final_norm": "model.norm",
        "attn": "self_attn",
        "attention": "self_attn",  # the attention module itself
        "out_proj": "self_attn.o_proj",
        "mid_norm": "post_attention_layernorm",  # its input is resid_mid
        "mlp": "mlp",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",  # its input is mlp.act
    },
    "gemma3": {
        "layers": "model.layers",
        "embed": "model.embed_tokens",
        "final_norm": "model.norm",
        "attn": "post_attention_layernorm",  # attention output as added to the stream
        "attention": "self_attn",
        "out_proj": "self_attn.o_proj",
        "mid_norm": "pre_feedforward_layernorm",
        "mlp": "post_feedforward_layernorm",  # MLP output as added to the stream
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
    "gpt2": {
        "layers": "transformer.h",
        "embed": "transformer.drop",  # token + position embeddings
        "final_norm": "transformer.ln_f",
        "attn": "attn",
        "attention": "attn",
        "out_proj": "attn.c_proj",
        "mid_norm": "ln_2",
        "mlp": "mlp",
        "pre": "mlp.c_fc",
        "down": "mlp.c_proj",
    },
}


def family(model: Any) -> str:
    return {"llama": "llama", "gemma3_text": "gemma3", "gpt2": "gpt2"}[model.hf.config.model_type]


def path(model: Any, key: str, layer: int | None = None) -> str:
    """Dotted module path of ``key`` (``"mlp"``, ``"gate"`` …) in ``layer``, or at model level."""
    p = PATHS[family(model)]
    if layer is None:
        return p[key]
    return f"{p['layers']}.{layer}" + (f".{p[key]}" if key != "layer" else "")


def module(model: Any, key: str, layer: int | None = None) -> torch.nn.Module:
    return model.hf.get_submodule(path(model, key, layer))


def attn_module(model: Any, layer: int) -> torch.nn.Module:
    """The attention module of ``layer`` (q/k/v projections live here)."""
    return module(model, "attention", layer)


def out_proj(model: Any, layer: int) -> torch.nn.Module:
    """The attention output projection of ``layer`` (its input is z, its output Σ_h results)."""
    return module(model, "out_proj", layer)


def layer_module(model: Any, layer: int) -> torch.nn.Module:
    return module(model, "layer", layer)


@contextlib.contextmanager
def eager(model: Any) -> Iterator[None]:
    """Switch the model to HF eager attention, restoring the configured implementation."""
    impl = model.hf.config._attn_implementation
    model.hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.hf.set_attn_implementation(impl)
    assert model.hf.config._attn_implementation == impl


@contextlib.contextmanager
def hooked(*hooks: tuple[torch.nn.Module, str, Callable[..., Any]]) -> Iterator[None]:
    """Register plain PyTorch hooks: (module, "pre" | "fwd" | "pre_kw", fn); removed after."""
    handles = []
    try:
        for module, kind, fn in hooks:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(fn))
            elif kind == "pre_kw":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def n_layers(model: Any) -> int:
    return len(model.hf.get_submodule(PATHS[family(model)]["layers"]))


def ids_of(model: Any, prompt: str) -> torch.Tensor:
    """``(1, T)`` token ids of one prompt, exactly as the tokenizer gives them."""
    return torch.tensor([model.tokenizer(prompt)["input_ids"]], dtype=torch.long)


def token_strs(model: Any, prompt: str) -> list[str]:
    return [model.tokenizer.decode([i]) for i in model.tokenizer(prompt)["input_ids"]]


def first(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x[0]


@torch.no_grad()
def hf_forward(model: Any, ids: torch.Tensor, **kwargs: Any) -> Any:
    """A plain HF forward (``output_hidden_states`` etc. passed through)."""
    return model.hf(ids, **kwargs)


@dataclass
class Capture:
    """One value to capture: a module's first input or its output (first tuple element)."""

    path: str
    where: str = "output"


@torch.no_grad()
def capture(model: Any, ids: torch.Tensor, wanted: dict[str, Capture],
            edits: list[tuple[str, str, Callable[..., Any]]] = ()) -> tuple[dict[str, torch.Tensor], Any]:
    """Run one plain forward with hand-written hooks; returns (captured values, HF output).

    ``edits`` are ``(path, "input"|"output", fn)``: ``fn(value) -> new value`` installed as a
    pre-hook / forward hook *before* the capture hooks, so captures see the edited values.
    """
    got: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for p, where, fn in edits:
            mod = model.hf.get_submodule(p)
            if where == "input":
                handles.append(mod.register_forward_pre_hook(_edit_input(fn), with_kwargs=True))
            else:
                handles.append(mod.register_forward_hook(_edit_output(fn)))
        for name, cap in wanted.items():
            mod = model.hf.get_submodule(cap.path)
            if cap.where == "input":
                handles.append(mod.register_forward_pre_hook(_grab_input(got, name), with_kwargs=True))
            else:
                handles.append(mod.register_forward_hook(_grab_output(got, name)))
        out = model.hf(ids)
    finally:
        for h in handles:
            h.remove()
    return got, out


def _hidden_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str | int, torch.Tensor]:
    if args:
        return 0, args[0]
    return "hidden_states", kwargs["hidden_states"]


def _grab_input(got: dict[str, torch.Tensor], name: str) -> Callable[..., None]:
    def hook(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        got[name] = _hidden_arg(args, kwargs)[1].detach().clone()
    return hook


def _grab_output(got: dict[str, torch.Tensor], name: str) -> Callable[..., None]:
    def hook(mod: Any, args: Any, output: Any) -> None:
        got[name] = first(output).detach().clone()
    return hook


def _edit_input(fn: Callable[..., Any]) -> Callable[..., Any]:
    def hook(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        where, value = _hidden_arg(args, kwargs)
        if where == 0:
            return (fn(value), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(value)}
    return hook


def _edit_output(fn: Callable[..., Any]) -> Callable[..., Any]:
    def hook(mod: Any, args: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return fn(output)
        return (fn(output[0]), *output[1:])
    return hook


# -- counting calls --------------------------------------------------------------------------

@contextlib.contextmanager
def attend_calls(monkeypatch: Any) -> Iterator[list[int]]:
    """Record the layer index of every call of ``oculi_dsl.attention.attend`` (the eager path
    oculi routes touched layers through), via pytest's ``monkeypatch``."""
    import oculi_dsl.attention as attention_mod

    calls: list[int] = []
    real = attention_mod.attend

    def spy(fire: Any, steps: Any, module: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(module.layer_idx)
        return real(fire, steps, module, *args, **kwargs)

    monkeypatch.setattr(attention_mod, "attend", spy)
    yield calls


@contextlib.contextmanager
def count_calls(mod: torch.nn.Module) -> Iterator[list[int]]:
    """Count forward calls of ``mod`` (a pre-hook, removed on exit): ``len(calls)``."""
    calls: list[int] = []
    handle = mod.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


# -- state snapshot: hooks, patched forwards, attention settings, flags ------------------------

_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
    "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_with_kwargs",
    "_global_forward_hooks_always_called", "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def state(model: Any) -> dict[str, Any]:
    """Everything a trace could leave behind on the model, comparable with ``==``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    snap: dict[str, Any] = {}
    for name, mod in model.hf.named_modules():
        snap[f"{name}:module"] = id(mod)  # a module swapped out for a run must be back
        snap[f"{name}:hooks"] = {a: dict(getattr(mod, a, {})) for a in _HOOK_DICTS}
        snap[f"{name}:forward"] = mod.__dict__.get("forward")  # an instance-level patch
        snap[f"{name}:training"] = mod.training
        config = getattr(mod, "config", None)
        if config is not None:
            snap[f"{name}:attn_impl"] = getattr(config, "_attn_implementation", None)
    snap["globals"] = {g: dict(getattr(torch_module, g, {})) for g in _GLOBAL_HOOKS}
    snap["attention_functions"] = dict(ALL_ATTENTION_FUNCTIONS.items())
    snap["requires_grad"] = {n: p.requires_grad for n, p in model.hf.named_parameters()}
    snap["grad_enabled"] = torch.is_grad_enabled()
    return snap


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the trace left state behind on: {changed[:10]}"
