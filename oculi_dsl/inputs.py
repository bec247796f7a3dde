"""Inputs: prompts of every invoke → one left-padded batch for a single forward pass.

Each invoke contributes one or more rows. Rows are left-padded to the longest prompt in the
trace, so position ``-1`` is every prompt's last real token; position ids are computed from the
attention mask so padding never shifts a prompt's positions. An invoke sees its own rows,
trimmed to its own longest prompt (``Segment``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CompileError, RecordError
from .past import Past, stack

Prompt = str | Sequence[int] | torch.Tensor


@dataclass(frozen=True)
class Segment:
    """One invoke's part of the batch: rows ``start:stop``, its prompts and its token length."""

    start: int
    stop: int
    length: int
    single: bool
    prompts: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    token_strs: tuple[tuple[str, ...], ...]

    @property
    def rows(self) -> slice | int:
        return self.start if self.single else slice(self.start, self.stop)


@dataclass(frozen=True)
class Batch:
    """The model inputs of one trace and the segment of each invoke."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    segments: tuple[Segment, ...]
    past: Past | None = None  # cached keys/values of the first positions (then no padding)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def first(self) -> int:
        """The first position the forward runs (> 0 when resuming from ``past``)."""
        return self.past.length if self.past is not None else 0

    def model_kwargs(self, device: torch.device) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"input_ids": self.input_ids[:, self.first:].to(device)}
        if self.attention_mask is not None:
            kwargs["attention_mask"] = self.attention_mask.to(device)
            kwargs["position_ids"] = self.position_ids.to(device)  # type: ignore[union-attr]
        return kwargs


    def generate_kwargs(self, device: torch.device) -> dict[str, Any]:
        """Inputs for ``generate``, which derives positions from the mask itself."""
        mask = self.attention_mask if self.attention_mask is not None else torch.ones_like(self.input_ids)
        return {"input_ids": self.input_ids.to(device), "attention_mask": mask.to(device)}


def encode(tokenizer: Any, prompt: Prompt | Sequence[Prompt]) -> tuple[list[list[int]], list[str], bool]:
    """Token ids of one invoke's prompt(s); returns (ids per prompt, texts, single)."""
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() == 1:
            rows: list[list[int]] = [prompt.tolist()]
            single = True
        elif prompt.dim() == 2:
            rows = prompt.tolist()
            single = False
        else:
            raise RecordError(f"Token ids must be 1-D or 2-D, got shape {tuple(prompt.shape)}.")
        return rows, [_decode(tokenizer, r) for r in rows], single
    if isinstance(prompt, str):
        return [_tokenize(tokenizer, prompt)], [prompt], True
    items = list(prompt)
    if not items:
        raise RecordError("An empty list of prompts was given; pass at least one prompt.")
    if all(isinstance(i, int) for i in items):
        flat = [int(i) for i in items]  # type: ignore[arg-type]
        return [flat], [_decode(tokenizer, flat)], True
    ids: list[list[int]] = []
    texts: list[str] = []
    for item in items:
        sub_ids, sub_texts, _ = encode(tokenizer, item)  # type: ignore[arg-type]
        if len(sub_ids) != 1:
            raise RecordError("Nested prompt lists are not supported; give a flat list of prompts.")
        ids += sub_ids
        texts += sub_texts
    return ids, texts, False


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    if tokenizer is None:
        raise RecordError(
            "This model was wrapped without a tokenizer, so text prompts cannot be encoded. "
            "Pass token ids (a list of ints or a LongTensor) or use oculi.wrap(model, tokenizer)."
        )
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise RecordError(f"The prompt {text!r} encodes to no tokens; give a non-empty prompt.")
    return ids


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids)) if tokenizer is not None else " ".join(map(str, ids))


def token_strings(tokenizer: Any, ids: Sequence[int]) -> tuple[str, ...]:
    """Readable text of each token (``" Paris"``), or the id as text without a tokenizer."""
    if tokenizer is None:
        return tuple(str(i) for i in ids)
    return tuple(tokenizer.decode([i]) for i in ids)


def build_batch(
    tokenizer: Any, invokes: Sequence[tuple[list[list[int]], list[str], bool]], pad_id: int,
    pasts: Sequence[Any] = (), sizes: tuple[int, int, int] | None = None,
) -> Batch:
    """Left-pad every invoke's prompts into one batch; ``pasts`` (per invoke, see
    :mod:`oculi_dsl.past`) need ``sizes`` = (n_layers, n_kv_heads, d_head)."""
    rows = [row for ids, _, _ in invokes for row in ids]
    length = max(len(r) for r in rows)
    padded = any(len(r) != length for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, length - len(r):] = 1
    segments, start = [], 0
    for ids, texts, single in invokes:
        seg_len = max(len(r) for r in ids)
        strs = tuple(("",) * (seg_len - len(r)) + token_strings(tokenizer, r) for r in ids)
        segments.append(Segment(start, start + len(ids), seg_len, single, tuple(texts),
                                tuple(tuple(r) for r in ids), strs))
        start += len(ids)
    if any(p is not None for p in pasts):
        if padded:
            raise CompileError("past= needs prompts of one length (no padding): these have "
                               f"{sorted({len(r) for r in rows})} tokens.")
        past = stack(pasts, [s.stop - s.start for s in segments], [s.length for s in segments],
                     *sizes)  # type: ignore[misc]
        return Batch(input_ids, None, None, tuple(segments), past)
    if not padded:
        return Batch(input_ids, None, None, tuple(segments))
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(input_ids, mask, position_ids, tuple(segments))


def pad_token_id(tokenizer: Any, config: Any) -> int:
    """The id used for left padding (masked out, so any valid id works)."""
    for source in (tokenizer, config):
        for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    return 0
