"""The user-facing tracing context: ``with oculi.trace(model, prompt) as t:``.

Inside the block, ``t.layers[i].<site>``, ``t.embed``, ``t.logits`` and ``t.module(path)`` are
proxies; every use is recorded by the :class:`~oculi_dsl.proxy.Recorder`. Each ``t.invoke(...)``
adds prompts to the same batch. On exit the recording is compiled into a plan and executed in
one forward pass; ``t.result`` then labels the saved values as an ``xarray.Dataset``.

>>> import oculi_dsl as oculi
>>> model = oculi.testing.tiny_model("llama")
>>> with oculi.trace(model, "The capital of France is") as t:
...     resid = t.layers[:].resid_post.save("resid")
...     last = t.logits[-1].save("last")
>>> t.result["resid"].dims
('layer', 'token', 'd_model')
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import xarray as xr

from . import _ops, inputs
from .errors import RecordError, SiteError, did_you_mean
from .models import OculiModel, wrap
from .past import check_past
from .proxy import OculiProxy, Recorder, SiteBinding, SiteKey, layer_part
from .sites import SiteRef, layer_site, model_site

if TYPE_CHECKING:
    from .plan import Plan


class Invoke:
    """One prompt (or list of prompts) in a trace; its sites are proxies into its batch rows."""

    def __init__(self, trace: Trace, index: int, prompt: Any, past: Any = None):
        self._trace = trace
        self._index = index
        model = trace.model
        self._encoded = inputs.encode(model.tokenizer, prompt)
        self._past = check_past(past)

    def __enter__(self) -> Invoke:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    @property
    def layers(self) -> LayerList:
        """``layers[i]``, ``layers[a:b]``, ``layers[:]``, ``layers[[i, j]]`` (stack on ``layer``)."""
        return LayerList(self)

    @property
    def tokens(self) -> torch.Tensor:
        """This invoke's token ids (``(token,)``, or left-padded ``(prompt, token)``)."""
        ids, _, single = self._encoded
        if single:
            return torch.tensor(ids[0], dtype=torch.long)
        width = max(len(r) for r in ids)
        pad = inputs.pad_token_id(self._trace.model.tokenizer, self._trace.model.hf.config)
        return torch.tensor([[pad] * (width - len(r)) + r for r in ids], dtype=torch.long)

    def module(self, path: str) -> ModuleView:
        """Raw access to any submodule by dotted path: ``.input`` / ``.output`` (whole batch)."""
        names = dict(self._trace.model.hf.named_modules())
        if path not in names:
            raise SiteError(
                f"No module '{path}' in {self._trace.model.info.architecture}."
                f"{did_you_mean(path, names)} List them with "
                "`[n for n, _ in model.hf.named_modules()]`."
            )
        return ModuleView(self, path)

    def _key(self, site: SiteRef) -> SiteKey:
        return (self._index, site)

    def _model_site(self, name: str) -> SiteRef:
        model_site(self._trace.model.family, name)
        return SiteRef("model", name)

    def _read(self, site: SiteRef) -> OculiProxy:
        return self._trace._recorder.read(self._key(site))

    def _assign(self, site: SiteRef, value: Any) -> None:
        self._trace._recorder.assign(self._key(site), value)

    def __getattr__(self, name: str) -> Any:
        if name in ("embed", "final_norm", "logits"):
            return self._read(self._model_site(name))
        raise AttributeError(
            f"'{name}' is not part of a trace.{did_you_mean(name, _INVOKE_NAMES)} "
            f"Available: {', '.join(_INVOKE_NAMES)}."
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        elif name in ("embed", "final_norm", "logits"):
            self._assign(self._model_site(name), value)
        else:
            raise RecordError(f"Cannot assign to '{name}'. Assignable: embed, final_norm, logits, "
                              "layers[i].<site>, module(path).input/.output.")


_INVOKE_NAMES = ("layers", "embed", "final_norm", "logits", "module", "tokens", "invoke")


class LayerList:
    """``t.layers``: select one layer (``[i]``) or several (``[a:b]``, ``[:]``, ``[[i, j]]``)."""

    def __init__(self, invoke: Invoke):
        self._invoke = invoke

    def __len__(self) -> int:
        return self._invoke._trace.model.info.n_layers

    def __iter__(self) -> Any:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index: int | slice | Sequence[int]) -> LayerView:
        n = len(self)
        if isinstance(index, (bool, torch.Tensor, OculiProxy)):
            raise SiteError(f"Layer index must be an int, slice or list of ints, got {type(index).__name__}.")
        if isinstance(index, int):
            return LayerView(self._invoke, (self._check(index, n),), stacked=False)
        if isinstance(index, slice):
            chosen = tuple(range(n)[index])
        elif isinstance(index, (list, tuple, range)):
            chosen = tuple(self._check(i, n) for i in index)
        else:
            raise SiteError(f"Layer index must be an int, slice or list of ints, got {index!r}.")
        if not chosen:
            raise SiteError(f"The layer selection {index!r} is empty (model has {n} layers).")
        return LayerView(self._invoke, chosen, stacked=True)

    def _check(self, i: Any, n: int) -> int:
        if not isinstance(i, int) or isinstance(i, bool):
            raise SiteError(f"Layer index must be an int, got {i!r}.")
        if not -n <= i < n:
            info = self._invoke._trace.model.info
            raise SiteError(
                f"Layer {i} is out of range for {info.model_id} ({info.family}, {n} layers): "
                f"valid layers are 0..{n - 1} (or -{n}..-1)."
            )
        return i % n


