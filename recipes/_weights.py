"""Reading weights for the weight-based recipes (DLA's unembedding, composition's W_QK / W_OV).

Weights are read from ``model.hf`` (no hooks). What differs between families is data in the
family's site table (``model.family.weights``, a :class:`oculi_dsl.sites.WeightLayout`): the kind of norm (RMSNorm or LayerNorm), how its weight is used (γ = w, or 1 + w for Gemma),
which module is the attention input norm, whether a post-attention norm sits between the
output projection and the stream (Gemma 3), and how Q/K/V are stored (separate ``nn.Linear``
or GPT-2's fused ``Conv1D``).

Per-head matrices follow SPEC.md's row-vector convention (D = head_dim, n = H / H_kv,
g(h) = h // n): ``W_Q[h] = q_proj.W[hD:(h+1)D, :]ᵀ`` (d × D), ``W_K[h]``, ``W_V[h]`` from KV
head g(h), ``W_O[h] = o_proj.W[:, hD:(h+1)D]ᵀ`` (D × d).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from oculi_dsl.sites import WeightLayout

from ._errors import RecipeError

FamilyWeights = WeightLayout  # the per-family table lives with the site tables (oculi_dsl.sites)


def family_weights(model: Any) -> FamilyWeights:
    spec = model.family.weights
    if spec is None:
        raise RecipeError(f"The {model.family.name!r} site table has no weight layout, which "
                          "weight-based recipes need. Add `weights=WeightLayout(...)` to its table.")
    return spec


def _eps(module: torch.nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise RecipeError(f"Cannot find the epsilon of the norm {type(module).__name__} "
                      "(looked for variance_epsilon, eps, epsilon).")


@dataclass(frozen=True)
class Norm:
    """A norm's parameters in float64: γ (offset applied), β (LayerNorm) and ε."""

    kind: str
    gamma: torch.Tensor
    beta: torch.Tensor | None
    eps: float

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """σ of each row of x (…, d): sqrt(mean(x²) + ε) for RMSNorm, sqrt(var(x) + ε) else."""
        x = x.double()
        if self.kind == "layer":
            return (x.var(-1, unbiased=False) + self.eps).sqrt()
        return (x.pow(2).mean(-1) + self.eps).sqrt()

    def center(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm subtracts each row's mean; RMSNorm does not."""
        return x - x.mean(-1, keepdim=True) if self.kind == "layer" else x


def _norm(module: Any, spec: FamilyWeights) -> Norm:
    weight = module.weight.detach().double().cpu()
    bias = getattr(module, "bias", None)
    beta = bias.detach().double().cpu() if isinstance(bias, torch.Tensor) else None
    return Norm(spec.norm, spec.offset + weight, beta, _eps(module))


def final_norm(model: Any) -> Norm:
    """The final norm (γ with Gemma's 1 + w, β for LayerNorm, ε)."""
    spec = family_weights(model)
    return _norm(model.hf.get_submodule(model.family.model_sites["final_norm"].module), spec)


def input_norm(model: Any, layer: int) -> Norm:
    spec = family_weights(model)
    return _norm(model.layers[layer].get_submodule(spec.input_norm), spec)


def post_attn_norm(model: Any, layer: int) -> Norm | None:
    spec = family_weights(model)
    if spec.post_attn_norm is None:
        return None
    return _norm(model.layers[layer].get_submodule(spec.post_attn_norm), spec)


def unembedding(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W_U (vocab, d) and the lm_head bias (or None), float64 on the CPU."""
    head = model.hf.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return (head.weight.detach().double().cpu(),
            bias.detach().double().cpu() if isinstance(bias, torch.Tensor) else None)


def _attn(model: Any, layer: int) -> Any:
    return model.layers[layer].get_submodule(model.family.attention)


def o_proj_bias(model: Any, layer: int) -> torch.Tensor | None:
    attn = _attn(model, layer)
    proj = attn.get_submodule(family_weights(model).out_proj)
    bias = getattr(proj, "bias", None)
    return bias.detach().double().cpu() if isinstance(bias, torch.Tensor) else None


def head_weights(model: Any, layer: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Raw per-head matrices of one layer: W_Q, W_K, W_V (H, d, D), W_O (H, D, d).

    W_K and W_V are already expanded to query heads (sibling heads of a KV group share the
    same matrix, g(h) = h // (H / H_kv), as HF ``repeat_kv``).
    """
    info = model.info
    h, kv, dh, d = info.n_heads, info.n_kv_heads, info.d_head, info.d_model
    attn = _attn(model, layer)
    if family_weights(model).fused_qkv:
        w = attn.c_attn.weight.detach().to("cpu", dtype)  # (d, 3·H·D), x @ w
        wq, wk, wv = (w[:, i * h * dh:(i + 1) * h * dh].reshape(d, h, dh).permute(1, 0, 2)
                      for i in range(3))
        wo = attn.c_proj.weight.detach().to("cpu", dtype).reshape(h, dh, d)
        return {"W_Q": wq, "W_K": wk, "W_V": wv, "W_O": wo}
    group = torch.arange(h) // (h // kv)
    wq = attn.q_proj.weight.detach().to("cpu", dtype).reshape(h, dh, d).transpose(1, 2)
    wk = attn.k_proj.weight.detach().to("cpu", dtype).reshape(kv, dh, d).transpose(1, 2)[group]
    wv = attn.v_proj.weight.detach().to("cpu", dtype).reshape(kv, dh, d).transpose(1, 2)[group]
    wo = attn.o_proj.weight.detach().to("cpu", dtype).reshape(d, h, dh).permute(1, 2, 0)
    return {"W_Q": wq, "W_K": wk, "W_V": wv, "W_O": wo}


def folded_head_weights(model: Any, layer: int,
                        dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Per-head matrices with the norms folded in, as composition scores read them.

    * the layer's input-norm γ scales the rows of W_Q, W_K and W_V (SPEC: fold γ, 1 + w on
      Gemma); the norm's division by σ is a per-token scalar and cancels in the scores;
    * per-head q_norm / k_norm weights (Gemma 3, Qwen3) scale the columns of W_Q / W_K (their
      σ is again a scalar per token and head);
    * a post-attention norm's γ (Gemma 3) scales the columns of W_O, since the head's write
      reaches the stream through it;
    * LayerNorm families: W_O is centred over d_model (what the next LayerNorm's centring does
      to the head's write, TransformerLens ``center_writing_weights``).
    Biases are ignored (they are not part of W_QK / W_OV), as is rotary.
    """
    spec = family_weights(model)
    w = head_weights(model, layer, torch.float64)
    gamma = input_norm(model, layer).gamma
    for key in ("W_Q", "W_K", "W_V"):
        w[key] = gamma[None, :, None] * w[key]
    attn = _attn(model, layer)
    for key, name in (("W_Q", "q_norm"), ("W_K", "k_norm")):
        weight: Any = getattr(getattr(attn, name, None), "weight", None)
        if isinstance(weight, torch.Tensor):  # per-head q_norm / k_norm (Gemma 3, Qwen3)
            w[key] = w[key] * (spec.offset + weight.detach().double().cpu())
    post = post_attn_norm(model, layer)
    if post is not None:
        w["W_O"] = w["W_O"] * post.gamma
    if spec.norm == "layer":
        w["W_O"] = w["W_O"] - w["W_O"].mean(-1, keepdim=True)
    return {k: v.to(dtype) for k, v in w.items()}
