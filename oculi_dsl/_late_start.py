"""Late start: which leading layers of the forward are dead code.

When every invoke assigns its whole input of layer s (``x.layers[s].resid_pre = value``) and
nothing the saves and later edits need is read before it, layers 0..s-1 cannot affect any
result, and the executor does not run them (``Plan.start_layer``). Pure graph analysis, like
the compiler that calls it.
"""

from __future__ import annotations

from collections import defaultdict

import torch.fx

from . import _ops
from .inputs import Batch
from .plan import Order
from .proxy import Recorder, SiteKey


def upstream(roots: list[torch.fx.Node]) -> set[torch.fx.Node]:
    """Every node ``roots`` are computed from, themselves included."""
    todo, seen = list(roots), set()
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(node.all_input_nodes)
    return seen


def start_layer(recorder: Recorder, batch: Batch, orders: dict[SiteKey, Order],
                 writes: dict[SiteKey, torch.fx.Node]) -> int:
    """The first layer the forward must run (0: all of them).

    Layers before s are dead when (1) every invoke assigns its whole ``resid_pre`` of layer s
    (``x.layers[s].resid_pre = value``; later edits of it are fine), (2) that site's arriving
    value is used by nothing but those assignments, which only take its shape, (3) nothing the
    saves and the edits from s on depend on is read earlier in the forward (edits before s are
    dead too: their effect is overwritten), and (4) no row is padded (padding positions are
    not part of any invoke's view, so no assignment covers them).
    """
    if batch.attention_mask is not None:
        return 0
    n_invokes = len(batch.segments)
    by_layer: dict[int, dict[int, SiteKey]] = defaultdict(dict)
    for key in writes:
        site = key[1]
        if site.kind == "layer" and site.name == "resid_pre" and site.layer:
            by_layer[int(site.layer)][key[0]] = key  # type: ignore[arg-type]
    for layer in sorted((s for s, ks in by_layer.items() if len(ks) == n_invokes), reverse=True):
        keys = by_layer[layer].values()
        live = upstream([node for _, node in recorder.saves]
                         + [w for k, w in writes.items() if orders[k] >= (layer, 0.0)])
        arriving = {recorder.reads[k] for k in keys if k in recorder.reads}
        if all(_assigned_outright(writes[k], recorder.reads.get(k)) for k in keys) \
                and all(_shape_only_uses(r, live) for r in arriving) \
                and all(orders[k] >= (layer, 0.0) for k, node in recorder.reads.items()
                        if node in live and node not in arriving):
            return layer
    return 0


def _shape_only_uses(read: torch.fx.Node, needed: set[torch.fx.Node]) -> bool:
    """True if every needed user of ``read`` is an assignment that replaces it (shape only)."""
    return all(u.target in (_ops.assign, _ops.assign_layer) and u.args[0] is read
               and read not in u.args[1:] for u in read.users if u in needed)


def _assigned_outright(written: torch.fx.Node, read: torch.fx.Node | None) -> bool:
    """The written value descends from an assignment replacing ``read`` (not from ``read`` itself)."""
    return any(n.target in (_ops.assign, _ops.assign_layer) and n.args[0] is read
               for n in upstream([written]))