class LayerView:
    """Sites of one layer, or of a layer selection (values stack on a leading ``layer`` dim)."""

    def __init__(self, invoke: Invoke, layers: tuple[int, ...], stacked: bool, prefix: str = ""):
        object.__setattr__(self, "_invoke", invoke)
        object.__setattr__(self, "_layers", layers)
        object.__setattr__(self, "_stacked", stacked)
        object.__setattr__(self, "_prefix", prefix)

    def _site_name(self, name: str) -> str | None:
        """Full site name, or None when ``name`` is a group prefix such as ``attn``."""
        full = self._prefix + name
        family = self._invoke._trace.model.family
        if full in family.layer_sites:
            return full
        if any(s.startswith(full + ".") for s in (*family.layer_sites, *family.absent)):
            return None
        layer_site(family, full, self._layers[0] if not self._stacked else None)  # raises
        return full

    def _keys(self, name: str) -> tuple[SiteKey, ...]:
        return tuple(self._invoke._key(SiteRef.at_layer(name, layer)) for layer in self._layers)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if self._prefix == "attn." and name == "heads":
            return HeadList(self)
        full = self._site_name(name)
        if full is None:
            return LayerView(self._invoke, self._layers, self._stacked, self._prefix + name + ".")
        recorder = self._invoke._trace._recorder
        keys = self._keys(full)
        return recorder.read_stacked(keys) if self._stacked else recorder.read(keys[0])

    def __setattr__(self, name: str, value: Any) -> None:
        full = self._site_name(name)
        if full is None:
            raise RecordError(f"'{self._prefix}{name}' is a group of sites, not a site; "
                              f"assign to one of its sites, e.g. '{self._prefix}{name}.out'.")
        recorder = self._invoke._trace._recorder
        keys = self._keys(full)
        for i, key in enumerate(keys):
            recorder.assign(key, value, (i, len(keys)) if self._stacked else None)

    def __repr__(self) -> str:
        sel = self._layers[0] if not self._stacked else list(self._layers)
        return f"<layers[{sel}]{'.' + self._prefix.rstrip('.') if self._prefix else ''}>"


