"""Attention internals at one place for every family (DESIGN §4).

HF computes post-rotary q, k and v, then calls the function registered for the model's
attention implementation. For the duration of one run, :class:`AttentionRouter` puts a
dispatcher in that registry entry: layers whose attention sites the plan touches go through
:func:`attend` (eager math with each site fired, so edits flow on); every other layer calls the
original implementation unchanged (SDPA by default). The entry is restored in ``finally``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .errors import ExecutionError
from .plan import Step

Fire = Callable[[Step, torch.Tensor], torch.Tensor]
_MISSING = object()


def attend(fire: Fire, steps: dict[str, Step], module: torch.nn.Module, query: torch.Tensor,
           key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
           scaling: float | None = None, dropout: float = 0.0, softcap: float | None = None,
           sliding_window: int | None = None, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (as HF's ``eager_attention_forward``) with q/k/v/scores/pattern/z fired."""

    def at(field: str, tensor: torch.Tensor) -> torch.Tensor:
        step = steps.get(field)
        return tensor if step is None else fire(step, tensor)

    q, k, v = at("q", query), at("k", key), at("v", value)
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # same grouping as HF repeat_kv: query head h uses KV head h // n_rep
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    if scaling is None:
        scaling = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores, blocked = _mask(scores, attention_mask, sliding_window)
    scores = at("scores", scores)
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if blocked is not None:
        # rows with no visible key (left padding) are defined as all-zero, not uniform
        pattern = pattern.masked_fill(blocked.all(-1, keepdim=True), 0.0)
    if dropout and module.training:
        pattern = torch.nn.functional.dropout(pattern, p=dropout, training=True)
    pattern = at("pattern", pattern)
    z = torch.matmul(pattern, v).transpose(1, 2).contiguous()
    z = at("z", z)
    return z, pattern


def _mask(scores: torch.Tensor, mask: torch.Tensor | None,
          window: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply HF's mask (bool: True = visible; float: additive) or build the causal one."""
    low = torch.finfo(scores.dtype).min
    if mask is None:
        n_q, n_k = scores.shape[-2:]
        qpos = torch.arange(n_k - n_q, n_k, device=scores.device)[:, None]
        kpos = torch.arange(n_k, device=scores.device)[None, :]
        blocked = kpos > qpos
        if window is not None:
            blocked |= kpos <= qpos - window
        return scores.masked_fill(blocked, low), None
    mask = mask[..., : scores.shape[-1]]
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, low), ~mask
    return scores + mask, mask <= low / 2


def result(z_flat: torch.Tensor, weight: torch.Tensor, n_heads: int, layout: str) -> torch.Tensor:
    """Each head's write into the stream: (batch, token, head, d_model) from the o_proj input."""
    z = z_flat.unflatten(-1, (n_heads, -1))
    if layout == "conv1d":  # GPT-2 Conv1D keeps weight as (in, out)
        return torch.einsum("bthd,hdm->bthm", z, weight.unflatten(0, (n_heads, -1)))
    return torch.einsum("bthd,mhd->bthm", z, weight.unflatten(1, (n_heads, -1)))


class AttentionRouter:
    """Routes chosen attention modules through :func:`attend` for one forward pass."""

    def __init__(self, hf_model: torch.nn.Module, routes: dict[torch.nn.Module, dict[str, Step]], fire: Fire):
        self.routes = {id(m): s for m, s in routes.items()}
        self.fire = fire
        self.impl = getattr(hf_model.config, "_attn_implementation", None) or "eager"
        text = getattr(hf_model.config, "text_config", None)
        if text is not None and getattr(text, "_attn_implementation", None):
            self.impl = text._attn_implementation
        if self.impl not in ("sdpa", "eager"):
            raise ExecutionError(
                f"Attention sites need the 'sdpa' or 'eager' attention implementation; this model "
                f"uses {self.impl!r}. Load it with attn_implementation='sdpa' (or 'eager')."
            )
        self.calls = 0
        self._saved: Any = _MISSING

    def _original(self, module: torch.nn.Module) -> Callable[..., Any]:
        if self._saved is not _MISSING and self._saved is not None:
            return self._saved  # type: ignore[no-any-return]
        # "eager" is not in the registry: HF falls back to the modeling file's own function
        return sys.modules[type(module).__module__].eager_attention_forward  # type: ignore[no-any-return]

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> Any:
        steps = self.routes.get(id(module))
        if steps is None:
            return self._original(module)(module, query, key, value, attention_mask, *args, **kwargs)
        self.calls += 1
        return attend(self.fire, steps, module, query, key, value, attention_mask, *args, **kwargs)

    def __enter__(self) -> AttentionRouter:
        local = ALL_ATTENTION_FUNCTIONS._local_mapping
        self._had_local = self.impl in local
        self._previous_local = local.get(self.impl)
        self._saved = ALL_ATTENTION_FUNCTIONS.get(self.impl) if self.impl != "eager" else None
        ALL_ATTENTION_FUNCTIONS[self.impl] = self
        return self

    def __exit__(self, *exc: Any) -> None:
        local = ALL_ATTENTION_FUNCTIONS._local_mapping
        if self._had_local:
            local[self.impl] = self._previous_local
        else:
            local.pop(self.impl, None)
