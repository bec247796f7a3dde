"""Execute a :class:`~oculi_dsl.plan.Plan`: hooks in, ONE forward pass, hooks out.

Each plan step becomes one forward (pre-)hook on its module. When the hook fires, the arriving
value is cut into each invoke's view (its rows, its own token length), the nodes scheduled there
run, edited values are written back into the batch tensor, and the forward continues with it.
After the last needed site the forward is stopped; when the plan starts at layer s (every row's
input to s is assigned), layers 0..s-1 are stood in for by pass-throughs for this call. Every
hook and stand-in is removed in ``finally``, on success and on error, so the model is left
exactly as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from typing import Any

import torch
import torch.fx

from . import _ops, attention, past
from .dims import TOKEN_LIKE
from .errors import ExecutionError, OculiError
from .inputs import Segment
from .models import OculiModel
from .plan import Plan, Step


class _StopForward(Exception):
    """Raised by the last needed hook to end the forward pass early."""


class _Missing(Exception):
    """A node's input is not computed yet (it is retried at the next site)."""


class _Run:
    """Values of one execution: graph node → value, deltas carried to layer outputs, saves."""

    def __init__(self, plan: Plan, generating: bool = False):
        self.plan = plan
        self.env: dict[torch.fx.Node, Any] = {}
        self.saved: dict[str, Any] = {}
        self.deltas: dict[int, torch.Tensor] = {}
        self.deferred: list[torch.fx.Node] = []
        self.length = plan.batch.length  # prompt batch length (left padding included)
        self.total = self.length  # sequence length of the current forward, cache included
        self.generating = generating
        self.step = 0
        self._prelude: dict[torch.fx.Node, Any] = {}

    def start_prelude(self) -> None:
        self.run_nodes(self.plan.prelude)
        self._prelude = dict(self.env)

    def start_step(self, step: int, total: int) -> None:
        """A new forward call of ``generate``: fresh values, same prelude."""
        self.step, self.total = step, total
        self.env, self.deferred, self.deltas = dict(self._prelude), [], {}

    def value_of(self, node: torch.fx.Node) -> Any:
        try:
            return self.env[node]
        except KeyError:
            raise _Missing(node.name) from None

    def run_nodes(self, nodes: tuple[torch.fx.Node, ...] | list[torch.fx.Node]) -> None:
        pending = self.deferred + list(nodes)
        self.deferred = []
        for node in pending:
            steps = node.meta.get("steps")
            if steps is not None and self.step not in steps:
                if node.target is _ops.save:
                    continue
                if node.target in _ops.EDITS:  # outside its steps an edit lets the value through
                    self.env[node] = self.env[node.args[0]]  # type: ignore[index]
                    continue
            try:
                value = _ops.evaluate(node, self.value_of, self.plan.constants)
            except _Missing:
                self.deferred.append(node)
                continue
            except OculiError:
                raise
            except Exception as err:
                raise ExecutionError(
                    f"Recorded operation '{node.name}' failed while the forward pass ran "
                    f"(recorded at {node.meta.get('source')}): {err}"
                ) from err
            self.env[node] = value
            for done in self.plan.release.get(node, ()):
                self.env.pop(done, None)  # keeps peak memory at what is still needed
            if node.target is _ops.save:
                if self.generating:
                    self.saved.setdefault(str(node.args[1]), []).append((self.step, value))
                else:
                    self.saved[node.args[1]] = value  # type: ignore[index]

    def view_index(self, step: Step, seg: Segment, full: torch.Tensor) -> tuple[Any, ...] | None:
        """Index of one invoke's part of a batch tensor (None: the whole tensor)."""
        if step.dims is None:
            return None
        pad = self.length - seg.length
        idx: list[Any] = [seg.rows]
        for d, size in zip(step.dims, full.shape[1:], strict=False):
            # a token axis spanning the whole sequence holds this invoke's left padding;
            # at a cached generation step the query/token axes hold only the new token
            idx.append(slice(pad, None) if d in TOKEN_LIKE and pad and size == self.total else slice(None))
        return tuple(idx)

    def fire(self, step: Step, full: torch.Tensor) -> torch.Tensor:
        segments = self.plan.batch.segments
        if step.absorbs_delta and step.site.layer in self.deltas:
            # an edit of resid_mid reaches the layer output before anything reads it there
            full = full + self.deltas.pop(step.site.layer)  # type: ignore[arg-type]
        for invoke, node in step.reads:
            idx = self.view_index(step, segments[invoke], full)
            self.env[node] = full if idx is None else full[idx]
        self.run_nodes(step.run)
        new = full
        for invoke, node in step.writes:
            if node not in self.env:
                raise ExecutionError(f"The value assigned to {step.site.label} of invoke {invoke} "
                                     "was not computed before the site ran.")
            value = self.env[node]
            idx = self.view_index(step, segments[invoke], full)
            if idx is None or value.numel() == full.numel():
                new = value.reshape(full.shape)
            else:
                if new is full:
                    new = full.clone()
                new[idx] = value
        if step.residual_delta:
            self.deltas[step.site.layer] = new - full  # type: ignore[index]
        if step.stop and not self.generating:
            raise _StopForward
        return new


