"""Compile: recorded graph + model metadata → immutable :class:`~oculi_dsl.plan.Plan`.

Pure with respect to the model's weights: sites are resolved through the family table, the
graph is run once on ``meta`` tensors to check shapes, dtypes and indices (errors point at the
user's line) and to derive each saved value's dim labels, and every node is scheduled at the
earliest site in forward order where all its inputs exist. Only nodes that feed a save or an
edit are kept. The forward may stop right after the last site that is read, and it may start
late: when every row's input to layer s (``resid_pre``) is assigned outright and nothing
earlier is read, layers 0..s-1 are dead code and are not run (:mod:`._late_start`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from . import _ops, dims
from ._late_start import start_layer, upstream
from .dims import Axis, Labels
from .errors import CompileError, OculiError
from .inputs import Batch, Segment, build_batch, pad_token_id
from .models import OculiModel
from .past import KEY_AXIS_SITES
from .plan import Order, Plan, Save, Step
from .proxy import Recorder, SiteKey
from .sites import SiteRef, layer_site, model_site

PRELUDE: Order = (-2, 0.0)


class _Site:
    """Where a site lives in this model and where it comes in the forward order."""

    def __init__(self, site: SiteRef, model: OculiModel):
        family, n_layers = model.family, model.info.n_layers
        self.site = site
        self.residual_delta = False
        if site.kind == "layer":
            spec = layer_site(family, site.name, site.layer)
            prefix = f"{family.layers}.{site.layer}"
            self.module = f"{prefix}.{spec.module}" if spec.module else prefix
            self.where, self.field, self.dims = spec.where, spec.field, spec.dims
            self.order: Order = (int(site.layer), float(spec.order))  # type: ignore[arg-type]
            self.residual_delta = spec.write == "residual_delta"
        elif site.kind == "model":
            spec = model_site(family, site.name)
            self.module, self.where, self.field, self.dims = spec.module, spec.where, spec.field, spec.dims
            self.order = {"embed": (-1, 0.0), "final_norm": (n_layers, 0.0)}.get(site.name, (n_layers, 1.0))
        else:
            self.module, self.field = site.name, None
            self.where = site.where  # type: ignore[assignment]
            self.dims = None  # type: ignore[assignment]
            self.order = _module_order(site.name, family.layers, n_layers, model)


def _module_order(path: str, layers: str, n_layers: int, model: OculiModel) -> Order:
    """Forward position of a raw module: inside layer l it runs before l's output hook."""
    if path.startswith(layers + "."):
        layer = int(path[len(layers) + 1:].split(".")[0])
        return (layer, 49.0)
    if path == "":
        return (n_layers, 1.0)
    names = [n for n, _ in model.hf.named_modules()]
    return (-1, 0.5) if names.index(path) < names.index(layers) else (n_layers, 0.5)


def compile_plan(recorder: Recorder, model: OculiModel,
                 invokes: Sequence[tuple[list[list[int]], list[str], bool]],
                 *, stop_early: bool = True, pasts: Sequence[Any] = ()) -> Plan:
    """Resolve, check and schedule a recording. Raises :class:`CompileError` on any problem."""
    info = model.info
    batch = build_batch(model.tokenizer, invokes, pad_token_id(model.tokenizer, model.hf.config),
                        pasts, (info.n_layers, info.n_kv_heads, info.d_head))
    sites = {key: _Site(key[1], model) for key in {*recorder.reads, *recorder.current}}
    if batch.past is not None:
        _check_no_key_axis(sites, batch.past.length)
    writes = {key: node for key, node in recorder.current.items() if node is not recorder.reads.get(key)}
    needed = _needed(recorder, writes)
    meta, labels = _check_and_label(recorder, model, batch, sites, needed)
    ready = _schedule(recorder, sites, needed)
    for key, node in writes.items():
        if ready[node] > sites[key].order:
            raise CompileError(
                f"The value assigned to {_where(key)} (at {node.meta.get('source')}) depends on a "
                f"site that comes later in the forward pass, so it does not exist yet when "
                f"{key[1].label} runs. Assign values computed from earlier layers (or the same "
                "layer of another invoke), or constants."
            )
    steps, stop = _steps(recorder, model, sites, writes, needed, ready, stop_early)
    prelude = tuple(n for n in recorder.graph.nodes if n in needed and ready[n] == PRELUDE)
    saves = tuple(
        Save(name, node, _invoke_of(node.args[0]), _named(node, labels.get(node), meta.get(node)),
             _site_labels(node.args[0]))
        for name, node in recorder.saves
    )
    release = _release_points(recorder.graph, needed, set(writes.values()), ready)
    start = start_layer(recorder, batch, {k: v.order for k, v in sites.items()}, writes) if stop_early else 0
    return Plan(recorder.graph, dict(recorder.constants), batch, steps, prelude, saves, stop, meta,
                release, start)


