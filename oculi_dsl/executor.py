"""Execute a :class:`~oculi_dsl.plan.Plan`: hooks in, ONE forward pass, hooks out.

Each plan step becomes one forward (pre-)hook on its module. When the hook fires, the arriving
value is cut into each invoke's view (its rows, its own token length), the nodes scheduled there
run, edited values are written back into the batch tensor, and the forward continues with it.
After the last needed site the forward is stopped. Every hook is removed in ``finally``, on
success and on error, so the model is left exactly as it was.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.fx

from . import _ops, attention
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

    def __init__(self, plan: Plan):
        self.plan = plan
        self.env: dict[torch.fx.Node, Any] = {}
        self.saved: dict[str, Any] = {}
        self.deltas: dict[int, torch.Tensor] = {}
        self.deferred: list[torch.fx.Node] = []
        self.length = plan.batch.length

    def value_of(self, node: torch.fx.Node) -> Any:
        try:
            return self.env[node]
        except KeyError:
            raise _Missing(node.name) from None

    def run_nodes(self, nodes: tuple[torch.fx.Node, ...] | list[torch.fx.Node]) -> None:
        pending = self.deferred + list(nodes)
        self.deferred = []
        for node in pending:
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
            if node.target is _ops.save:
                self.saved[node.args[1]] = value  # type: ignore[index]

    def view_index(self, step: Step, seg: Segment, full: torch.Tensor) -> tuple[Any, ...] | None:
        """Index of one invoke's part of a batch tensor (None: the whole tensor)."""
        if step.dims is None:
            return None
        start = self.length - seg.length
        idx: list[Any] = [seg.rows]
        idx += [slice(start, None) if d in TOKEN_LIKE and start else slice(None) for d in step.dims]
        return tuple(idx)

    def fire(self, step: Step, full: torch.Tensor) -> torch.Tensor:
        segments = self.plan.batch.segments
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
        if step.absorbs_delta and step.site.layer in self.deltas:
            new = new + self.deltas.pop(step.site.layer)  # type: ignore[arg-type]
        if step.stop:
            raise _StopForward
        return new


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
            full = attention.result(args[0], mod.weight, n_heads, step.field or "linear")
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


def execute(plan: Plan, model: OculiModel, *, grad: bool = False) -> dict[str, Any]:
    """Run ``plan`` in one forward pass of ``model``; returns the saved values by name."""
    run = _Run(plan)
    handles = []
    routes: dict[torch.nn.Module, dict[str, Step]] = {}
    try:
        for step in plan.steps:
            module = model.hf.get_submodule(step.module)
            if step.where == "attention":
                routes.setdefault(module, {})[step.field] = step  # type: ignore[index]
            else:
                handles.append(_install(step, module, run, model.info.n_heads))
        router = attention.AttentionRouter(model.hf, routes, run.fire) if routes else nullcontext()
        with torch.set_grad_enabled(grad), router:
            run.run_nodes(plan.prelude)
            try:
                model.hf(**plan.batch.model_kwargs(model.device), use_cache=False)
            except _StopForward:
                pass
    except OculiError:
        raise
    except Exception as err:
        raise ExecutionError(f"The forward pass of {model.info.model_id} failed: {type(err).__name__}: {err}") from err
    finally:
        for handle in handles:
            handle.remove()
    missing = [s.name for s in plan.saves if s.name not in run.saved]
    if missing:
        raise ExecutionError(
            f"The forward pass ended before these saved values were computed: {', '.join(missing)}. "
            "Their sites did not run (does the model skip them?)."
        )
    return run.saved
