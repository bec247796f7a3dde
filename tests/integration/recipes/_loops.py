"""Plain per-cell reference loops for the patching recipes, written with torch hooks only.

Nothing here uses oculi-dsl: module paths are spelled out per family, values are captured and
replaced with ``register_forward_hook`` / ``register_forward_pre_hook`` (removed in
``finally``), and every cell is its own HF forward pass. The recipes' batched results must
equal these loops cell by cell.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

PATHS: dict[str, dict[str, str]] = {
    "llama": {"layers": "model.layers", "embed": "model.embed_tokens", "attn.out": "self_attn",
              "mlp.out": "mlp", "mid_norm": "post_attention_layernorm", "o_proj": "self_attn.o_proj"},
    "gemma3_text": {"layers": "model.layers", "embed": "model.embed_tokens",
                    "attn.out": "post_attention_layernorm", "mlp.out": "post_feedforward_layernorm",
                    "mid_norm": "pre_feedforward_layernorm", "o_proj": "self_attn.o_proj"},
    "gpt2": {"layers": "transformer.h", "embed": "transformer.wte", "attn.out": "attn",
             "mlp.out": "mlp", "mid_norm": "ln_2", "o_proj": "attn.c_proj"},
}


def _paths(model: Any) -> dict[str, str]:
    return PATHS[model.hf.config.model_type]


def _mod(model: Any, key: str, layer: int | None = None) -> torch.nn.Module:
    p = _paths(model)
    if layer is None:
        return model.hf.get_submodule(p[key])
    base = f"{p['layers']}.{layer}"
    return model.hf.get_submodule(base if key == "layer" else f"{base}.{p[key]}")


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def _replace(x: Any, value: torch.Tensor) -> Any:
    return (value, *x[1:]) if isinstance(x, tuple) else value


@contextlib.contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _pre_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _pre_set(args: tuple[Any, ...], kwargs: dict[str, Any], value: torch.Tensor) -> Any:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def edit_site(model: Any, site: str, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
    """Hooks that replace ``site``'s value v (batch, token, …) by ``fn(v)``; returns handles."""
    if site == "resid_pre":
        return [_mod(model, "layer", layer).register_forward_pre_hook(
            lambda m, a, k: _pre_set(a, k, fn(_pre_arg(a, k))), with_kwargs=True)]
    if site == "resid_post":
        return [_mod(model, "layer", layer).register_forward_hook(
            lambda m, a, o: _replace(o, fn(_first(o))))]
    if site in ("attn.out", "mlp.out"):
        return [_mod(model, site, layer).register_forward_hook(
            lambda m, a, o: _replace(o, fn(_first(o))))]
    if site == "attn.z":  # the output projection's input, (batch, token, head * d_head)
        n_heads = model.hf.config.num_attention_heads if hasattr(model.hf.config, "num_attention_heads") \
            else model.hf.config.n_head

        def on_z(m: Any, a: tuple[Any, ...]) -> Any:
            z = a[0]
            new = fn(z.reshape(*z.shape[:-1], n_heads, -1)).reshape(z.shape)
            return (new, *a[1:])
        return [_mod(model, "o_proj", layer).register_forward_pre_hook(on_z)]
    if site == "resid_mid":  # x_mid = x + a: edit a so that x + a' = fn(x + a)
        seen: dict[str, torch.Tensor] = {}

        def keep(m: Any, a: tuple[Any, ...], k: dict[str, Any]) -> None:
            seen["x"] = _pre_arg(a, k)

        def on_attn(m: Any, a: Any, o: Any) -> Any:
            out = _first(o)
            mid = seen["x"] + out
            return _replace(o, fn(mid) - seen["x"])
        return [_mod(model, "layer", layer).register_forward_pre_hook(keep, with_kwargs=True),
                _mod(model, "attn.out", layer).register_forward_hook(on_attn)]
    raise ValueError(site)


