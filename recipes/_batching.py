"""Batched execution of patching sweeps: many patched copies per forward pass.

A sweep (activation patching, causal tracing) is a list of *cells*; each cell is one patched
copy of a base run. Instead of one forward pass per cell, :func:`run_sweep` puts a chunk of
cells into ONE trace: the source run (e.g. the clean prompt) is the first invoke and every
cell is its own invoke whose edits read the source invoke's values, so the clean activations
flow into the patched copies inside the same forward pass, with no extra run. Each chunk is
one forward; a progress bar counts chunks. How many cells share a chunk follows ``chunk_size``
or a memory budget (:func:`cells_per_chunk`); which cells share one, and where each later pass
resumes (first layer, first position), follows :mod:`._chunks`.

Each patched copy is read out at ONE position: the last layer's ``resid_post`` there, unembedded
with the model's own final norm and unembedding module (plus logit soft-capping when the
config has it), so the forward stops after the last layer and the full-sequence unembedding is
skipped. :func:`unembed` is the same map the model applies (equal to its logits within float
tolerance).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import oculi_dsl as oculi

from ._chunks import Chunk, first_position, plan_chunks, shifted
from ._errors import RecipeError

__all__ = ["Edit", "cells_per_chunk", "parse_budget", "run_sweep", "softcap", "unembed"]

DEFAULT_BUDGET = 2 * 1024**3  # bytes of activations per chunk
# rows × tokens per forward pass. On CPU, throughput saturates at a few hundred tokens per pass
# (SmolLM2, 2 cores: 50-400 rows of 10 tokens run at the same speed; 810 rows are 1.6× slower).
MAX_CHUNK_TOKENS = {"cpu": 1024}
MAX_CHUNK_TOKENS_OTHER = 1 << 16
# Passes a sweep may add to the fewest when resuming later passes cuts the compute (a CPU
# forward costs what it computes; an accelerator's mostly what it launches, so none there).
SPARE_PASSES = {"cpu": 1}
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def softcap(model: Any) -> float | None:
    """``final_logit_softcapping`` of the model's config (Gemma 2/3), or None."""
    config = getattr(model.hf.config, "text_config", None) or model.hf.config
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def final_norm_module(model: Any) -> torch.nn.Module:
    """The model's final norm, found through the family table (``final_norm`` site)."""
    return model.hf.get_submodule(model.family.model_sites["final_norm"].module)


def unembed(model: Any, h: Any) -> Any:
    """``logits = softcap(lm_head(norm_f(h)))`` for residual states ``h`` (..., d_model).

    Works on proxies (recorded as calls of the model's own modules) and on tensors. This is the
    map the model applies to its last ``resid_post``; SPEC: never apply it to an already-normed
    state (HF ``hidden_states[-1]``).
    """
    logits = model.hf.get_output_embeddings()(final_norm_module(model)(h))
    cap = softcap(model)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def parse_budget(budget: int | float | str | None) -> int:
    """Bytes from ``2**30``, ``"512MB"``, ``"2GiB"`` … (None → the default, 2 GiB)."""
    if budget is None:
        return DEFAULT_BUDGET
    if isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 0:
        return int(budget)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(budget))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise RecipeError(f"memory_budget={budget!r} is not a size. Give bytes (an int) or a "
                          "string like '512MB', '2GB' or '1GiB'.")
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise RecipeError(f"memory_budget={budget!r} must be positive, e.g. '2GB'.")
    return int(value)


