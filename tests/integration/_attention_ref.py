"""Hand-written attention references shared by the attention tests (no oculi involved).

Plain forwards with hooks, one layer's captured internals, a head's slice replaced in the
output projection's input, and softmax(mask(q kᵀ · s)) written out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hf_reference import attn_module, hooked, out_proj

from oculi_dsl.models import OculiModel

PROMPT = "The capital of France is Paris"
OTHER = "The capital of Germany is Berlin"  # same token length as PROMPT in the tiny tokenizer
ATOL = 1e-5


def bare(m: OculiModel, ids: torch.Tensor, *hooks: Any, **kwargs: Any) -> Any:
    with hooked(*hooks), torch.no_grad():
        return m.hf(input_ids=ids, **kwargs)


def capture_layer(m: OculiModel, ids: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """Hand capture of one layer: attention input, o_proj input and output, logits."""
    got: dict[str, torch.Tensor] = {}

    def attn_in(mod: Any, args: Any, kwargs: Any) -> None:
        got["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def proj_in(mod: Any, args: Any) -> None:
        got["z_flat"] = args[0].detach().clone()

    def proj_out(mod: Any, args: Any, out: torch.Tensor) -> None:
        got["o"] = out.detach().clone()

    out = bare(m, ids, (attn_module(m, layer), "pre_kw", attn_in),
               (out_proj(m, layer), "pre", proj_in), (out_proj(m, layer), "fwd", proj_out))
    got["logits"] = out.logits
    return got


def replace_head_hook(m: OculiModel, head: int, values: torch.Tensor | None) -> Callable[..., Any]:
    """o_proj pre-hook putting ``values`` (token, d_head) — or zeros — into one head's slice."""
    d = m.info.d_head

    def hook(mod: Any, args: Any) -> Any:
        x = args[0].clone()
        x[..., head * d:(head + 1) * d] = 0.0 if values is None else values
        return (x, *args[1:])

    return hook


def visible(m: OculiModel, layer: int, n: int) -> torch.Tensor:
    """(query, key) bool: causal, and the sliding window on Gemma 3's sliding layers."""
    qpos, kpos = torch.arange(n)[:, None], torch.arange(n)[None, :]
    mask = kpos <= qpos
    types = getattr(m.hf.config, "layer_types", None)
    if types is not None and types[layer] == "sliding_attention":
        mask &= kpos > qpos - m.hf.config.sliding_window
    return mask


def expected_pattern(m: OculiModel, layer: int, q: torch.Tensor, k: torch.Tensor,
                     alpha: torch.Tensor | float = 1.0) -> torch.Tensor:
    """softmax(alpha · mask(q kᵀ · s)) by hand: (head, query, key), k per KV head."""
    n_rep = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(n_rep, dim=-3)
    scores = q @ k.transpose(-1, -2) * attn_module(m, layer).scaling
    scores = scores * (alpha if not isinstance(alpha, torch.Tensor) else alpha[:, None, None])
    scores = scores.masked_fill(~visible(m, layer, q.shape[-2]), float("-inf"))
    return scores.softmax(-1)
