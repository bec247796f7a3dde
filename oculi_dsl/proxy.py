"""Recording: ``torch.fx`` proxies that turn every operation inside a trace into graph nodes.

:class:`Recorder` is a ``torch.fx`` tracer whose graph is the intervention program: site reads,
torch functions, tensor methods, operators, indexing, slice assignment and saves. Nothing is
executed. :class:`OculiProxy` adds what researchers need on top of ``torch.fx.Proxy``:
``.save()``, slice assignment, and errors (instead of guesses) for Python control flow.
"""

from __future__ import annotations

import operator
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
from torch.fx.proxy import TracerBase

from . import _ops, _verbs
from .errors import RecordError
from .sites import SiteRef

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_SKIP_DIRS = (_PACKAGE_DIR, os.path.dirname(torch.__file__))

SiteKey = tuple[int, SiteRef]


def _user_source() -> str:
    """``file:line`` of the first frame outside oculi-dsl and torch (the user's line)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP_DIRS):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return "<unknown>"
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


@dataclass
class SiteBinding:
    """Which sites a proxy's value came from, so that editing it writes the sites back."""

    keys: tuple[SiteKey, ...]
    stacked: bool
    index: Any = None  # part of the site this proxy views (one head of attn.z)

    @property
    def site(self) -> str:
        return self.keys[0][1].name