def cells_per_chunk(model: Any, n_tokens: int, rows_per_cell: int, chunk_size: int | None,
                    memory_budget: Any = None) -> int:
    """Cells per forward pass: ``chunk_size`` if given, else what the memory budget allows.

    A batch row of T tokens needs roughly T·(16·d_model + 4·n_neurons + 4·n_heads·T) values of
    activations while the forward runs (attention scores included); the budget is divided by
    that, and capped at MAX_CHUNK_TOKENS tokens per pass (1024 on CPU, 65536 elsewhere).
    """
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise RecipeError(f"chunk_size={chunk_size!r} must be a positive int (cells per "
                              "forward pass), or None to size chunks from memory_budget.")
        return chunk_size
    info = model.info
    elt = torch.empty((), dtype=info.dtype).element_size()
    per_row = elt * n_tokens * (16 * info.d_model + 4 * info.n_neurons + 4 * info.n_heads * n_tokens)
    cap = MAX_CHUNK_TOKENS.get(torch.device(info.device).type, MAX_CHUNK_TOKENS_OTHER)
    rows = min(parse_budget(memory_budget) // max(per_row, 1), cap // max(n_tokens, 1))
    return max(1, int(rows) // rows_per_cell)


@dataclass(frozen=True)
class Edit:
    """Copy the source run's ``site`` at ``layer`` into the patched copy (``index`` = part of it).

    ``index`` indexes the site's value without the batch dim (e.g. ``(4,)`` is token 4 of
    ``mlp.out``, ``(slice(None), 2)`` is head 2 of ``attn.z``); None copies the whole site.
    """

    site: str
    layer: int
    index: tuple[Any, ...] | None = None


def _site_view(invoke: Any, layer: int, site: str) -> tuple[Any, str]:
    """The layer view holding ``site`` and the site's last name part (``attn.q`` → attn, 'q')."""
    *groups, name = site.split(".")
    view = invoke.layers[layer]
    for group in groups:
        view = getattr(view, group)
    return view, name


def _apply(x: Any, source: Any, edit: Edit, multi_rows: bool, cache: dict[Edit, Any]) -> None:
    value = cache.get(edit)
    if value is None:
        view, name = _site_view(source, edit.layer, edit.site)
        value = getattr(view, name)
        if edit.index is not None:
            value = value[edit.index]
        cache[edit] = value
    view, name = _site_view(x, edit.layer, edit.site)
    if edit.index is None:
        setattr(view, name, value)
    else:
        getattr(view, name)[((slice(None),) if multi_rows else ()) + edit.index] = value


def run_sweep(model: Any, *, source: Any, base: Any, cells: Sequence[Sequence[Edit]],
              position: int, measure: Callable[[Any, int], Any], per_chunk: int,
              prepare: Callable[[Any], None] | None = None, multi_rows: bool = False,
              progress: bool = True, desc: str = "patching") -> tuple[torch.Tensor, int]:
    """Run every cell (a list of edits) as a patched copy of ``base``; return (metrics, passes).

    ``source`` and ``base`` are prompts (token ids) of one length; ``base`` may hold several
    rows (one copy per row, e.g. ROME's noised copies; ``multi_rows=True``). ``prepare(x)``
    records edits every copy shares (noise on the embeddings). ``measure(logits, n)`` maps the
    stacked readout logits (n cells, [row,] vocab) at ``position`` to one value per cell.

    Passes are planned by :func:`~._chunks.plan_chunks`: the first runs in full and also saves
    both runs' layer inputs and attention keys/values; every later pass resumes at the first
    layer and position its cells patch (``resid_pre`` assigned, ``past=`` for earlier
    positions), so nothing a patch cannot change is recomputed.
    """
    from tqdm.auto import tqdm

    if not cells:
        return torch.empty(0), 0
    n_tok, last = len(source), model.info.n_layers - 1
    rows = len(base) if multi_rows else 1
    plan = plan_chunks([min(e.layer for e in c) for c in cells],
                       [min(first_position(model, e, n_tok) for e in c) for c in cells],
                       per_chunk, model.info.n_layers, n_tok, rows,
                       SPARE_PASSES.get(torch.device(model.info.device).type, 0))
    saved: dict[str, torch.Tensor] = {}
    out: dict[int, torch.Tensor] = {}
    bar = tqdm(plan, desc=desc, unit="pass", disable=not progress or len(plan) < 2, leave=False,
               dynamic_ncols=True)
    for k, chunk in enumerate(bar):
        with oculi.trace(model) as t:
            src, x_of = _invokes(t, model, source, base, chunk, saved, prepare, plan[1:] if k == 0 else ())
            cache: dict[Edit, Any] = {}
            reads = []
            for i in chunk.cells:
                x = x_of()
                for edit in cells[i]:
                    _apply(x, src, shifted(model, edit, chunk.position, n_tok), multi_rows, cache)
                reads.append(x.layers[last].resid_post[..., position - chunk.position, :])
            measure(unembed(model, torch.stack(reads)), len(chunk.cells)).save("metric")
        if k == 0:
            saved = {name: v.detach() for name, v in t.saved.items() if name != "metric"}
        for i, value in zip(chunk.cells, t.saved["metric"].detach().float().cpu().reshape(-1), strict=True):
            out[i] = value
    return torch.stack([out[i] for i in range(len(cells))]), len(plan)


def _invokes(t: Any, model: Any, source: Any, base: Any, chunk: Chunk, saved: dict[str, torch.Tensor],
             prepare: Callable[[Any], None] | None, later: Sequence[Chunk]) -> tuple[Any, Callable[[], Any]]:
    """The source invoke and a factory of patched copies, resumed as ``chunk`` says. The first
    pass (``later`` given) also saves what the later passes resume from."""
    if not (chunk.layer or chunk.position):
        src = t.invoke(source)
        if later:
            unpatched = t.invoke(base)
            if prepare is not None:
                prepare(unpatched)
            for layer in sorted({c.layer for c in later}):
                src.layers[layer].resid_pre.save(f"source_in{layer}")
                unpatched.layers[layer].resid_pre.save(f"base_in{layer}")
            if any(c.position for c in later):
                for name, invoke in (("source", src), ("base", unpatched)):
                    invoke.layers[:].attn.k.save(f"{name}_k")
                    invoke.layers[:].attn.v.save(f"{name}_v")

        def fresh() -> Any:
            x = t.invoke(base)
            if prepare is not None:
                prepare(x)
            return x
        return src, fresh
    c, layer = chunk.position, chunk.layer

    def past(name: str) -> Any:
        return (saved[f"{name}_k"][..., :c, :], saved[f"{name}_v"][..., :c, :]) if c else None
    src = t.invoke(source, past=past("source"))
    src.layers[layer].resid_pre = saved[f"source_in{layer}"][..., c:, :]

    def resumed_copy() -> Any:
        x = t.invoke(base, past=past("base"))
        x.layers[layer].resid_pre = saved[f"base_in{layer}"][..., c:, :]  # noise already in it
        return x
    return src, resumed_copy


def baseline_logits(model: Any, prompts: Sequence[Any], position: int,
                    prepare: dict[int, Callable[[Any], None]] | None = None) -> list[torch.Tensor]:
    """Readout logits at ``position`` of each prompt, unpatched, in ONE forward pass.

    Uses the same readout as :func:`run_sweep` (last ``resid_post`` unembedded), so baseline
    and patched metrics come from the same computation. ``prepare[i]`` edits invoke i first.
    """
    last = model.info.n_layers - 1
    with oculi.trace(model) as t:
        for i, prompt in enumerate(prompts):
            x = t.invoke(prompt)
            if prepare and i in prepare:
                prepare[i](x)
            unembed(model, x.layers[last].resid_post[..., position, :]).save(f"logits{i}")
    return [t.saved[f"logits{i}"].detach() for i in range(len(prompts))]


def check_position(position: Any, n_tokens: int) -> int:
    """An int position (negative from the end) as an absolute index, with a clear error."""
    if isinstance(position, bool) or not isinstance(position, int) or not -n_tokens <= position < n_tokens:
        raise RecipeError(f"position={position!r} is out of range for a prompt of {n_tokens} "
                          f"tokens: valid positions are 0..{n_tokens - 1} or -{n_tokens}..-1.")
    return position % n_tokens


def n_chunks(n_cells: int, per_chunk: int) -> int:
    return math.ceil(n_cells / per_chunk) if n_cells else 0