def capture(model: Any, ids: torch.Tensor, sites: Sequence[tuple[str, int]]) -> dict[tuple[str, int], torch.Tensor]:
    """Values of (site, layer) pairs in one unedited forward (through identity edits)."""
    got: dict[tuple[str, int], torch.Tensor] = {}
    handles: list[Any] = []
    for site, layer in sites:
        def grab(v: torch.Tensor, key: tuple[str, int] = (site, layer)) -> torch.Tensor:
            got[key] = v.detach().clone()
            return v
        handles += edit_site(model, site, layer, grab)
    with _hooks(handles), torch.no_grad():
        model.hf(input_ids=ids)
    return got


def patch_loop(model: Any, source: Sequence[int], base: Sequence[int],
               cells: Sequence[tuple[str, int, int | None, int | None]], position: int,
               metric: Callable[[torch.Tensor], float]) -> list[float]:
    """For each (site, layer, head, token) cell: one forward of ``base`` with that cell copied
    from ``source`` (all heads / tokens when None); the metric of its logits at ``position``."""
    src_ids, base_ids = torch.tensor([list(source)]), torch.tensor([list(base)])
    clean = capture(model, src_ids, sorted({(s, lay) for s, lay, _, _ in cells}))
    out = []
    for site, layer, head, token in cells:
        value = clean[(site, layer)]

        def put(v: torch.Tensor, value: torch.Tensor = value, head: Any = head, token: Any = token) -> torch.Tensor:
            new = v.clone()
            tok = slice(None) if token is None else token
            if head is None:
                new[:, tok] = value[:, tok]
            else:
                new[:, tok, head] = value[:, tok, head]
            return new
        with _hooks(edit_site(model, site, layer, put)), torch.no_grad():
            logits = model.hf(input_ids=base_ids).logits[0, position]
        out.append(float(metric(logits)))
    return out


def rome_loop(model: Any, ids: Sequence[int], subject: Sequence[int], nu: float, samples: int,
              seed: int, cells: Sequence[tuple[Sequence[int], str, int]], position: int,
              target: int, corrupt: Sequence[int] | None = None) -> list[float]:
    """ROME's trace_with_patch, one forward per cell: row 0 clean, rows 1.. corrupted (noise on
    the subject's token embeddings, or the counterfactual prompt); each cell is (layers to
    restore, site, token); returns the target probability averaged over the corrupted rows."""
    d = model.hf.get_input_embeddings().weight.shape[1]
    if corrupt is None:
        batch = torch.tensor([list(ids)] * (samples + 1))
        eps = torch.randn((samples, len(subject), d), generator=torch.Generator().manual_seed(seed))
    else:
        batch = torch.tensor([list(ids), list(corrupt)])
    out = []
    for layers, site, token in cells:
        handles: list[Any] = []
        if corrupt is None:
            def noise(m: Any, a: Any, o: torch.Tensor) -> torch.Tensor:
                o = o.clone()
                o[1:, list(subject)] += nu * eps.to(o.dtype)
                return o
            handles.append(_mod(model, "embed").register_forward_hook(noise))
        for layer in layers:
            def restore(v: torch.Tensor, token: int = token) -> torch.Tensor:
                v = v.clone()
                v[1:, token] = v[0, token]
                return v
            handles += edit_site(model, site, layer, restore)
        with _hooks(handles), torch.no_grad():
            logits = model.hf(input_ids=batch).logits[1:, position]
        out.append(float(logits.softmax(-1)[:, target].mean()))
    return out


def matrix_std(model: Any) -> float:
    """std of the embedding matrix entries as they reach the stream (Gemma: × √d_model)."""
    w = model.hf.get_input_embeddings().weight.detach()
    scale = model.hf.config.hidden_size ** 0.5 if model.hf.config.model_type == "gemma3_text" else 1.0
    return float(w.std()) * scale


@contextlib.contextmanager
def count_forwards(model: Any) -> Iterator[list[int]]:
    """Counts calls of the HF model's forward (a pre-hook on ``model.hf``)."""
    calls: list[int] = []
    handle = model.hf.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()