class HeadList:
    """``attn.heads[h]``: one head's slice of ``attn.z`` (token, d_head), to read, swap or ablate."""

    def __init__(self, view: LayerView):
        self._view = view

    def __getitem__(self, head: int) -> OculiProxy:
        view = self._view
        info = view._invoke._trace.model.info
        if isinstance(head, bool) or not isinstance(head, int) or not -info.n_heads <= head < info.n_heads:
            raise SiteError(f"Head {head!r} is out of range for {info.model_id} "
                            f"({info.n_heads} heads): valid heads are 0..{info.n_heads - 1}.")
        z = view.z
        index = (Ellipsis, head % info.n_heads, slice(None))  # z is (..., token, head, d_head)
        recorder = view._invoke._trace._recorder
        part = recorder.create_proxy("call_function", operator.getitem, (z, index), {})
        part.node.meta["site_label"] = f"{z.node.meta.get('site_label', 'attn.z')}[head {head}]"
        binding = SiteBinding(z._binding.keys, z._binding.stacked, index)  # type: ignore[union-attr]
        return OculiProxy(part.node, recorder, binding)

    def __setitem__(self, head: int, value: Any) -> None:
        head_proxy = self[head]
        recorder = head_proxy.tracer
        n = len(head_proxy._binding.keys)  # type: ignore[union-attr]
        recorder.edit_each(head_proxy._binding, lambda part, i: recorder.create_proxy(  # type: ignore[arg-type]
            "call_function", _ops.assign, (part, layer_part(value, i, n)), {}))

    def __len__(self) -> int:
        return int(self._view._invoke._trace.model.info.n_heads)


class ModuleView:
    """``t.module(path)``: the module's first input / its output, for the whole batch."""

    _invoke: Invoke
    _path: str

    def __init__(self, invoke: Invoke, path: str):
        object.__setattr__(self, "_invoke", invoke)
        object.__setattr__(self, "_path", path)

    @property
    def input(self) -> OculiProxy:
        return self._invoke._read(SiteRef("module", self._path, where="input"))

    @property
    def output(self) -> OculiProxy:
        return self._invoke._read(SiteRef("module", self._path, where="output"))

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in ("input", "output"):
            raise RecordError(f"Only .input and .output of a module can be assigned, not '{name}'.")
        self._invoke._assign(SiteRef("module", self._path, where=name), value)