class OculiProxy(torch.fx.Proxy):
    """A recorded value inside a trace. Use it like a tensor; nothing runs until the block exits."""

    tracer: Recorder

    def __init__(self, node: torch.fx.Node, tracer: Recorder, binding: SiteBinding | None = None):
        super().__init__(node, tracer)
        self._binding = binding

    # -- verbs ---------------------------------------------------------------------------
    def save(self, name: str | None = None, *, dims: tuple[str, ...] | None = None) -> OculiProxy:
        """Keep this value as read; it becomes a variable of ``t.result`` (named ``name``).

        ``dims`` names the saved value's dims where they cannot be derived from the recorded
        operations (e.g. after ``diagonal``): ``x.save("prev", dims=("layer", "head"))``.
        """
        self.tracer.add_save(self, name, dims)
        return self

    @property
    def value(self) -> Any:
        """The saved value (a tensor) once the trace has run; only for saved proxies."""
        return self.tracer.saved_value(self)

    def scale(self, alpha: float, *, head: int | None = None, kv_head: int | None = None) -> None:
        """Multiply one head's queries (``attn.q``, ``head=``) or keys (``attn.k``, ``kv_head=``).

        Scaling q_h by alpha multiplies head h's pre-softmax logits by alpha (alpha > 1
        sharpens, alpha < 1 flattens). Scaling a KV head changes every query head sharing it.
        """
        _verbs.scale(self, alpha, head=head, kv_head=kv_head)

    def ablate(self, kind: str = "zero", reference: Any = None) -> None:
        """Replace this head's z (``attn.heads[h]``) with zeros, a mean, or given values."""
        _verbs.ablate(self, kind, reference)

    def expanded(self) -> OculiProxy:
        """``attn.k`` / ``attn.v`` repeated per query head (the model's own GQA grouping)."""
        return _verbs.expanded(self)

    def __setitem__(self, index: Any, value: Any) -> None:
        self.tracer.check_open("slice assignment")
        new = self.tracer.create_proxy("call_function", _ops.setitem, (self, index, value), {})
        binding = self._binding
        if binding is not None and binding.stacked:
            # edit each layer from its own value: the stack exists only after the last layer
            self.tracer.edit_each(binding, lambda part, i: _setitem_layer(part, i, index, value, binding))
        elif binding is not None:
            self.tracer.write_back(binding, new.node)
        self.node = new.node

    # -- Python control flow is refused, never guessed ------------------------------------
    def __bool__(self) -> bool:
        raise RecordError(
            f"Cannot use {self._describe()} as a Python bool (`if`, `while`, `and`, `assert`) "
            "inside a trace: its value does not exist yet. Record the choice instead, e.g. "
            "`torch.where(cond, a, b)`, or save the value and decide after the block."
        )

    def __len__(self) -> int:
        raise RecordError(
            f"len() of {self._describe()} is not known while recording. Use `.shape[i]` "
            "(recorded) or the model's sizes (`model.info`), e.g. `model.info.n_layers`."
        )

    def __iter__(self) -> Iterator[Any]:
        raise RecordError(
            f"Cannot iterate over {self._describe()} inside a trace. Index it explicitly "
            "(`x[0]`, `x[:, 3]`) or use a torch op such as `x.unbind(0)` on a saved value."
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_binding":
            raise AttributeError(name)
        return _Attribute(self, name)

    def __repr__(self) -> str:
        return f"OculiProxy({self._describe()})"

    def _describe(self) -> str:
        site = self.node.meta.get("site_label")
        return f"proxy '{self.node.name}'" + (f" ({site})" if site else "")


class _Attribute(OculiProxy):
    """``proxy.name``: a method about to be called (``x.softmax(-1)``) or an attribute value
    (``x.shape``, ``topk(...).values``); the getattr node is created only when used as a value."""

    def __init__(self, root: OculiProxy, attr: str):
        object.__setattr__(self, "root", root)
        object.__setattr__(self, "attr", attr)
        object.__setattr__(self, "tracer", root.tracer)
        object.__setattr__(self, "_binding", None)
        object.__setattr__(self, "_node", None)

    @property  # type: ignore[override]
    def node(self) -> torch.fx.Node:
        if self._node is None:
            proxy = self.tracer.create_proxy("call_function", getattr, (self.root, self.attr), {})
            object.__setattr__(self, "_node", proxy.node)
        return self._node  # type: ignore[return-value]

    @node.setter
    def node(self, value: torch.fx.Node) -> None:
        object.__setattr__(self, "_node", value)

    def __call__(self, *args: Any, **kwargs: Any) -> OculiProxy:
        return self.tracer.create_proxy("call_method", self.attr, (self.root, *args), kwargs)  # type: ignore[return-value]


class Recorder(TracerBase):
    """The ``torch.fx`` tracer of one trace: builds the graph, tracks sites, edits and saves."""

    def __init__(self) -> None:
        self.graph = torch.fx.Graph()
        self.constants: dict[str, torch.Tensor] = {}
        self.reads: dict[SiteKey, torch.fx.Node] = {}
        self.current: dict[SiteKey, torch.fx.Node] = {}
        self.saves: list[tuple[str, torch.fx.Node]] = []
        self.closed = False
        self.step_filter: frozenset[int] | None = None
        self.info: Any = None  # ModelInfo of the traced model, for checks made while recording
        self.results: dict[str, Any] | None = None
        self._const_nodes: dict[int, torch.fx.Node] = {}  # id(tensor) → its get_attr node
        self._save_names: dict[torch.fx.Node, str] = {}

    # -- torch.fx hooks ---------------------------------------------------------------------
    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):  # type: ignore[override]
        self.check_open(f"'{target if isinstance(target, str) else getattr(target, '__name__', target)}'")
        _refuse_in_place(kind, target, kwargs)
        node = self.graph.create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["source"] = _user_source()
        if self.step_filter is not None:
            node.meta["steps"] = self.step_filter
        return node

    @contextmanager
    def only_steps(self, steps: frozenset[int]) -> Iterator[None]:
        """Edits and saves recorded inside apply only at these generation steps."""
        previous, self.step_filter = self.step_filter, steps
        try:
            yield
        finally:
            self.step_filter = previous

    def proxy(self, node: torch.fx.Node) -> OculiProxy:  # type: ignore[override]
        return OculiProxy(node, self)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, OculiProxy) and a.tracer is not self:
            raise RecordError(
                f"{a._describe()} belongs to another trace. Values flow between invokes of one "
                "trace, not between traces: save it and pass the saved tensor instead."
            )
        if isinstance(a, torch.Tensor) and not isinstance(a, torch.fx.Proxy):
            return self._constant(a)
        if isinstance(a, np.ndarray):
            return self._constant(torch.from_numpy(a))
        return super().create_arg(a)

    def _constant(self, tensor: torch.Tensor) -> torch.fx.Node:
        node = self._const_nodes.get(id(tensor))
        if node is None:
            name = f"_const{len(self.constants)}"
            self.constants[name] = tensor  # keeps the tensor alive, so its id stays unique
            node = self._const_nodes[id(tensor)] = self.graph.create_node("get_attr", name)
        return node

    def iter(self, obj: Any) -> Iterator[Any]:
        raise RecordError("Cannot iterate over a traced value; index it explicitly instead.")

    def to_bool(self, obj: Any) -> bool:
        raise RecordError("Cannot use a traced value as a Python bool; use torch.where instead.")

    def keys(self, obj: Any) -> Any:
        raise RecordError("Cannot unpack a traced value with ** inside a trace.")

    # -- sites --------------------------------------------------------------------------------
    def check_open(self, what: str) -> None:
        if self.closed:
            raise RecordError(
                f"This trace has finished, so {what} cannot be recorded and proxies have no "
                "value. Only saved values exist after the `with` block: call `.save()` on the "
                "proxy inside the block and read `t.result[...]` (or `proxy.value`) afterwards."
            )

    def read(self, key: SiteKey) -> OculiProxy:
        """A proxy for the current value of a site (its arriving value until it is edited)."""
        node = self.current.get(key)
        if node is None:
            invoke, site = key
            node = self.create_node("call_function", _ops.read_site, (site.label,), {},
                                    name=f"{site.var_name}_i{invoke}")
            node.meta.update(site=site, invoke=invoke, site_label=site.label)
            self.reads[key] = node
            self.current[key] = node
        return OculiProxy(node, self, SiteBinding((key,), stacked=False))

    def read_stacked(self, keys: tuple[SiteKey, ...]) -> OculiProxy:
        parts = [self.read(k) for k in keys]
        fill = {"attn.pattern": 0.0, "attn.scores": float("-inf")}.get(keys[0][1].name, float("nan"))
        stacked = self.create_proxy("call_function", _ops.stack_layers, tuple(parts), {"fill": fill})
        stacked.node.meta["layers"] = tuple(k[1].layer for k in keys)
        stacked.node.meta["site_label"] = f"layers[{keys[0][1].layer}..{keys[-1][1].layer}]." \
                                          f"{keys[0][1].name}"
        return OculiProxy(stacked.node, self, SiteBinding(keys, stacked=True))

    def assign(self, key: SiteKey, value: Any, layer_pos: tuple[int, int] | None = None) -> None:
        """Record ``site = value`` (a swap): downstream of this site, ``value`` flows on."""
        self.check_open("an assignment")
        old = self.read(key)
        if layer_pos is not None and layer_part(value, *layer_pos) is not value:
            value, layer_pos = layer_part(value, *layer_pos), None
        if layer_pos is None:
            new = self.create_proxy("call_function", _ops.assign, (old, value), {})
        else:
            new = self.create_proxy("call_function", _ops.assign_layer, (old, value, *layer_pos), {})
        self.current[key] = new.node

    def edit_each(self, binding: SiteBinding, make: Any) -> None:
        """Edit every layer of a binding: ``make(part, i)`` builds layer i's new part."""
        for i, key in enumerate(binding.keys):
            part: Any = self.read(key)
            if binding.index is not None:
                part = self.create_proxy("call_function", operator.getitem, (part, binding.index), {})
            new = make(part, i)
            if new is None:
                continue
            if binding.index is not None:
                new = self.create_proxy("call_function", _ops.setitem, (self.read(key), binding.index, new), {})
            self.current[key] = new.node

    def write_back(self, binding: SiteBinding, node: torch.fx.Node) -> None:
        """Make ``node`` the site's value from here on (per layer for a layer selection)."""
        for i, key in enumerate(binding.keys):
            part: Any = self.proxy(node)
            if binding.stacked:
                part = self.create_proxy("call_function", _ops.select_layer, (part, i), {})
            if binding.index is not None:
                part = self.create_proxy("call_function", _ops.setitem, (self.read(key), binding.index, part), {})
            self.current[key] = part.node

    # -- saves ----------------------------------------------------------------------------
    def add_save(self, proxy: OculiProxy, name: str | None, dims: tuple[str, ...] | None = None) -> None:
        self.check_open(".save()")
        if dims is not None and (isinstance(dims, str) or not all(isinstance(d, str) for d in dims)):
            raise RecordError(f"dims must be a tuple of dim names, e.g. ('layer', 'head'), got {dims!r}.")
        if name is None:
            name = _default_name(proxy.node)
        if any(n == name for n, _ in self.saves):
            raise RecordError(
                f"Two values are saved as '{name}'. Give each .save() its own name, "
                f"e.g. .save('{name}_2')."
            )
        node = self.create_node("call_function", _ops.save, (proxy.node, name), {}, name=f"save_{name}")
        if dims is not None:
            node.meta["dims"] = tuple(dims)
        self.saves.append((name, node))
        self._save_names[proxy.node] = name

    def saved_value(self, proxy: OculiProxy) -> Any:
        name = self._save_names.get(proxy.node)
        if name is None or self.results is None:
            raise RecordError(
                f"{proxy._describe()} has no value: only saved values exist after the trace. "
                "Call `.save()` on it inside the `with` block."
            )
        return self.results[name]


