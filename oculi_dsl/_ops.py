"""The few functions that appear in recorded graphs besides torch's own.

They are plain callables so the same graph runs on meta tensors (compile) and on real ones
(execute). ``read_site`` is never called: the executor binds its value when the site fires.
"""

from __future__ import annotations

from typing import Any

import torch


def read_site(label: str) -> torch.Tensor:
    """Value of a site as it arrives in the forward pass (bound by the executor)."""
    raise RuntimeError(f"read_site({label!r}) is bound by the executor, never called")


def save(value: Any, name: str) -> Any:
    """Mark ``value`` to be returned under ``name``."""
    return value


def stack_layers(*values: torch.Tensor, fill: float = float("nan")) -> torch.Tensor:
    """Stack one site's values over a layer selection on a new leading ``layer`` dim.

    During cached generation a sliding-window layer holds fewer keys than a global one; the
    shorter last axes are left-padded with ``fill`` (0 for patterns, -inf for scores: exactly
    what those positions hold when the window hides them).
    """
    width = max(v.shape[-1] for v in values)
    if any(v.shape[-1] != width for v in values):
        values = tuple(torch.nn.functional.pad(v, (width - v.shape[-1], 0), value=fill) for v in values)
    return torch.stack(values)


def select_layer(stacked: torch.Tensor, i: int) -> torch.Tensor:
    """Entry ``i`` of a value stacked over layers."""
    return stacked[i]


def assign(old: torch.Tensor, new: Any) -> torch.Tensor:
    """The value that replaces ``old``: ``new`` converted to old's dtype/device and shape."""
    value = torch.as_tensor(new).to(device=old.device, dtype=old.dtype)
    if value.shape != old.shape:
        value = torch.broadcast_to(value, old.shape).clone()
    return value


def assign_layer(old: torch.Tensor, new: Any, i: int, n: int) -> torch.Tensor:
    """Assignment to layer ``i`` of an ``n``-layer selection: a per-layer slice or a broadcast."""
    if isinstance(new, torch.Tensor) and new.dim() == old.dim() + 1 and new.shape[0] == n:
        new = new[i]
    return assign(old, new)


def setitem(base: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """``base[index] = value`` without touching ``base``: earlier reads keep their value."""
    out = base.clone()
    out[index] = value.to(out.dtype) if isinstance(value, torch.Tensor) else value
    return out


def evaluate(node: Any, value_of: Any, constants: dict[str, Any]) -> Any:
    """Run one graph node; ``value_of`` maps an input node to its value."""
    import torch.fx

    def load(a: Any) -> Any:
        return value_of(a)

    if node.op == "get_attr":
        return constants[node.target]
    args = torch.fx.node.map_arg(node.args, load)
    kwargs = torch.fx.node.map_arg(node.kwargs, load)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def scale_at(x: torch.Tensor, alpha: float, index: Any) -> torch.Tensor:
    """``x`` with ``x[index]`` multiplied by ``alpha`` (``x`` itself untouched)."""
    out = x.clone()
    out[index] = out[index] * alpha
    return out


def zeros_like(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


def mean_over_prompts(x: torch.Tensor, reference: Any) -> torch.Tensor:
    """Mean ablation value: the reference's mean over its leading prompt dim, per position."""
    ref = torch.as_tensor(reference).to(device=x.device, dtype=x.dtype)
    if ref.dim() == x.dim() + 1:
        ref = ref.mean(0)
    return torch.broadcast_to(ref, x.shape).clone()


def expand_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """KV heads repeated per query head: query head h uses KV head h // n_rep (HF repeat_kv)."""
    return x.repeat_interleave(n_rep, dim=-3) if n_rep > 1 else x


# Ops that edit a site's value; outside the steps they were recorded for they pass it through.
EDITS = (assign, assign_layer, setitem, scale_at, zeros_like, mean_over_prompts)