class _Skipped(torch.nn.Module):
    """Stands in for a decoder layer whose output nothing uses: hands its input on unchanged.

    The next layer's input is replaced by an assignment anyway (see ``Plan.start_layer``);
    decoder layers of every supported family take the hidden states first and return them.
    """

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextmanager
def _skipping(model: OculiModel, n: int) -> Iterator[None]:
    """Layers 0..n-1 replaced by :class:`_Skipped` for the duration of one forward."""
    if n <= 0:
        yield
        return
    layers = model.hf.get_submodule(model.family.layers)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ExecutionError(f"{model.family.layers} of {model.info.model_id} is a "
                             f"{type(layers).__name__}, not the ModuleList of decoder layers.")
    originals = [layers[i] for i in range(n)]
    try:
        for i in range(n):
            layers[i] = _Skipped()
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def _output_value(output: Any, field: str | None) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if field is not None:
        return output[field]
    return output[0]


def _replace_output(output: Any, field: str | None, value: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return value
    if field is not None:
        output[field] = value
        return output
    return (value, *output[1:])


def _install(step: Step, module: torch.nn.Module, run: _Run, n_heads: int) -> Any:
    if step.where == "result":
        def on_projection(mod: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
            full = attention.result(args[0], mod.weight, n_heads, step.field or "linear")  # type: ignore[arg-type]
            new = run.fire(step, full)
            if new is full:
                return None
            bias = getattr(mod, "bias", None)
            return new.sum(-2) + bias if bias is not None else new.sum(-2)

        return module.register_forward_hook(on_projection)
    if step.where == "output":
        def on_output(mod: torch.nn.Module, args: Any, output: Any) -> Any:
            value = _output_value(output, step.field)
            new = run.fire(step, value)
            return None if new is value else _replace_output(output, step.field, new)

        return module.register_forward_hook(on_output)

    def on_input(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            new = run.fire(step, args[0])
            return None if new is args[0] else ((new, *args[1:]), kwargs)
        name = "hidden_states" if "hidden_states" in kwargs else next(
            k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
        new = run.fire(step, kwargs[name])
        return None if new is kwargs[name] else (args, {**kwargs, name: new})

    return module.register_forward_pre_hook(on_input, with_kwargs=True)


def _sequence_length(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Length of the whole sequence a forward call sees (cached tokens included)."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return int(mask.shape[-1])
    ids = kwargs.get("input_ids", args[0] if args else None)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    return int(ids.shape[-1]) + int(past)  # type: ignore[union-attr]


def execute(plan: Plan, model: OculiModel, *, grad: bool = False,
            generate: dict[str, Any] | None = None) -> tuple[dict[str, Any], Any]:
    """Run ``plan`` in one forward pass of ``model`` (or one ``generate`` call).

    Returns the saved values by name (for generation: a list of ``(step, value)`` per name)
    and the output of ``generate`` (None for a trace).
    """
    run = _Run(plan, generating=generate is not None)
    handles = []
    routes: dict[torch.nn.Module, dict[str, Step]] = {}
    output = None
    try:
        for step in plan.steps:
            module = model.hf.get_submodule(step.module)
            if step.where == "attention":
                routes.setdefault(module, {})[step.field] = step  # type: ignore[index]
            else:
                handles.append(_install(step, module, run, model.info.n_heads))
        if generate is not None:
            calls = iter(range(1 << 30))

            def next_step(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                run.start_step(next(calls), _sequence_length(args, kwargs))

            handles.insert(0, model.hf.register_forward_pre_hook(next_step, with_kwargs=True, prepend=True))
        router = attention.AttentionRouter(model.hf, routes, run.fire) if routes else nullcontext()
        with torch.set_grad_enabled(grad), router:
            run.start_prelude()
            if generate is not None:
                output = model.hf.generate(**plan.batch.generate_kwargs(model.device), **generate)  # type: ignore[operator]
            else:
                kwargs = plan.batch.model_kwargs(model.device)
                if plan.batch.past is not None:
                    name, cache = past.model_cache(model, plan.batch.past, model.device, model.info.dtype)
                    kwargs[name] = cache
                with suppress(_StopForward), _skipping(model, plan.start_layer):
                    model.hf(**kwargs, use_cache=False)
    except OculiError:
        raise
    except Exception as err:
        raise ExecutionError(f"The forward pass of {model.info.model_id} failed: {type(err).__name__}: {err}") from err
    finally:
        for handle in handles:
            handle.remove()
    missing = [s.name for s in plan.saves if s.name not in run.saved and not s.node.meta.get("steps")]
    if missing:
        raise ExecutionError(
            f"The forward pass ended before these saved values were computed: {', '.join(missing)}. "
            "Their sites did not run (does the model skip them?)."
        )
    return run.saved, output