def _check_no_key_axis(sites: dict[SiteKey, _Site], length: int) -> None:
    """Keys and values at the attention function include the cached positions: refuse them."""
    keyed = sorted({key[1].label for key in sites if key[1].kind == "layer" and key[1].name in KEY_AXIS_SITES})
    if keyed:
        raise CompileError(
            f"{', '.join(keyed)} cannot be read or edited in a trace that resumes from past= (the "
            f"keys of positions 0..{length - 1} are the cached input, not computed here). Read "
            "them in a trace without past=; attn.q and attn.z (one row per new position) work.")


def _release_points(graph: torch.fx.Graph, needed: set[torch.fx.Node], keep: set[torch.fx.Node],
                    ready: dict[torch.fx.Node, Order]) -> dict[torch.fx.Node, tuple[torch.fx.Node, ...]]:
    """For each node, the inputs it is the last consumer of in execution order (the site it is
    scheduled at, then graph order); values assigned to sites are kept for their write."""
    position = {node: i for i, node in enumerate(graph.nodes)}
    last: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.nodes:
        if node in needed:
            for inp in node.all_input_nodes:
                when = (ready[node], position[node])
                if inp not in last or when > (ready[last[inp]], position[last[inp]]):
                    last[inp] = node
    out: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for inp, consumer in last.items():
        if inp not in keep and inp.op != "get_attr":
            out.setdefault(consumer, []).append(inp)
    return {k: tuple(v) for k, v in out.items()}


def _named(node: torch.fx.Node, labels: Labels | None, value: Any) -> Labels | None:
    """Labels of a save, with the names given by ``.save(dims=...)`` taking precedence."""
    names = node.meta.get("dims")
    if names is None:
        return labels
    if isinstance(value, torch.Tensor) and len(names) != value.dim():
        raise CompileError(
            f"save('{node.args[1]}', dims={names}) names {len(names)} dims but the value has "
            f"{value.dim()} (shape {tuple(value.shape)}) (at {node.meta.get('source')})."
        )
    out = []
    for i, name in enumerate(names):
        known = labels[i] if labels is not None and i < len(labels) else None
        if known is not None and known.name == name:
            out.append(known)
        elif name in ("layer", "head", "kv_head", "prompt", "step") and isinstance(value, torch.Tensor):
            out.append(Axis(name, range(value.shape[i])))
        else:
            out.append(Axis(name))
    return tuple(out)


def _where(key: SiteKey) -> str:
    return f"{key[1].label} of invoke {key[0]}"


def _needed(recorder: Recorder, writes: dict[SiteKey, torch.fx.Node]) -> set[torch.fx.Node]:
    """Nodes that feed a save or an edit; everything else is never run."""
    return upstream([node for _, node in recorder.saves] + list(writes.values()))


def _schedule(recorder: Recorder, sites: dict[SiteKey, _Site], needed: set[torch.fx.Node]) -> dict[torch.fx.Node, Order]:
    site_of = {node: key for key, node in recorder.reads.items()}
    ready: dict[torch.fx.Node, Order] = {}
    for node in recorder.graph.nodes:
        if node in site_of:
            ready[node] = sites[site_of[node]].order
        else:
            ready[node] = max((ready[i] for i in node.all_input_nodes), default=PRELUDE)
    return ready


