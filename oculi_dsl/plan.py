"""The compiled, immutable execution plan of one trace.

A :class:`Plan` is what the compiler hands the executor: the batch, one :class:`Step` per hooked
site in forward order (which recorded values arrive there, which nodes can run there, which
edited values go back), the nodes that run before the forward starts, the saves with their
labels, where the forward may stop and the first layer it must run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from .dims import Labels
from .inputs import Batch
from .sites import SiteRef

Order = tuple[int, float]


@dataclass(frozen=True)
class Step:
    """Everything that happens at one site's hook."""

    site: SiteRef
    module: str
    where: str
    field: str | None
    dims: tuple[str, ...] | None
    order: Order
    reads: tuple[tuple[int, torch.fx.Node], ...] = ()
    run: tuple[torch.fx.Node, ...] = ()
    writes: tuple[tuple[int, torch.fx.Node], ...] = ()
    residual_delta: bool = False
    absorbs_delta: bool = False
    stop: bool = False


@dataclass(frozen=True)
class Save:
    """A saved value: its variable name, graph node, invoke and labels (None if unknown)."""

    name: str
    node: torch.fx.Node
    invoke: int | None
    labels: Labels | None
    sites: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """Immutable result of compilation; the executor only reads it."""

    graph: torch.fx.Graph
    constants: dict[str, torch.Tensor]
    batch: Batch
    steps: tuple[Step, ...]
    prelude: tuple[torch.fx.Node, ...]
    saves: tuple[Save, ...]
    stop_after: SiteRef | None
    meta: dict[torch.fx.Node, Any] = field(default_factory=dict, repr=False)
    # node → inputs whose last consumer it is: their values are dropped once it has run
    release: dict[torch.fx.Node, tuple[torch.fx.Node, ...]] = field(default_factory=dict, repr=False)
    # layers before this one are not run: every row's input to it is assigned (dead prefix)
    start_layer: int = 0


def format_graph(graph: torch.fx.Graph) -> str:
    """One readable line per recorded node: ``name = op(args)  # site / source``."""
    lines = []
    for node in graph.nodes:
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        if node.op == "get_attr":
            rhs = f"constant {target}"
        else:
            args = ", ".join([_fmt(a) for a in node.args] + [f"{k}={_fmt(v)}" for k, v in node.kwargs.items()])
            rhs = f".{target}({args})" if node.op == "call_method" else f"{target}({args})"
        site = node.meta.get("site_label")
        lines.append(f"%{node.name} = {rhs}" + (f"  # {site}" if site and target == "read_site" else ""))
    return "\n".join(lines)


def _fmt(a: Any) -> str:
    if isinstance(a, torch.fx.Node):
        return f"%{a.name}"
    if isinstance(a, (tuple, list)):
        inner = ", ".join(_fmt(x) for x in a)
        return f"({inner})" if isinstance(a, tuple) else f"[{inner}]"
    if isinstance(a, slice):
        parts = ["" if v is None else _fmt(v) for v in (a.start, a.stop)]
        return ":".join(parts) + (f":{_fmt(a.step)}" if a.step is not None else "")
    return repr(a)