class Trace:
    """A recording over one model; runs once, in one forward pass, when the block exits."""

    def __init__(self, model: Any, prompt: Any = None, *, grad: bool = False, stop_early: bool = True,
                 past: Any = None):
        self.model: OculiModel = wrap(model)
        self._recorder = Recorder()
        self._recorder.info = self.model.info
        self._invokes: list[Invoke] = []
        self._grad = grad
        self._stop_early = stop_early
        self._plan: Plan | None = None
        self._saved: dict[str, Any] | None = None
        self._result: xr.Dataset | None = None
        self._default = self.invoke(prompt, past=past) if prompt is not None else None
        if prompt is None and past is not None:
            raise RecordError("past= belongs to a prompt: pass the prompt too, or give past= to "
                              "t.invoke(prompt, past=...).")

    # -- recording -------------------------------------------------------------------------
    def invoke(self, prompt: Any, *, past: Any = None) -> Invoke:
        """Add a prompt (or list of prompts, or token ids) to this trace's single batch.

        ``past=(k, v)``: the keys and values of the prompt's first c positions (as saved from
        ``attn.k`` / ``attn.v``); the forward then runs positions c.. only (:mod:`oculi_dsl.past`).
        """
        self._recorder.check_open("a new invoke")
        inv = Invoke(self, len(self._invokes), prompt, past)
        self._invokes.append(inv)
        return inv

    def _main(self) -> Invoke:
        if self._default is None:
            raise RecordError(
                "This trace was opened without a prompt, so it has no sites of its own. "
                "Use `with t.invoke(prompt) as x:` and read `x.layers[...]`, or pass the prompt "
                "to oculi.trace(model, prompt)."
            )
        return self._default

    @property
    def layers(self) -> LayerList:
        return self._main().layers

    @property
    def tokens(self) -> torch.Tensor:
        return self._main().tokens

    def module(self, path: str) -> ModuleView:
        return self._main().module(path)

    def __getattr__(self, name: str) -> Any:
        if name in ("embed", "final_norm", "logits"):
            return getattr(self._main(), name)
        raise AttributeError(f"'Trace' has no attribute '{name}'.{did_you_mean(name, _INVOKE_NAMES)}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("embed", "final_norm", "logits"):
            setattr(self._main(), name, value)
        elif name.startswith("_") or name in ("model", "max_steps"):
            object.__setattr__(self, name, value)
        else:
            # a typo such as `t.logit = 0` must not pass silently as a Python attribute
            raise RecordError(
                f"Cannot assign to 't.{name}'.{did_you_mean(name, ('embed', 'final_norm', 'logits'))} "
                "Assignable: embed, final_norm, logits, layers[i].<site>, module(path).input/.output."
            )

    # -- running ---------------------------------------------------------------------------
    def __enter__(self) -> Trace:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Literal[False]:
        self._recorder.closed = True
        if exc_type is not None:
            return False  # the user's exception propagates unchanged; nothing runs
        from .compiler import compile_plan

        if not self._invokes:
            raise RecordError("The trace has no prompt: pass one to oculi.trace() or call t.invoke().")
        self._plan = compile_plan(self._recorder, self.model, [i._encoded for i in self._invokes],
                                  stop_early=self._stop_early, pasts=[i._past for i in self._invokes])
        self._saved = self._run(self._plan)
        self._recorder.results = self._saved
        return False

    def _run(self, plan: Plan) -> dict[str, Any]:
        """Execute the compiled plan; returns the saved values by name."""
        from .executor import execute

        saved, _ = execute(plan, self.model, grad=self._grad)
        return saved

    @property
    def graph(self) -> str:
        """The recorded intervention graph, one node a line."""
        from .plan import format_graph

        return format_graph(self._recorder.graph)

    @property
    def plan(self) -> Plan:
        if self._plan is None:
            raise RecordError("The trace has not run yet; its plan exists after the `with` block.")
        return self._plan

    @property
    def saved(self) -> dict[str, Any]:
        """The raw saved values (tensors), by name."""
        if self._saved is None:
            raise RecordError("The trace has not run yet; saved values exist after the `with` block.")
        return self._saved

    @property
    def result(self) -> xr.Dataset:
        """Saved values as an ``xarray.Dataset`` with labeled dims, coords and provenance."""
        if self._result is None:
            from .results import to_dataset

            self._result = to_dataset(self.plan, self.saved, self.model, self.graph)
        return self._result


def trace(model: Any, prompt: Any = None, *, grad: bool = False, stop_early: bool = True,
          past: Any = None) -> Trace:
    """Open a trace over ``model`` (an :class:`OculiModel` or a HF model).

    ``prompt`` is a string, a list of strings, or token ids; omit it and use ``t.invoke()`` to
    put several prompts in one batch. ``grad=True`` keeps autograd on. ``stop_early`` runs only
    the part of the forward pass the trace needs: it ends after the last site read, and starts
    at layer s when every prompt's ``resid_pre`` of layer s is assigned and nothing earlier is
    read (``t.plan.start_layer``); ``stop_early=False`` runs the whole model. ``past=(k, v)``
    resumes ``prompt`` after the positions whose keys and values it holds (:mod:`oculi_dsl.past`).

    >>> import oculi_dsl as oculi
    >>> model = oculi.testing.tiny_model("gpt2")
    >>> with oculi.trace(model) as t:
    ...     with t.invoke("The Eiffel Tower is in Paris") as a:
    ...         h = a.layers[1].mlp.out
    ...     with t.invoke("The Eiffel Tower is in London") as b:  # same number of tokens
    ...         b.layers[1].mlp.out = h
    ...         patched = b.logits[-1].save("patched")
    >>> t.result["patched"].dims
    ('vocab',)
    """
    return Trace(model, prompt, grad=grad, stop_early=stop_early, past=past)