def _steps(recorder: Recorder, model: OculiModel, sites: dict[SiteKey, _Site],
           writes: dict[SiteKey, torch.fx.Node], needed: set[torch.fx.Node],
           ready: dict[torch.fx.Node, Order], stop_early: bool) -> tuple[tuple[Step, ...], SiteRef | None]:
    by_site: dict[SiteRef, dict[str, list[Any]]] = defaultdict(lambda: {"reads": [], "writes": []})
    for key, node in recorder.reads.items():
        if node in needed:
            by_site[key[1]]["reads"].append((key[0], node))
    for key, node in writes.items():
        by_site[key[1]]["writes"].append((key[0], node))
    located = {key[1]: loc for key, loc in sites.items()}
    for site, entry in list(by_site.items()):
        if entry["writes"] and located[site].residual_delta:
            post = SiteRef.at_layer("resid_post", site.layer)  # type: ignore[arg-type]
            located.setdefault(post, _Site(post, model))
            by_site[post]["absorbs"] = True  # type: ignore[assignment]
    stop_site = _stop_site(by_site, located, model) if stop_early else None
    if stop_site is not None:
        by_site[stop_site]["stop"] = True  # type: ignore[assignment]
        located.setdefault(stop_site, _Site(stop_site, model))
    run_at: dict[Order, list[torch.fx.Node]] = defaultdict(list)
    for node in recorder.graph.nodes:
        if node in needed and node.target is not _ops.read_site and ready[node] != PRELUDE:
            run_at[ready[node]].append(node)
    steps = []
    for site, entry in by_site.items():
        loc = located[site]
        steps.append(Step(site, loc.module, loc.where, loc.field, loc.dims, loc.order,
                          reads=tuple(entry["reads"]), run=tuple(run_at.pop(loc.order, ())),
                          writes=tuple(entry["writes"]),
                          residual_delta=bool(entry["writes"]) and loc.residual_delta,
                          absorbs_delta=bool(entry.get("absorbs")), stop=bool(entry.get("stop"))))
    steps.sort(key=lambda s: s.order)
    return tuple(steps), stop_site


def _stop_site(by_site: dict[SiteRef, Any], located: dict[SiteRef, _Site], model: OculiModel) -> SiteRef | None:
    read_orders = [(located[s].order, s) for s, e in by_site.items() if e["reads"]]
    if not read_orders:
        return None
    order, site = max(read_orders, key=lambda x: x[0])
    if site.kind == "model" and site.name == "logits" or order[0] < 0:
        return None  # the forward ends there anyway
    if site.kind == "module":
        return SiteRef.at_layer("resid_post", order[0])
    return site


def _site_reads(node: Any) -> list[torch.fx.Node]:
    """The site reads a value was computed from."""
    reads, todo, seen = [], [node], set()
    while todo:
        n = todo.pop()
        if isinstance(n, torch.fx.Node) and n not in seen:
            seen.add(n)
            if "site" in n.meta:
                reads.append(n)
            todo.extend(n.all_input_nodes)
    return reads


def _invoke_of(node: Any) -> int | None:
    invokes = {n.meta["invoke"] for n in _site_reads(node)}
    return invokes.pop() if len(invokes) == 1 else None


def _site_labels(node: Any) -> tuple[str, ...]:
    return tuple(sorted({n.meta["site_label"] for n in _site_reads(node)}))


# -- meta run: shapes, dtypes, indices, labels --------------------------------------------------

def _site_meta(site: _Site, seg: Segment, model: OculiModel,
               first: int = 0) -> tuple[torch.Tensor | None, Labels | None]:
    """Meta value and labels of a site; token axes cover positions ``first``.. (past= resumes)."""
    if site.dims is None:
        return None, None
    new = seg.length - first
    sizes = dict(model.info.dim_sizes(), token=new, query=new, key=seg.length)
    prefix: Labels = () if seg.single else (Axis("prompt", range(seg.stop - seg.start)),)
    shape = [len(prefix[0].index or ()) for _ in prefix] + [sizes[d] for d in site.dims]  # type: ignore[arg-type]
    value = torch.empty(shape, dtype=model.info.dtype, device="meta")
    return value, dims.site_labels(site.dims, sizes, prefix, {"token": first, "query": first})


def _check_and_label(recorder: Recorder, model: OculiModel, batch: Batch, sites: dict[SiteKey, _Site],
                     needed: set[torch.fx.Node]) -> tuple[dict[torch.fx.Node, Any], dict[torch.fx.Node, Labels | None]]:
    site_of = {node: key for key, node in recorder.reads.items()}
    meta: dict[torch.fx.Node, Any] = {}
    labels: dict[torch.fx.Node, Labels | None] = {}
    constants = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in recorder.constants.items()}
    param_labels = _parameter_labels(recorder, model)
    for node in recorder.graph.nodes:
        if node not in needed:
            continue
        if node in site_of:
            key = site_of[node]
            meta[node], labels[node] = _site_meta(sites[key], batch.segments[key[0]], model, batch.first)
            continue
        if node.op == "get_attr":
            meta[node], labels[node] = constants[node.target], param_labels.get(node.target)
            continue
        if any(meta.get(i) is None for i in node.all_input_nodes) and node.all_input_nodes:
            meta[node], labels[node] = None, None  # shape unknown (raw module): checked at run time
            continue
        meta[node] = _meta_eval(node, meta, constants)
        labels[node] = _labels(node, meta, labels)
    return meta, labels