_OUT_OF_PLACE = {"zero_": "torch.zeros_like(x)", "fill_": "torch.full_like(x, value)",
                 "copy_": "assignment: `t.layers[i].mlp.out = value`", "normal_": "x + noise",
                 "uniform_": "x + noise", "set_": "assignment"}


def _refuse_in_place(kind: str, target: Any, kwargs: dict[str, Any]) -> None:
    """In-place ops would change the model's live tensor behind the recorded graph."""
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    in_place = name.endswith("_") and not name.startswith("_") or kwargs.get("inplace") is True \
        or "out" in kwargs
    if not in_place:
        return
    what = f"'.{name}()'" if kind == "call_method" else f"'{name}' with inplace=True/out=" \
        if not name.endswith("_") else f"'torch.{name}'"
    if name in _OUT_OF_PLACE:
        advice = f"use {_OUT_OF_PLACE[name]}"
    elif hasattr(torch.Tensor, name[:-1]) and name.endswith("_"):
        advice = f"use '.{name[:-1]}()' and assign the result (`t.layers[i].mlp.out = x.{name[:-1]}(...)`)"
    else:
        advice = "use the out-of-place form and assign the result"
    raise RecordError(
        f"In-place operation {what} is not allowed on a traced value: it would change the model's "
        f"own tensor. Instead {advice}, or use slice assignment (`x[4] = 0`)."
    )


