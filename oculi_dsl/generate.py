"""Generation with interventions: ``with oculi.generate(model, prompt, max_new_tokens=…) as g:``.

The recording is the same as a trace; on exit it runs inside ONE ``model.generate`` call. Every
forward call of the generation is a *step* (step 0 reads the whole prompt, each later step one
new token, with the KV cache). Recorded edits apply at every step, or only inside
``with g.steps[i]:`` / ``with g.steps[a:b]:``. Saves collect one value per step and stack on a
``step`` dim; a value whose token axis grows (a site read whole) is laid out on absolute token
positions, NaN where a step did not compute that position.

>>> import oculi_dsl as oculi
>>> model = oculi.testing.tiny_model("llama")
>>> with oculi.generate(model, "Once upon a time", max_new_tokens=3) as g:
...     g.layers[1].attn.q.scale(1.5, head=0)
...     last = g.layers[1].resid_post[-1].save("last")
>>> g.result["last"].dims
('step', 'd_model')
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import xarray as xr

from .dims import TOKEN_LIKE, Axis
from .errors import RecordError, ResultError
from .plan import Plan, Save
from .trace import Invoke, Trace


class StepSelector:
    """``g.steps[i]`` / ``g.steps[a:b]`` / ``g.steps[[i, j]]``: a context limiting edits and saves."""

    def __init__(self, gen: Generate):
        self._gen = gen

    def __getitem__(self, index: int | slice | list[int]) -> Any:
        n = self._gen.max_steps
        if isinstance(index, slice):
            chosen = tuple(range(n)[index])
        elif isinstance(index, int) and not isinstance(index, bool):
            chosen = (range(n)[index],) if -n <= index < n else ()
        else:
            chosen = tuple(int(i) for i in index)  # type: ignore[union-attr]
        if not chosen or any(not 0 <= s < n for s in chosen):
            raise RecordError(f"Step selection {index!r} is outside this generation's steps 0..{n - 1} "
                              f"(max_new_tokens={n}; step 0 reads the prompt).")
        return self._gen._recorder.only_steps(frozenset(chosen))


class Generate(Trace):
    """A trace whose recording runs inside one ``model.generate`` call."""

    def __init__(self, model: Any, prompt: Any = None, *, max_new_tokens: int = 20, **generate_kwargs: Any):
        super().__init__(model, prompt, stop_early=False)
        if max_new_tokens < 1:
            raise RecordError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}.")
        self.max_steps = max_new_tokens
        self._generate_kwargs = {"max_new_tokens": max_new_tokens, **generate_kwargs}
        self._output: torch.Tensor | None = None

    @property
    def steps(self) -> StepSelector:
        return StepSelector(self)

    def invoke(self, prompt: Any, *, past: Any = None) -> Invoke:
        if past is not None:
            raise RecordError("oculi.generate runs each prompt from its first token: past= is an "
                              "option of oculi.trace, not of generation.")
        return super().invoke(prompt)

    def _run(self, plan: Plan) -> dict[str, Any]:
        """One ``model.generate`` call; saved values are kept per step."""
        from .executor import execute

        kwargs = dict(self._generate_kwargs)
        kwargs.setdefault("pad_token_id", self._pad_id())
        saved, output = execute(plan, self.model, grad=self._grad, generate=kwargs)
        self._output = output if isinstance(output, torch.Tensor) else output.sequences
        self._per_step = saved
        return {name: [v for _, v in values] for name, values in saved.items()}

    def _pad_id(self) -> int:
        from .inputs import pad_token_id

        return pad_token_id(self.model.tokenizer, self.model.hf.config)

    @property
    def tokens(self) -> torch.Tensor:
        """Generated sequences, prompt included (left-padded rows for several prompts)."""
        if self._output is None:
            raise RecordError("The generation has not run yet; tokens exist after the `with` block.")
        return self._output[0] if self._output.shape[0] == 1 else self._output

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.tokens[..., self.plan.batch.length:]

    @property
    def text(self) -> str | list[str]:
        """The generated continuation (new tokens only); a list for several prompts."""
        tok = self.model.tokenizer
        rows = self.new_tokens if self.new_tokens.dim() == 2 else self.new_tokens[None]
        texts = [tok.decode(r, skip_special_tokens=True) if tok else " ".join(map(str, r.tolist())) for r in rows]
        return texts[0] if len(texts) == 1 else texts

    @property
    def result(self) -> xr.Dataset:
        if self._result is None:
            from .results import to_dataset

            plan, stacked = _stack_steps(self.plan, self._per_step, self._output, self.model)  # type: ignore[arg-type]
            self._result = to_dataset(plan, stacked, self.model, self.graph)
            self._result.attrs["generated"] = self.text if isinstance(self.text, list) else [self.text]
        return self._result


def generate(model: Any, prompt: Any = None, *, max_new_tokens: int = 20, **generate_kwargs: Any) -> Generate:
    """Open a generation over ``model``; extra keyword arguments go to ``model.generate``."""
    return Generate(model, prompt, max_new_tokens=max_new_tokens, **generate_kwargs)


def _stack_steps(plan: Plan, per_step: dict[str, list[tuple[int, Any]]], output: torch.Tensor,
                 model: Any) -> tuple[Plan, dict[str, Any]]:
    """One tensor per save with a leading ``step`` dim, and the plan relabelled to match."""
    n_new = output.shape[1] - plan.batch.length
    segments = tuple(
        dataclasses.replace(seg, token_strs=tuple(
            strs + tuple(_token_str(model, i) for i in output[seg.start + r, plan.batch.length:].tolist())
            for r, strs in enumerate(seg.token_strs)))
        for seg in plan.batch.segments)
    saves, values = [], {}
    for save in plan.saves:
        entries = per_step.get(save.name, [])
        if not entries:
            continue
        steps = tuple(s for s, _ in entries)
        tensors = [torch.as_tensor(v) for _, v in entries]
        labels = save.labels
        if all(t.shape == tensors[0].shape for t in tensors):
            values[save.name] = torch.stack(tensors)
        else:
            values[save.name], labels = _on_positions(save, entries, plan, n_new)
        new_labels = (Axis("step", steps),) + labels if labels is not None else None
        saves.append(dataclasses.replace(save, labels=new_labels))
    batch = dataclasses.replace(plan.batch, segments=segments)
    return dataclasses.replace(plan, saves=tuple(saves), batch=batch), values


def _on_positions(save: Save, entries: list[tuple[int, Any]], plan: Plan, n_new: int) -> tuple[torch.Tensor, Any]:
    """Lay values whose token axes grow with the cache out on absolute token positions."""
    labels = save.labels
    seg = plan.batch.segments[save.invoke] if save.invoke is not None else None
    first = torch.as_tensor(entries[0][1])
    if labels is None or seg is None or not any(a.name in TOKEN_LIKE for a in labels) or \
            any(a.name in TOKEN_LIKE and (a.index is None or list(a.index) != list(range(seg.length))) for a in labels):
        raise ResultError(
            f"Saved value '{save.name}' changes shape across generation steps and its token axis "
            "cannot be placed on positions. Save a fixed-size part at every step, e.g. `[-1]` "
            "for the newest token."
        )
    total = seg.length + n_new
    shape = [total if a.name in TOKEN_LIKE else n for a, n in zip(labels, first.shape, strict=False)]
    out = torch.full((len(entries), *shape), float("nan"), dtype=torch.float32 if not first.is_floating_point() else first.dtype)
    for i, (step, value) in enumerate(entries):
        value = torch.as_tensor(value)
        index: list[Any] = [i]
        for axis, size in zip(labels, value.shape, strict=False):
            # a token axis at step s holds the latest `size` positions of the sequence so far:
            # the whole prompt (step 0), the one new token, or the (windowed) cached keys
            start = seg.length + step - size
            index.append(slice(start, start + size) if axis.name in TOKEN_LIKE else slice(None))
        out[tuple(index)] = value.to(out.dtype)
    new_labels = tuple(Axis(a.name, range(total)) if a.name in TOKEN_LIKE else a for a in labels)
    return out, new_labels


def _token_str(model: Any, token: int) -> str:
    tok = model.tokenizer
    return tok.decode([token]) if tok is not None else str(token)