def _parameter_labels(recorder: Recorder, model: OculiModel) -> dict[str, Labels]:
    if not recorder.constants:
        return {}
    known = {}
    for getter in ("get_output_embeddings", "get_input_embeddings"):
        module = getattr(model.hf, getter, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            known[id(module.weight)] = (Axis("vocab", range(model.info.vocab)), Axis("d_model"))
    return {name: known[id(t)] for name, t in recorder.constants.items() if id(t) in known}


def _meta_eval(node: torch.fx.Node, meta: dict[torch.fx.Node, Any], constants: dict[str, Any]) -> Any:
    if node.target in (_ops.assign, _ops.assign_layer):
        _check_assign(node, meta)
    try:
        return _ops.evaluate(node, meta.__getitem__, constants)
    except OculiError:
        raise
    except Exception as err:  # noqa: BLE001 - every failure becomes a located CompileError
        if "meta" in str(err).lower() and not isinstance(err, (IndexError, TypeError)):
            return None  # op has no meta kernel (e.g. .item()): checked at run time instead
        what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
        raise CompileError(
            f"Recorded operation '{what}' cannot run (at {node.meta.get('source')}): {err}. "
            f"Input shapes: {_shapes(node, meta)}."
        ) from err


def _shapes(node: torch.fx.Node, meta: dict[torch.fx.Node, Any]) -> str:
    shapes = [tuple(meta[i].shape) if isinstance(meta.get(i), torch.Tensor) else "?" for i in node.all_input_nodes]
    return ", ".join(map(str, shapes)) or "none"


def _check_assign(node: torch.fx.Node, meta: dict[torch.fx.Node, Any]) -> None:
    old_node, new = node.args[0], node.args[1]
    old = meta[old_node]  # type: ignore[index]
    value = meta.get(new) if isinstance(new, torch.fx.Node) else new
    if not isinstance(value, torch.Tensor):
        if isinstance(value, complex):
            raise CompileError(f"Cannot assign complex {value!r} to {old_node.meta.get('site_label')}.")  # type: ignore[union-attr]
        return
    if node.target is _ops.assign_layer and value.dim() == old.dim() + 1 and value.shape[0] == node.args[3]:
        value = value[0]
    label = old_node.meta.get("site_label", old_node.name)  # type: ignore[union-attr]
    invoke = old_node.meta.get("invoke")  # type: ignore[union-attr]
    if value.is_complex() and not old.is_complex():
        raise CompileError(f"Cannot assign a complex value to {label} ({old.dtype}); take .real first.")
    try:
        torch.broadcast_shapes(value.shape, old.shape)
        ok = torch.broadcast_shapes(value.shape, old.shape) == old.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise CompileError(
            f"Cannot assign a value of shape {tuple(value.shape)} to {label} of invoke {invoke}, "
            f"which has shape {tuple(old.shape)} (at {node.meta.get('source')}). Shapes must be "
            "equal or broadcast to the site's shape; a value from another invoke must come from "
            "prompts with the same number of tokens (or index matching positions first)."
        )


def _labels(node: torch.fx.Node, meta: dict[torch.fx.Node, Any], labels: dict[torch.fx.Node, Any]) -> Labels | None:
    ins = [labels.get(a) if isinstance(a, torch.fx.Node) else None for a in node.args]
    if node.target is _ops.stack_layers:
        first = ins[0]
        layers = node.meta["layers"]
        return (Axis("layer", layers),) + first if first is not None else None
    if node.target is _ops.expand_kv and ins[0] is not None:
        n_heads = meta[node].shape[-3]
        return tuple(Axis("head", range(n_heads)) if a.name == "kv_head" else a for a in ins[0])
    if node.target is _ops.select_layer:
        return ins[0][1:] if ins[0] is not None else None
    if node.target in (_ops.assign, _ops.assign_layer, _ops.setitem, _ops.save):
        return ins[0]
    args = torch.fx.node.map_arg(node.args, lambda n: meta[n])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: meta[n])
    fn = node.target if node.op != "call_method" else node.target
    return dims.propagate(fn, args, kwargs, ins, meta[node])
