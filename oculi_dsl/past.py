"""Cached keys and values: resume a forward pass after a prompt's first ``c`` positions.

``t.invoke(prompt, past=(k, v))`` hands a trace the keys and values of the prompt's first c
positions at every layer, exactly as the ``attn.k`` / ``attn.v`` sites hold them (post-rotary
keys per KV head): ``k`` and ``v`` of shape (layer, kv_head, c, d_head), or
(layer, prompt, kv_head, c, d_head) for an invoke of several prompts. The forward then runs
positions c..T-1 only: every token axis of the trace covers those positions (labelled c..T-1),
and attention reads the cached positions as keys, through the model's own KV cache. Nothing
before position c is recomputed, and the values equal a full forward to float tolerance.

Every invoke of the trace gets a ``past`` of the same length c, and the prompts are not padded
(one batch, one cache length). Sites with a key axis (``attn.k``, ``attn.v``, ``attn.scores``,
``attn.pattern``) are not available in such a trace: their cached part is the input itself.

>>> import oculi_dsl as oculi
>>> model = oculi.testing.tiny_model("llama")
>>> with oculi.trace(model, "The Eiffel Tower is in Paris") as full:
...     k, v = full.layers[:].attn.k.save("k"), full.layers[:].attn.v.save("v")
...     logits = full.logits.save("logits")
>>> c = 3
>>> past = (full.saved["k"][..., :c, :], full.saved["v"][..., :c, :])
>>> with oculi.trace(model) as t:
...     with t.invoke("The Eiffel Tower is in Paris", past=past) as x:
...         logits = x.logits.save("logits")
>>> bool((t.saved["logits"] - full.saved["logits"][c:]).abs().max() < 1e-5)
True
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CompileError, RecordError

KEY_AXIS_SITES = ("attn.k", "attn.v", "attn.scores", "attn.pattern")


@dataclass(frozen=True)
class Past:
    """Keys and values of the first ``length`` positions for every batch row:
    (layer, row, kv_head, length, d_head) each."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.keys.shape[-2])


def check_past(past: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Validate ``past=`` as given to an invoke (record time): a pair of tensors, or None."""
    if past is None:
        return None
    from .proxy import OculiProxy

    if isinstance(past, (tuple, list)) and len(past) == 2 and any(isinstance(p, OculiProxy) for p in past):
        raise RecordError("past= takes saved tensors (keys, values) from a trace that has run, not "
                          "proxies of this one: save attn.k and attn.v there and pass t.saved[...].")
    if not (isinstance(past, (tuple, list)) and len(past) == 2
            and all(isinstance(p, torch.Tensor) for p in past)):
        raise RecordError(f"past= must be a pair of tensors (keys, values), got {type(past).__name__}. "
                          "Save `t.layers[:].attn.k` and `.attn.v` in a trace and pass "
                          "(k[..., :c, :], v[..., :c, :]).")
    k, v = past
    if k.shape != v.shape or k.dim() not in (4, 5):
        raise RecordError(f"past= keys {tuple(k.shape)} and values {tuple(v.shape)} must have the same "
                          "shape (layer, kv_head, c, d_head), or (layer, prompt, kv_head, c, d_head).")
    return k.detach(), v.detach()


def stack(pasts: Sequence[tuple[torch.Tensor, torch.Tensor] | None], rows: Sequence[int],
          lengths: Sequence[int], n_layers: int, n_kv_heads: int, d_head: int) -> Past | None:
    """One :class:`Past` for the whole batch from each invoke's (``rows`` rows, ``lengths`` tokens)."""
    if all(p is None for p in pasts):
        return None
    if any(p is None for p in pasts):
        missing = [i for i, p in enumerate(pasts) if p is None]
        raise CompileError(f"Invokes {missing} have no past= while others do: one forward pass has one "
                           "cache length, so give every invoke the keys and values of its first c "
                           "positions, or none of them.")
    keys, values, length = [], [], None
    for i, (past, n_rows, n_tok) in enumerate(zip(pasts, rows, lengths, strict=True)):
        k, v = past  # type: ignore[misc]
        given = tuple(k.shape)
        if k.dim() == 4:
            k, v = (x.unsqueeze(1).expand(-1, n_rows, -1, -1, -1) for x in (k, v))
        expected = (n_layers, n_rows, n_kv_heads, k.shape[-2], d_head)
        if tuple(k.shape) != expected:
            raise CompileError(f"past= of invoke {i} has shape {given}; this model needs "
                               f"(layer={n_layers}, kv_head={n_kv_heads}, c, d_head={d_head}), with "
                               f"prompt={n_rows} after layer for an invoke of {n_rows} prompts.")
        if length is not None and k.shape[-2] != length:
            raise CompileError(f"past= of invoke {i} covers {k.shape[-2]} positions, invoke 0 covers "
                               f"{length}: every invoke of one trace resumes at the same position.")
        length = int(k.shape[-2])
        if not 1 <= length < n_tok:
            raise CompileError(f"past= of invoke {i} covers {length} positions of a {n_tok}-token "
                               "prompt: it must leave at least one position to run (1 <= c < tokens).")
        keys.append(k)
        values.append(v)
    return Past(torch.cat(keys, dim=1), torch.cat(values, dim=1))


def model_cache(model: Any, past: Past, device: torch.device, dtype: torch.dtype) -> tuple[str, Any]:
    """(keyword, cache) to pass to the HF model: a fresh ``DynamicCache`` holding ``past``.

    A fresh cache per run, because the model appends the new positions to it. Sliding-window
    layers keep what their window can still see, as after a real forward.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.hf.config)
    for layer in range(past.keys.shape[0]):
        cache.update(past.keys[layer].to(device=device, dtype=dtype),
                     past.values[layer].to(device=device, dtype=dtype), layer)
    names = inspect.signature(model.hf.forward).parameters
    return ("cache" if "cache" in names else "past_key_values"), cache
