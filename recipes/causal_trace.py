"""Causal tracing (ROME, Meng et al. 2022): where is a fact recalled from?

Implements SPEC.md § Activation patching and causal tracing, "Corruption by noise" and
"Corruption by counterfactual prompt". Noise mode: one clean run and ``samples`` corrupted
copies, each with ``ν · N(0, 1)`` added to the embeddings (the ``embed`` site) at the subject's
token positions, ν = ``noise`` × the std of embedding entries; the noise is drawn once from
``seed`` and is the same for every cell. Restoring cell (token i, layer l) copies the clean
value into every corrupted copy and records the target's probability averaged over the
copies. ``kind=None`` restores the hidden state (``resid_post``) of layer l; ``kind="mlp"`` /
``"attn"`` restore ``mlp.out`` / ``attn.out`` in the window of layers
``range(max(0, l − w//2), min(L, l − (−w//2)))`` around l. ``low`` is the corrupted
probability (no restoration), ``high`` the clean one.

Choices left open by SPEC: ν uses the std of the WHOLE input-embedding matrix by default
(``std="matrix"``, SPEC's rule when no dataset of subjects is given; times the embedding scale,
e.g. Gemma's √d_model, because the noise is added to the scaled ``embed`` value);
``std="subject"`` uses the std of this prompt's subject-token embeddings (ROME's dataset
estimate with a one-prompt dataset); a number gives the std directly. Position 0 is never
noised: it is either the BOS token or, for models without one (SmolLM2, GPT-2), the first
word, which acts as the attention sink; a subject that starts there loses that token, with a
warning.

Batched: restored copies run in as few forward passes as the memory budget allows (each
cell is one invoke of ``samples`` rows next to the clean invoke), plus one pass for ``low``
and ``high``. Cells at positions before the first noised (or differing) token, or after the
measured one, cannot change anything and get exactly ``low`` without running.

>>> import oculi_dsl as oculi
>>> from oculi_dsl.recipes import causal_trace
>>> model = oculi.testing.tiny_model("llama")
>>> ds = causal_trace(model, "The Eiffel Tower is in Paris", subject="The Eiffel Tower",
...                   samples=2, progress=False)
>>> ds["score"].dims, ds.attrs["subject_positions"]
(('token', 'layer'), [1, 2, 3])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from . import _batching as B
from ._common import check_model, provenance, token_id
from ._errors import RecipeError
from ._patch_sites import index_list, layer_list, token_strings
from .patching import _encode, _text, recovery, same_length

__all__ = ["KINDS", "causal_trace", "subject_positions", "window_layers"]

DEFINITION = ("SPEC.md § Activation patching and causal tracing — corruption by noise (ROME): "
              "ν·N(0,1) on the subject's token embeddings, metric averaged over the corrupted "
              "copies, restoration per (token, layer), windows range(max(0, l − w//2), "
              "min(L, l − (−w//2))) for mlp/attn; or corruption by a counterfactual prompt")
KINDS: dict[str | None, str] = {None: "resid_post", "mlp": "mlp.out", "attn": "attn.out"}


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """SPEC's window of layers restored around ``layer``: range(max(0, l−w//2), min(L, l−(−w//2)))."""
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def subject_positions(model: Any, ids: Sequence[int], subject: Any) -> list[int]:
    """Token positions of ``subject`` in ``ids``: a text (first occurrence) or positions."""
    n = len(ids)
    if isinstance(subject, slice):
        subject = list(range(n)[subject])
    if not isinstance(subject, str):
        got = index_list(subject, n, "subject", "[1, 2, 3] or 'The Eiffel Tower'")
        return sorted(got or [])
    pieces = token_strings(model, ids)
    text = "".join(pieces)
    start = text.find(subject)
    if not subject or start < 0:
        raise RecipeError(f"subject={subject!r} does not occur in the prompt {text!r} (tokens "
                          f"{pieces}). Give the subject exactly as it is written in the prompt "
                          "(case and spaces matter), or its token positions, e.g. subject=[1, 2].")
    stop, offset, out = start + len(subject), 0, []
    for i, piece in enumerate(pieces):
        if offset < stop and offset + len(piece) > start:
            out.append(i)
        offset += len(piece)
    return out


