"""Dimension names and how they follow a value through recorded operations.

Every site has fixed, short dim names (``layer``, ``token``, ``d_model`` …, DESIGN §3). While the
compiler runs the graph on meta tensors, each node's :data:`Labels` are derived from its
inputs' labels: indexing drops or narrows dims (keeping which positions remain, for coords),
elementwise ops keep them, reductions remove the reduced dims, ``topk`` introduces ``k``. When
no rule applies the labels are unknown and results fall back to ``<var>_dim<i>``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

DIMS = ("prompt", "step", "layer", "head", "kv_head", "token", "query", "key", "d_model",
        "d_head", "neuron", "vocab", "component", "k")
TOKEN_LIKE = ("token", "query", "key")


@dataclass(frozen=True, eq=False)
class Axis:
    """One labeled dim: its name and, when known, which original positions it holds."""

    name: str
    index: Sequence[int] | None = None  # a range while it is every position (cheap for vocab)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Axis) or other.name != self.name:
            return False
        if self.index is None or other.index is None:
            return self.index is other.index
        return len(self.index) == len(other.index) and list(self.index) == list(other.index)

    def __hash__(self) -> int:
        return hash((self.name, None if self.index is None else len(self.index)))


Labels = tuple[Axis, ...]

_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "norm", "std", "var", "prod",
               "logsumexp", "argmax", "argmin", "all", "any", "nansum", "nanmean", "median"}
_SAME_SHAPE_FIRST = {"softmax", "log_softmax", "cumsum", "cumprod", "to", "float", "double",
                     "half", "bfloat16", "clone", "detach", "contiguous", "cpu", "cuda", "abs",
                     "exp", "log", "sqrt", "rsqrt", "pow", "relu", "sigmoid", "tanh", "neg",
                     "type_as", "masked_fill", "clamp", "round", "sign", "square", "where"}


def site_labels(dims: Sequence[str], sizes: dict[str, int], prefix: Labels = (),
                starts: dict[str, int] | None = None) -> Labels:
    """Labels of a site value: ``prefix`` (prompt/layer) + the site's dims with positions
    (``starts``: the first position of an axis, when a forward resumes after cached ones)."""
    starts = starts or {}
    return prefix + tuple(
        Axis(d, range(starts.get(d, 0), starts.get(d, 0) + sizes[d]) if d in sizes else None) for d in dims)


def propagate(fn: Any, args: Sequence[Any], kwargs: dict[str, Any], arg_labels: Sequence[Any],
              out: Any) -> Labels | None:
    """Labels of ``fn(*args)`` from its inputs' labels; ``out`` is the meta result."""
    name = fn if isinstance(fn, str) else getattr(fn, "__name__", "")
    first = arg_labels[0] if arg_labels else None
    if isinstance(args[0] if args else None, tuple) and (
            (fn is getattr and args[1] in ("values", "indices")) or fn is operator.getitem):
        return first  # one field of (values, indices): the pair carries the labels
    if isinstance(out, tuple) and out and all(isinstance(o, torch.Tensor) for o in out):
        out = out[0]  # max/min/topk/sort with dim: label the pair by its values
    if not isinstance(out, torch.Tensor):
        return None
    if fn is getattr and len(args) == 2 and args[1] in ("T", "mT"):
        name = "t"
    if fn is getattr and len(args) == 2 and args[1] in ("real", "imag", "data"):
        return first
    if fn is operator.getitem and first is not None:
        return _index(first, args[1], out.dim())
    if name == "stack_layers":
        return None  # set by the compiler, which knows the layers
    if name in _REDUCTIONS and first is not None:
        return _reduce(first, args, kwargs, out)
    if name == "topk" and first is not None:
        dim = _dim_arg(args, kwargs, pos=2, default=-1)
        return _replace_axis(first, dim, Axis("k"))
    if name in ("transpose", "swapaxes") and first is not None and len(args) >= 3:
        a, b = (int(args[1]) % len(first), int(args[2]) % len(first))
        axes = list(first)
        axes[a], axes[b] = axes[b], axes[a]
        return _check(tuple(axes), out)
    if name in ("t", "T") and first is not None and len(first) == 2:
        return (first[1], first[0])
    if name in ("unsqueeze",) and first is not None:
        d = int(args[1]) % (len(first) + 1)
        return _check(first[:d] + (Axis("new"),) + first[d:], out)
    if name == "squeeze" and first is not None and len(args) >= 2 and isinstance(args[1], int):
        d = int(args[1]) % len(first)
        return _check(first[:d] + first[d + 1:], out) if out.dim() == len(first) - 1 else first
    if name == "linear" and first is not None and len(arg_labels) > 1 and arg_labels[1]:
        return _check(first[:-1] + (arg_labels[1][0],), out)
    if name in ("matmul", "matmul_") or fn is operator.matmul:
        other = arg_labels[1] if len(arg_labels) > 1 else None
        if first is not None and other is not None and len(other) == 2:
            return _check(first[:-1] + (other[-1],), out)
        return None
    # Elementwise and shape-preserving ops: take the labels of an input of the output's shape.
    for labels, arg in zip(arg_labels, args, strict=False):
        if labels is not None and isinstance(arg, torch.Tensor) and arg.shape == out.shape:
            return labels
    if name in _SAME_SHAPE_FIRST and first is not None and len(first) == out.dim():
        return first
    return None


def _check(labels: Labels, out: torch.Tensor) -> Labels | None:
    return labels if len(labels) == out.dim() else None


def _dim_arg(args: Sequence[Any], kwargs: dict[str, Any], pos: int, default: Any) -> Any:
    if "dim" in kwargs:
        return kwargs["dim"]
    return args[pos] if len(args) > pos else default


def _replace_axis(labels: Labels, dim: int, axis: Axis) -> Labels:
    d = dim % len(labels)
    return labels[:d] + (axis,) + labels[d + 1:]


def _reduce(labels: Labels, args: Sequence[Any], kwargs: dict[str, Any], out: torch.Tensor) -> Labels | None:
    dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], bool) else None)
    if dim is None:
        return () if out.dim() == 0 else None
    dims = {int(d) % len(labels) for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
    keep = kwargs.get("keepdim", False)
    new = tuple(Axis(a.name, (0,) if a.index else None) if keep and i in dims else a
                for i, a in enumerate(labels) if keep or i not in dims)
    return _check(new, out)


def _index(labels: Labels, index: Any, out_dim: int) -> Labels | None:
    items = list(index) if isinstance(index, tuple) else [index]
    if any(i is Ellipsis for i in items):
        at = items.index(Ellipsis)
        consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:at] + [slice(None)] * (len(labels) - consumed) + items[at + 1:]
    result: list[Axis] = []
    pos = 0
    for item in items:
        if item is None:
            result.append(Axis("new"))
            continue
        if pos >= len(labels):
            return None
        axis = labels[pos]
        pos += 1
        if isinstance(item, int) and not isinstance(item, bool):
            continue
        if isinstance(item, slice):
            if all(isinstance(v, (int, type(None))) for v in (item.start, item.stop, item.step)):
                idx = axis.index[item] if axis.index is not None else None
                result.append(Axis(axis.name, idx))
                continue
            return None
        if isinstance(item, (list, tuple)) and all(isinstance(v, int) for v in item):
            idx = tuple(axis.index[v] for v in item) if axis.index is not None else None
            result.append(Axis(axis.name, idx))
            continue
        return None
    result.extend(labels[pos:])
    return tuple(result) if len(result) == out_dim else None