def layer_part(value: Any, i: int, n: int) -> Any:
    """Layer i's part of a value that holds one entry per layer of an n-layer selection.

    A proxy read over the same number of layers gives that layer's own value (so nothing waits
    for the whole stack); anything else is returned unchanged (broadcast to every layer).
    """
    binding = getattr(value, "_binding", None) if isinstance(value, OculiProxy) else None
    if binding is None or not binding.stacked or len(binding.keys) != n:
        return value
    part = value.tracer.read(binding.keys[i])
    if binding.index is not None:
        return value.tracer.create_proxy("call_function", operator.getitem, (part, binding.index), {})
    return part


def _setitem_layer(part: OculiProxy, i: int, index: Any, value: Any, binding: SiteBinding) -> Any:
    """``stack[index] = value`` restricted to layer i; None when the index skips that layer."""
    items = index if isinstance(index, tuple) else (index,)
    n = len(binding.keys)
    if items and items[0] is Ellipsis:
        rest = items  # the ellipsis absorbs the layer dim: same index on each layer
    else:
        first, rest = items[0], items[1:]
        chosen = range(n)[first] if isinstance(first, slice) else None
        if isinstance(first, int) and not isinstance(first, bool):
            if first % n != i:
                return None
        elif chosen is None:
            raise RecordError(
                "Slice assignment on a layer selection needs a leading int, slice or `...` "
                f"(the layer dim), got {index!r}. Example: `t.layers[:].mlp.out[..., 4, :] = 0`."
            )
        elif i not in chosen:
            return None
    value = layer_part(value, i, n)
    return part.tracer.create_proxy("call_function", _ops.setitem, (part, rest if rest else slice(None), value), {})


def _default_name(node: torch.fx.Node) -> str:
    site = node.meta.get("site")
    if isinstance(site, SiteRef):
        return site.var_name
    if node.target is _ops.stack_layers and node.args:
        first = node.args[0]
        site = first.meta.get("site") if isinstance(first, torch.fx.Node) else None
        if isinstance(site, SiteRef):
            return site.name.replace(".", "_")
    return node.name
