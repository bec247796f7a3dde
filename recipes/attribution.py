"""Direct logit attribution: how much each component writes the target's logit directly.

The residual stream at the last layer is a sum, x_L = embed + Σ_l (a_l + m_l); the logit is
(roughly) x_L · W_U[t]. The final norm divides by the run's own RMS σ_p (and LayerNorm also
centres). Freezing σ_p at its actual value makes the logit an exact sum of one term per
component, so the terms add up to the model's logit instead of being a loose approximation.

Implements SPEC.md § Direct logit attribution: σ_p = sqrt(mean(x_L[p]²) + ε) (LayerNorm:
sqrt(var(x_L[p]) + ε) and each component centred), u = γ ⊙ W_U[t] (γ = 1 + w for Gemma;
u = γ ⊙ (W_U[t] − W_U[t2]) for a logit difference), DLA(c) = c[p] · u / σ_p, plus the bias
term (lm_head bias, and b_ln · W_U[t] for LayerNorm). Identity: Σ_c DLA(c) + bias = logit.
Everything comes from ONE traced forward pass (embed, every attn.out / mlp.out, attn.result
for per-head terms, the last resid_post, logits).

Per-head terms on Gemma 3. Its a_l is ``post_attention_layernorm(Σ_h z_h W_O^h)``: the heads'
writes pass through a second RMSNorm before they reach the stream. SPEC's per-head term
z_h W_O^h lives before that norm, so it cannot be unembedded directly. We freeze that norm's
scale too (σ of the actual o_proj output at p, γ = 1 + w) — the same trick SPEC uses for the
final norm — so head h writes ``(z_h W_O^h) ⊙ γ_post / σ_post`` into the stream. These terms
are exact given the run (they sum to the layer's attn term to float tolerance), but, like all
frozen-scale attributions, they describe this run, not what a head would do alone.

Logit soft-capping (``final_logit_softcapping``) is non-linear: when a model has it, the
attributed quantity is the pre-cap logit, reported as ``logit`` (computed from final_norm).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

import oculi_dsl as oculi

from ._common import check_model, encode, is_single, provenance, token_id
from ._errors import RecipeError
from ._weights import final_norm, o_proj_bias, post_attn_norm, unembedding

__all__ = ["component_attribution", "direct_logit_attribution"]

DEFINITION = ("SPEC.md § Direct logit attribution (frozen final-norm scale σ_p, u = γ ⊙ W_U[t], "
              "DLA(c) = c[p]·u/σ_p, LayerNorm: centred components + bias term)")


def _ids(model: Any, token: Any, n_prompts: int, what: str) -> torch.Tensor:
    if isinstance(token, (list, tuple)):
        if len(token) != n_prompts:
            raise RecipeError(f"{what} has {len(token)} entries for {n_prompts} prompts; give one "
                              f"{what} for all prompts or exactly one per prompt.")
        return torch.tensor([token_id(model, x, what) for x in token])
    return torch.full((n_prompts,), token_id(model, token, what))


def _softcap(model: Any) -> float | None:
    config = getattr(model.hf.config, "text_config", None) or model.hf.config
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def direct_logit_attribution(model: Any, prompt: Any, target: int | str | Sequence[Any], *,
                             wrong: int | str | Sequence[Any] | None = None, position: int = -1,
                             per_head: bool = True) -> xr.Dataset:
    """Direct logit attribution of ``target`` (or ``target − wrong``) at ``position``.

    Implements SPEC.md § Direct logit attribution (see the module docstring for Gemma's
    per-head terms and soft-capping). ``prompt`` is a string, token ids or a list of prompts
    (left-padded, so ``position=-1`` is every prompt's last token; other positions index the
    padded batch). ``target`` / ``wrong`` are token ids or single-token texts (" Paris"), one
    for all prompts or one per prompt.

    Returns a Dataset (with a leading ``prompt`` dim for a list of prompts):

    * ``dla`` (component): ``embed``, then ``L{l}.attn`` and ``L{l}.mlp`` for every layer,
      with coords ``component_layer`` (-1 for embed) and ``component_kind``;
    * ``head_dla`` (layer, head) and ``head_bias`` (layer): each head's term and the o_proj
      bias share, which sum to that layer's attn term (``per_head=True``);
    * ``bias`` (lm_head bias and LayerNorm β term), ``total`` = Σ dla + bias, ``logit`` (the
      model's actual logit or logit difference; pre-cap under soft-capping) and ``scale`` σ_p.

    >>> import oculi_dsl as oculi
    >>> model = oculi.testing.tiny_model("llama")
    >>> ds = direct_logit_attribution(model, "The capital of France is", " Paris")
    >>> abs(float(ds["total"] - ds["logit"])) < 1e-4
    True
    """
    model = check_model(model)
    ids = encode(model, prompt)
    single = is_single(prompt)
    width = max(len(r) for r in ids)
    if isinstance(position, bool) or not isinstance(position, int) or not -width <= position < width:
        raise RecipeError(f"position={position!r} is out of range for {width} tokens: valid "
                          f"positions are 0..{width - 1} or -{width}..-1.")
    target_ids = _ids(model, target, len(ids), "target")
    wrong_ids = None if wrong is None else _ids(model, wrong, len(ids), "wrong")
    cap = _softcap(model)
    with oculi.trace(model, prompt) as t:
        t.embed[..., position, :].save("embed")
        t.layers[:].attn.out[..., position, :].save("attn")
        t.layers[:].mlp.out[..., position, :].save("mlp")
        if per_head:
            t.layers[:].attn.result[..., position, :, :].save("result")
        t.layers[-1].resid_post[..., position, :].save("x_L")
        if cap is not None:
            t.final_norm[..., position, :].save("normed")
        t.logits[..., position, :].save("logits")
    saved = {k: v.detach().cpu().double() for k, v in t.saved.items()}
    if single:  # give every value a prompt dim: (prompt, ...) and (layer, prompt, ...)
        saved = {k: v.unsqueeze(1 if k in ("attn", "mlp", "result") else 0) for k, v in saved.items()}

    norm = final_norm(model)
    w_u, b_u = unembedding(model)
    direction = w_u[target_ids] - (w_u[wrong_ids] if wrong_ids is not None else 0.0)  # (P, d)
    u = norm.gamma * direction
    bias = torch.zeros(len(ids), dtype=torch.float64)
    if b_u is not None:
        bias = bias + b_u[target_ids] - (b_u[wrong_ids] if wrong_ids is not None else 0.0)
    if norm.beta is not None:
        bias = bias + direction @ norm.beta
    sigma = norm.scale(saved["x_L"])  # (P,)

    def dla(c: torch.Tensor) -> torch.Tensor:  # c (..., P, d) → (..., P)
        return (norm.center(c) * u).sum(-1) / sigma

    embed, attn, mlp = dla(saved["embed"]), dla(saved["attn"]), dla(saved["mlp"])
    logits = saved["logits"]
    if cap is not None:
        logits = saved["normed"] @ w_u.T + (b_u if b_u is not None else 0.0)
    rows = torch.arange(len(ids))
    logit = logits[rows, target_ids] - (logits[rows, wrong_ids] if wrong_ids is not None else 0.0)
    n_layers = model.info.n_layers
    components = ["embed"] + [f"L{i}.{k}" for i in range(n_layers) for k in ("attn", "mlp")]
    flat = torch.cat([embed[None], torch.stack([attn, mlp], 1).reshape(2 * n_layers, -1)])
    data: dict[str, Any] = {
        "dla": (("component", "prompt"), flat.numpy()),
        "bias": (("prompt",), bias.numpy()),
        "total": (("prompt",), (flat.sum(0) + bias).numpy()),
        "logit": (("prompt",), logit.numpy()),
        "scale": (("prompt",), sigma.numpy()),
    }
    coords: dict[str, Any] = {
        "component": components,
        "component_layer": ("component", [-1] + [i for i in range(n_layers) for _ in range(2)]),
        "component_kind": ("component", ["embed"] + ["attn", "mlp"] * n_layers),
        "layer": np.arange(n_layers),
    }
    if per_head:
        head_dla, head_bias = _head_terms(model, saved["result"], dla)
        data["head_dla"] = (("layer", "prompt", "head"), head_dla.numpy())
        data["head_bias"] = (("layer", "prompt"), head_bias.numpy())
        coords["head"] = np.arange(model.info.n_heads)
    ds = xr.Dataset(data, coords=coords)
    if single:
        ds = ds.isel(prompt=0, drop=True)
    else:
        ds = ds.assign_coords(prompt=np.arange(len(ids)), prompt_text=("prompt", t.result.attrs["prompts"]))
        ds = ds.transpose("prompt", ...)
    tok = model.tokenizer
    ds.attrs = provenance(
        model, "attribution.direct_logit_attribution", DEFINITION,
        prompts=t.result.attrs["prompts"], position=position,
        target_ids=target_ids.tolist(), wrong_ids=None if wrong_ids is None else wrong_ids.tolist(),
        target_tokens=[tok.decode([i]) for i in target_ids.tolist()] if tok is not None else [],
        wrong_tokens=([tok.decode([i]) for i in wrong_ids.tolist()]
                      if tok is not None and wrong_ids is not None else []),
        norm=norm.kind, logit_softcapping=cap,
        note=("per-head terms use the frozen post-attention norm scale (Gemma 3)"
              if post_attn_norm(model, 0) is not None else "per-head terms are z_h W_O^h"))
    return ds


def _head_terms(model: Any, result: torch.Tensor, dla: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head DLA (layer, P, H) and the o_proj-bias term (layer, P) for every layer."""
    heads, biases = [], []
    n_prompts = result.shape[1]
    for layer in range(model.info.n_layers):
        r = result[layer]  # (P, H, d): z_h W_O^h at the position
        b = o_proj_bias(model, layer)
        b = torch.zeros(r.shape[-1], dtype=torch.float64) if b is None else b
        post = post_attn_norm(model, layer)
        if post is not None:  # freeze the post-attention norm's scale of this run
            gain = post.gamma / post.scale(r.sum(1) + b)[:, None]  # (P, d)
            r = r * gain[:, None, :]
            b = b * gain
        heads.append(dla(r.transpose(0, 1)).transpose(0, 1))  # (P, H)
        biases.append(dla(b.expand(n_prompts, -1)))
    return torch.stack(heads), torch.stack(biases)


def component_attribution(model: Any, prompt: Any, target: int | str | Sequence[Any], *,
                          wrong: int | str | Sequence[Any] | None = None,
                          position: int = -1) -> xr.Dataset:
    """Per-layer attention vs MLP direct logit attribution, (layer, component ∈ {attn, mlp}).

    Implements SPEC.md § Direct logit attribution, "Component attribution per layer":
    ``attribution`` (layer, component) = (DLA(a_l), DLA(m_l)) with the frozen final-norm scale,
    plus ``embed`` (the embedding term as its own entry), ``bias``, ``total`` and ``logit``
    (Σ attribution + embed + bias = logit). One forward pass; same arguments as
    :func:`direct_logit_attribution`.

    >>> import oculi_dsl as oculi
    >>> ds = component_attribution(oculi.testing.tiny_model("gpt2"), "Once upon a", " time")
    >>> ds["attribution"].dims, ds.component.values.tolist()
    (('layer', 'component'), ['attn', 'mlp'])
    """
    model = check_model(model)
    full = direct_logit_attribution(model, prompt, target, wrong=wrong, position=position,
                                    per_head=False)
    layered = full["dla"].isel(component=slice(1, None))
    extra = [d for d in layered.dims if d != "component"]
    values = layered.values if not extra else np.moveaxis(layered.values, layered.dims.index("component"), -1)
    values = values.reshape(values.shape[:-1] + (model.info.n_layers, 2))
    dims = (*extra, "layer", "component")
    ds = xr.Dataset(
        {"attribution": (dims, values),
         "embed": full["dla"].isel(component=0, drop=True).drop_vars(
             ["component_layer", "component_kind"], errors="ignore"),
         "bias": full["bias"], "total": full["total"], "logit": full["logit"]},
        coords={"layer": full["layer"].values, "component": ["attn", "mlp"]},
    )
    if "prompt" in full.coords:
        ds = ds.assign_coords(prompt=full["prompt"], prompt_text=full["prompt_text"])
    ds.attrs = {**full.attrs, "recipe": "oculi_dsl.recipes.attribution.component_attribution",
                "definition": DEFINITION + "; component attribution per layer (layer, component)"}
    return ds
