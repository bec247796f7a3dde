"""Logit lens: what would the model predict if it stopped after layer l?

Implements SPEC.md § Logit lens: ``logits_l = lm_head(norm_f(x_{l+1}))`` for l = 0..L−1 on
the residual stream (``resid_post`` of layer l), softmax over the full vocabulary. At
l = L−1 this is exactly the model's own computation (its last ``resid_post`` goes through
``norm_f`` once, never twice), so the lens takes that layer's logits from the ``logits`` site
itself (recomputing them would differ by float rounding, ~2e-5 on SmolLM2's ±20 logits,
from another matmul blocking); earlier layers use the same modules. Models with final logit
soft-capping (``final_logit_softcapping`` in the config, e.g. Gemma 2; Gemma 3 270M has none)
get the same ``tanh(z / c) · c`` on every layer, because the ``logits`` site is after capping.

Everything is computed inside ONE traced forward pass: the final norm and the unembedding
are applied to every layer's ``resid_post`` in the trace, and the statistics (top-k, target
probability, KL(final ‖ layer), entropy, ranks) are reduced there in chunks of rows, so only
small tensors are saved — never the (layer, token, vocab) logits, unless ``keep_logits``.

>>> import oculi_dsl as oculi
>>> from oculi_dsl.recipes import logit_lens, format_predictions
>>> model = oculi.testing.tiny_model("llama")
>>> ds = logit_lens(model, "The capital of France is", top_k=3)
>>> ds["top_probs"].dims
('layer', 'token', 'k')
>>> format_predictions(ds, k=2).splitlines()[0].startswith("Layer  0: [(")
True
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch.overrides import handle_torch_function, has_torch_function

import oculi_dsl as oculi

from ._batching import final_norm_module, softcap
from ._common import check_model, provenance, token_id
from ._errors import RecipeError
from ._patch_sites import index_list, layer_list, token_strings
from .patching import _encode, _text

__all__ = ["format_predictions", "logit_lens", "plot_logit_lens"]

DEFINITION = ("SPEC.md § Logit lens: logits_l = lm_head(norm_f(resid_post_l)) for l = 0..L-1 "
              "(the last equals the model's logits), softmax over the full vocabulary; "
              "KL(final || layer) and entropy in nats")
# bytes of one (rows, vocab) float32 array of a reduction chunk. Under 32 MiB, the allocator
# reuses freed arrays (glibc's adaptive mmap threshold keeps such blocks in its heap) instead
# of mapping fresh pages every time: page faults on new arrays cost more than the arithmetic.
CHUNK_BYTES = 30 * 1024**2


def lens_stats(normed: Any, weight: Any, bias: Any, final: Any, target: Any, k: int,
               cap: float | None, keep: bool, last: int = -1) -> Any:
    """Per-(layer, token) statistics of the unembedded states, reduced in chunks of rows.

    ``normed`` (L, T, d) is norm_f(resid_post); ``final`` (T, V) the model's logits;
    ``target`` a 0-d token id tensor; ``last`` the index in ``normed`` of the model's last
    layer (-1: not selected), whose logits ARE ``final`` (norm_f + lm_head of the last
    ``resid_post`` is exactly what the model computed), so they are taken from it. Returns
    (top_probs, top_ids, target_prob, target_rank, kl, entropy, final_rank, logits|None).
    Recorded as ONE node when called on proxies (torch's ``__torch_function__`` protocol), so
    its intermediates are freed chunk by chunk instead of being kept by the trace.
    """
    if has_torch_function((normed, final, target)):
        return handle_torch_function(lens_stats, (normed, final, target), normed, weight, bias,
                                     final, target, k, cap, keep, last)
    n_layers, n_tok, _ = normed.shape
    vocab = weight.shape[0]
    out = _outputs(n_layers, n_tok, k, vocab, keep, final.dtype, normed.device)
    if normed.device.type == "meta":  # shapes only (compile-time check)
        return out
    ref = final.float().log_softmax(-1)
    ref_p = ref.exp()
    ref_neg_entropy = torch.einsum("tv,tv->t", ref_p, ref)
    ref_mass = ref_p.sum(-1)
    best = final.argmax(-1)
    budget = max(1, CHUNK_BYTES // (4 * vocab))  # rows of the (rows, vocab) arrays
    scratch = torch.empty((min(budget, n_layers * n_tok), vocab), device=normed.device)
    shifted = torch.empty_like(scratch)
    for l0, l1, a, b in _chunks(n_layers, n_tok, budget, last):
        rows = (l1 - l0) * (b - a)
        if l0 == last:
            z = final[a:b]  # the model's own logits: the lens at l = L-1, exactly
        else:
            z = F.linear(normed[l0:l1, a:b].reshape(rows, -1), weight, bias)
            if cap is not None:
                z = torch.tanh(z / cap) * cap
        if keep:
            out[7][l0:l1, a:b] = z.reshape(l1 - l0, b - a, vocab)
        z = z.float()
        tmp, zc = scratch[:rows], shifted[:rows]
        z_target = z[:, target.reshape(())].unsqueeze(-1)
        z_best = z.gather(-1, best[a:b].repeat(l1 - l0)[:, None])
        # ranks: how many tokens score strictly higher (0 = top); sums of 0./1. are exact here
        rank_t = torch.sub(z, z_target, out=tmp).gt_(0).sum(-1)
        rank_f = torch.sub(z, z_best, out=tmp).gt_(0).sum(-1)
        top_z, top_ids = z.topk(k, dim=-1)
        # shifted logits z - max keep every reduction below well conditioned
        m = z.amax(-1, keepdim=True)
        torch.sub(z, m, out=zc)
        e = torch.exp(zc, out=tmp)
        sum_e = e.sum(-1)
        log_z = sum_e.log()  # log-normaliser of zc: logp = zc - log_z
        entropy = log_z - torch.einsum("rv,rv->r", e, zc) / sum_e
        cross = torch.einsum("ltv,tv->lt", zc.view(l1 - l0, b - a, vocab), ref_p[a:b]).reshape(rows)
        kl = (ref_neg_entropy[a:b].repeat(l1 - l0) - cross + log_z * ref_mass[a:b].repeat(l1 - l0)).clamp_min(0)
        values = [(top_z - m - log_z[:, None]).exp(), top_ids, (z_target.squeeze(-1) - m.squeeze(-1) - log_z).exp(),
                  rank_t.long(), kl, entropy, rank_f.long()]
        for dest, value in zip(out, values, strict=False):
            dest[l0:l1, a:b] = value.reshape(l1 - l0, b - a, *value.shape[1:])
    return out


def _outputs(n_layers: int, n_tok: int, k: int, vocab: int, keep: bool, dtype: torch.dtype,
             device: torch.device) -> tuple[torch.Tensor, ...]:
    def empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty((n_layers, n_tok, *shape), dtype=dtype, device=device)
    out = (empty(k), empty(k, dtype=torch.long), empty(), empty(dtype=torch.long), empty(),
           empty(), empty(dtype=torch.long))
    return out + ((empty(vocab, dtype=dtype),) if keep else ())


def _chunks(n_layers: int, n_tok: int, budget: int, last: int) -> list[tuple[int, int, int, int]]:
    """(l0, l1, a, b) blocks of layers l0..l1-1 x tokens a..b-1 with at most ``budget`` rows:
    whole layers when a layer fits, else token ranges of one layer; the model's last layer
    (``last``) is always a block of its own, because its logits are the model's."""
    if n_tok > budget:
        return [(lay, lay + 1, a, min(n_tok, a + budget))
                for lay in range(n_layers) for a in range(0, n_tok, budget)]
    per, blocks, lay = budget // n_tok, [], 0
    while lay < n_layers:
        end = lay + 1 if lay == last else min(n_layers, lay + per)
        if lay < last < end:
            end = last
        blocks.append((lay, end, 0, n_tok))
        lay = end
    return blocks


NAMES = ("top_probs", "top_ids", "target_prob", "target_rank", "kl", "entropy", "final_rank", "logits")


def logit_lens(model: Any, prompt: Any, *, layers: Any = None, top_k: int = 10,
               target: int | str | None = None, positions: Any = None,
               keep_logits: bool = False) -> xr.Dataset:
    """Unembed every layer's residual stream; top-k, target trajectory, KL, entropy, ranks.

    Implements SPEC.md § Logit lens (module docstring), in one forward pass. ``prompt``: one
    prompt (text or token ids). ``layers``: None (all), an int, a slice or a list.
    ``positions``: None (every token), ``"all"``, an int or a list (negative from the end).
    ``target``: the token whose probability is tracked (id or single-token text such as
    ``" Paris"``; default: the model's final top-1 prediction at the last position).
    ``keep_logits=True`` also returns the full ``logits`` (layer, token, vocab).

    Returns a Dataset over (layer, token, k): ``top_ids``, ``top_tokens`` (strings),
    ``top_probs``; over (layer, token): ``target_prob``, ``target_rank`` (0 = top),
    ``kl`` = KL(final ‖ layer) in nats, ``entropy`` (nats), ``final_rank`` (rank of the
    model's own final prediction at that position); coords ``token_str``, ``final_id``,
    ``final_token``; attrs with the SPEC definition, target and soft-capping.

    >>> import oculi_dsl as oculi
    >>> model = oculi.testing.tiny_model("gpt2")
    >>> ds = logit_lens(model, "The capital of France is", positions=[-1], top_k=5)
    >>> float(ds["kl"].isel(layer=-1, token=-1)) < 1e-5   # the last layer is the model itself
    True
    """
    model = check_model(model)
    ids = _encode(model, prompt, "prompt")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= model.info.vocab:
        raise RecipeError(f"top_k={top_k!r} must be an int in 1..{model.info.vocab} (vocab size), "
                          "e.g. top_k=10.")
    layer_sel = layer_list(model, layers)
    pos = index_list("all" if positions is None else positions, len(ids), "positions", "[-1]")
    assert pos is not None
    head = model.hf.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise RecipeError(f"The logit lens needs a linear unembedding, but {model.info.model_id}'s "
                          f"output embeddings are a {type(head).__name__}.")
    tid = token_id(model, target, "target") if target is not None else None
    cap = softcap(model)
    with oculi.trace(model, ids) as t:
        final = t.logits[pos]
        # default target: the model's own final top-1 at the last position, known in the graph
        tgt: Any = torch.tensor(tid) if tid is not None else t.logits[-1].argmax(-1)
        h = t.layers[layer_sel].resid_post[:, pos]
        last = layer_sel.index(model.info.n_layers - 1) if model.info.n_layers - 1 in layer_sel else -1
        out = lens_stats(final_norm_module(model)(h), head.weight, head.bias, final, tgt,
                         top_k, cap, keep_logits, last)
        for i, name in enumerate(NAMES[:8 if keep_logits else 7]):
            out[i].save(name)
        final.argmax(-1).save("final_id")
        if tid is None:
            tgt.save("target")
    saved = {k: v.detach().cpu() for k, v in t.saved.items()}
    tid = int(saved["target"]) if tid is None else tid
    return _dataset(model, ids, saved, layer_sel, pos, tid, cap, top_k)


def _dataset(model: Any, ids: list[int], saved: dict[str, torch.Tensor], layer_sel: list[int],
             pos: list[int], tid: int, cap: float | None, top_k: int) -> xr.Dataset:
    strs = token_strings(model, ids)
    top_ids = saved["top_ids"].numpy()
    vocab_strs = _decoder(model)
    lt = ("layer", "token")
    data: dict[str, Any] = {
        "top_ids": (lt + ("k",), top_ids),
        "top_tokens": (lt + ("k",), np.vectorize(vocab_strs, otypes=[str])(top_ids)),
        "top_probs": (lt + ("k",), saved["top_probs"].float().numpy()),
    }
    for name in NAMES[2:7]:
        data[name] = (lt, saved[name].numpy())
    if "logits" in saved:
        data["logits"] = (lt + ("vocab",), saved["logits"].float().numpy())
    final = saved["final_id"].numpy()
    ds = xr.Dataset(data, coords={
        "layer": layer_sel, "token": pos, "k": np.arange(top_k),
        "token_str": ("token", [strs[i] for i in pos]), "final_id": ("token", final),
        "final_token": ("token", [vocab_strs(i) for i in final])})
    ds.attrs = provenance(model, "logit_lens.logit_lens", DEFINITION, prompt=_text(model, ids),
                          target_id=tid, target_token=vocab_strs(tid),
                          final_logit_softcapping=cap, top_k=top_k)
    return ds


def _decoder(model: Any) -> Any:
    cache: dict[int, str] = {}

    def decode(i: Any) -> str:
        i = int(i)
        if i not in cache:
            cache[i] = token_strings(model, [i])[0]
        return cache[i]
    return decode


def format_predictions(ds: xr.Dataset, token: int = -1, k: int = 3, every: int = 1) -> str:
    """The guide's table: one line per layer, ``Layer 12: [(' Paris', 0.31), …]``.

    ``token`` indexes the dataset's ``token`` dim (-1: the last position it holds); ``k`` how
    many predictions per line; ``every`` shows every n-th layer (the last layer always).
    """
    if not -ds.sizes["token"] <= token < ds.sizes["token"]:
        raise RecipeError(f"token={token} is out of range: this result holds {ds.sizes['token']} "
                          f"positions {list(ds['token'].values)}; index them 0..{ds.sizes['token'] - 1}"
                          " or from the end (-1).")
    sel = ds.isel(token=token)
    n = sel.sizes["layer"]
    lines = []
    for i in range(n):
        if i % max(every, 1) and i != n - 1:
            continue
        row = sel.isel(layer=i)
        pairs = [(str(s), round(float(p), 4)) for s, p in
                 zip(row["top_tokens"].values[:k], row["top_probs"].values[:k], strict=False)]
        lines.append(f"Layer {int(row['layer']):2d}: {pairs}")
    return "\n".join(lines)


def plot_logit_lens(ds: xr.Dataset, path: str | None = None, *, kind: str = "heatmap",
                    token: int = -1) -> Any:
    """Plot a logit-lens result; returns the matplotlib Figure (saved to ``path`` if given).

    ``kind="heatmap"``: top-1 probability per (layer, token), annotated with the top-1 token.
    ``kind="trajectory"``: the target's probability per layer at ``token`` (the guide's plot).
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if kind == "trajectory":
        fig, ax = plt.subplots(figsize=(7, 4))
        traj = ds["target_prob"].isel(token=token)
        ax.plot(ds["layer"].values, traj.values, marker="o")
        ax.set(xlabel="Layer", ylabel=f"P({ds.attrs.get('target_token', 'target')!r})",
               title=f"Logit lens at {str(traj['token_str'].values)!r}: when does the model know?")
        ax.grid(alpha=0.3)
    elif kind == "heatmap":
        probs = ds["top_probs"].isel(k=0).transpose("layer", "token").values
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * probs.shape[1], 1.0 + 0.28 * probs.shape[0]))
        im = ax.imshow(probs, aspect="auto", cmap="Blues", vmin=0, vmax=1, origin="lower")
        words = ds["top_tokens"].isel(k=0).transpose("layer", "token").values
        for (li, ti), word in np.ndenumerate(words):
            ax.text(ti, li, repr(str(word))[1:-1][:8], ha="center", va="center", fontsize=6,
                    color="white" if probs[li, ti] > 0.5 else "black")
        ax.set_xticks(range(probs.shape[1]), [repr(str(s)) for s in ds["token_str"].values],
                      rotation=45, ha="right")
        ax.set_yticks(range(probs.shape[0]), [str(v) for v in ds["layer"].values])
        ax.set(xlabel="Input token", ylabel="Layer", title="Logit lens: top-1 prediction")
        fig.colorbar(im, ax=ax, label="top-1 probability")
    else:
        raise RecipeError(f"kind={kind!r} is not a logit-lens plot: use 'heatmap' or 'trajectory'.")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