def _nu(model: Any, ids: list[int], subj: list[int], noise: float, std: Any) -> float:
    emb = model.hf.get_input_embeddings()
    with torch.no_grad():
        if std == "matrix":
            scale = getattr(emb, "embed_scale", 1.0)
            sigma = float(emb.weight.float().std()) * float(scale)
        elif std == "subject":
            sigma = float(emb(torch.tensor([ids[i] for i in subj], device=emb.weight.device)).float().std())
        elif isinstance(std, (int, float)) and not isinstance(std, bool) and std > 0:
            sigma = float(std)
        else:
            raise RecipeError(f"std={std!r} is not valid: use 'matrix' (std of the embedding "
                              "matrix, SPEC's default), 'subject' (std of the subject's token "
                              "embeddings) or a positive number.")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise <= 0:
        raise RecipeError(f"noise={noise!r} must be a positive number (ROME uses 3.0).")
    return float(noise) * sigma


def causal_trace(model: Any, prompt: Any, *, subject: Any, target: int | str | None = None,
                 kind: str | None | Sequence[str | None] = None, window: int = 10,
                 samples: int = 10, noise: float = 3.0, seed: int = 0, std: Any = "matrix",
                 corrupt: Any = None, layers: Any = None, tokens: Any = None, position: int = -1,
                 chunk_size: int | None = None, memory_budget: Any = None,
                 progress: bool = True) -> xr.Dataset:
    """ROME causal trace of ``prompt``: restored probability of ``target`` per (token, layer).

    Implements SPEC.md § Activation patching and causal tracing (module docstring for the
    protocol and the choices made). ``subject``: text in the prompt (or token positions) whose
    embeddings get the noise. ``target``: token id or single-token text (default: the clean
    run's top prediction at ``position``). ``kind``: None (hidden states), ``"mlp"``,
    ``"attn"``, or a list of them (adds a ``site`` dim). ``window``: layers restored together
    for mlp/attn. ``samples``, ``noise``, ``seed``, ``std``: the corruption. ``corrupt``: a
    counterfactual prompt of the same token length instead of noise (one corrupted copy).
    ``layers`` / ``tokens``: restrict the grid (default: all). ``chunk_size`` /
    ``memory_budget``: cells per forward pass.

    Returns a Dataset with ``score`` ([site,] token, layer) = restored probability, ``recovery``
    = (score − low) / (high − low), scalars ``low`` and ``high``; coords ``token``,
    ``token_str``, ``subject`` (bool per token: noised), ``layer``; attrs with ν, the noised
    positions, the target and the number of forward passes.

    >>> import oculi_dsl as oculi
    >>> model = oculi.testing.tiny_model("gpt2")
    >>> ds = causal_trace(model, "The Eiffel Tower is in Paris", subject="Eiffel Tower",
    ...                   kind="mlp", window=2, samples=2, progress=False)
    >>> ds["score"].shape, ds.attrs["kind"]
    ((6, 4), 'mlp')
    """
    model = check_model(model)
    ids = _encode(model, prompt, "prompt")
    n_tok, n_layers = len(ids), model.info.n_layers
    pos = B.check_position(position, n_tok)
    kinds: list[Any] = list(kind) if isinstance(kind, (list, tuple)) else [kind]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise RecipeError(f"kind={kind!r} is not valid: use None (hidden states), 'mlp' or 'attn', "
                          "or a list of them, e.g. kind=[None, 'mlp', 'attn'].")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise RecipeError(f"window={window!r} must be a positive int (ROME uses 10).")
    layer_sel, tok_sel = layer_list(model, layers), index_list(tokens, n_tok, "tokens", "[3, 4]")
    tok_sel = list(range(n_tok)) if tok_sel is None else tok_sel
    subj = subject_positions(model, ids, subject)
    if corrupt is None:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise RecipeError(f"samples={samples!r} must be a positive int (ROME uses 10).")
        if 0 in subj:
            warnings.warn(f"The subject starts at position 0 ({token_strings(model, ids)[0]!r}); "
                          "position 0 is never noised (BOS / attention sink), so only positions "
                          f"{[p for p in subj if p]} get noise.", UserWarning, stacklevel=2)
            subj = [p for p in subj if p]
        if not subj:
            raise RecipeError(f"subject={subject!r} covers no position that can be noised (position "
                              "0 never is). Choose a subject after the first token.")
        nu = _nu(model, ids, subj, noise, std)
        gen = torch.Generator().manual_seed(seed)
        eps = torch.randn((samples, len(subj), model.info.d_model), generator=gen)
        full = torch.zeros((samples, n_tok, model.info.d_model))
        full[:, subj] = nu * eps
        full = full.to(dtype=model.info.dtype, device=model.device)

        def prepare(x: Any) -> None:
            x.embed = x.embed + full
        base: Any = torch.tensor([ids] * samples)
        first, rows, corr_ids = subj[0], samples, None
    else:
        corr_ids = _encode(model, corrupt, "corrupt")
        same_length(model, ids, corr_ids)
        prepare, base, rows, nu = None, corr_ids, 1, float("nan")  # type: ignore[assignment]
        first = next((i for i, (a, b) in enumerate(zip(ids, corr_ids, strict=False)) if a != b), n_tok)

    clean_lg, corr_lg = B.baseline_logits(model, [ids, base], pos,
                                          {1: prepare} if prepare is not None else None)
    tid = token_id(model, target, "target") if target is not None else int(clean_lg.argmax())

    def measure(logits: Any, n: int) -> Any:
        return logits.softmax(-1)[..., tid].reshape(n, -1).mean(-1)

    with torch.no_grad():
        high = float(measure(clean_lg[None], 1)[0])
        low = float(measure(corr_lg[None], 1)[0])
    sites = [KINDS[k] for k in kinds]
    shape = (len(sites), len(tok_sel), len(layer_sel))
    values = np.full(int(np.prod(shape)), low, dtype=np.float64)
    cells, where = [], []
    for flat, (s, ti, li) in enumerate(np.ndindex(*shape)):
        token, layer = tok_sel[ti], layer_sel[li]
        if token < first or token > pos:
            continue  # restoring here cannot change the measured probability: exactly `low`
        span = [layer] if kinds[s] is None else window_layers(layer, window, n_layers)
        cells.append([B.Edit(sites[s], j, (token,)) for j in span])
        where.append(flat)
    per_chunk = B.cells_per_chunk(model, n_tok, rows, chunk_size, memory_budget)
    scores, passes = B.run_sweep(model, source=ids, base=base, cells=cells, position=pos,
                                 measure=measure, per_chunk=per_chunk, prepare=prepare,
                                 multi_rows=corrupt is None, progress=progress,
                                 desc=f"causal trace, {len(cells)} cells")
    values[where] = scores.double().numpy()
    values = values.reshape(shape)
    strs = token_strings(model, ids)
    dims = ("site", "token", "layer")
    ds = xr.Dataset(
        {"score": (dims, values), "recovery": (dims, recovery(values, high, low)),
         "low": low, "high": high},
        coords={"site": sites, "token": tok_sel, "token_str": ("token", [strs[i] for i in tok_sel]),
                "subject": ("token", [i in subj for i in tok_sel]), "layer": layer_sel})
    if not isinstance(kind, (list, tuple)):
        ds = ds.isel(site=0, drop=True)
    ds.attrs = provenance(
        model, "causal_trace.causal_trace", DEFINITION, prompt=_text(model, ids),
        mode="noise" if corrupt is None else "counterfactual",
        corrupt=_text(model, corr_ids) if corr_ids is not None else None,
        subject=subject if isinstance(subject, str) else str(list(subj)), subject_positions=subj,
        kind=",".join("hidden" if k is None else k for k in kinds),
        window=window, samples=rows, noise=noise if corrupt is None else None,
        std=str(std) if corrupt is None else None, nu=nu, seed=seed, target_id=tid,
        target_token=token_strings(model, [tid])[0], metric="prob", position=pos,
        cells=len(cells), skipped_cells=int(values.size) - len(cells), chunk_size=per_chunk,
        forward_passes=passes + 1)
    return ds
