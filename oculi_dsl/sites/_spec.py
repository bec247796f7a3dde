"""The declarative vocabulary: what a site is and how a model family maps the vocabulary.

A :class:`SiteSpec` says where one canonical site lives inside one architecture (which module,
its input or its output), which labelled dims its value has, and how an edit to it flows on.
A :class:`Family` is one small table of such specs plus the config keys that give the model's
sizes. The tables in this package hold all the architecture knowledge the executor uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Where = Literal["input", "output", "attention", "result"]
WriteMode = Literal["replace", "residual_delta"]


@dataclass(frozen=True)
class SiteSpec:
    """Where a canonical site lives in one architecture.

    ``module`` is a dotted path relative to the decoder layer (layer sites) or to the root
    model (model sites; ``""`` is the root). ``where`` picks the module's first input or its
    output (the first element of a tuple output, or ``field`` of a ``ModelOutput``).
    ``write="residual_delta"`` marks a value that HF also keeps as the residual inside the
    layer (``resid_mid``): an edit replaces the module input and adds the same change to the
    layer output, so the stream downstream sees the edited value.
    """

    module: str
    where: Where
    dims: tuple[str, ...]
    order: int = 0
    field: str | None = None
    write: WriteMode = "replace"
    doc: str = ""


@dataclass(frozen=True)
class WeightLayout:
    """How a family stores the weights that weight-based analyses read.

    ``norm`` is ``"rms"`` or ``"layer"``; the norm's scale is ``offset + weight`` (Gemma stores
    w and uses 1 + w); ``input_norm`` / ``post_attn_norm`` are paths relative to the decoder
    layer (``post_attn_norm`` sits between the output projection and the stream, Gemma 3);
    ``fused_qkv`` marks GPT-2's ``c_attn`` Conv1D (d × 3d) instead of separate q/k/v Linears;
    ``out_proj`` is the attention output projection, relative to the attention module.
    """

    norm: str
    offset: float
    input_norm: str
    post_attn_norm: str | None
    fused_qkv: bool
    out_proj: str


@dataclass(frozen=True)
class Family:
    """One architecture family's site table and config vocabulary."""

    name: str
    model_types: tuple[str, ...]
    layers: str
    attention: str
    layer_sites: dict[str, SiteSpec]
    model_sites: dict[str, SiteSpec]
    absent: dict[str, str] = field(default_factory=dict)
    config_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    weights: WeightLayout | None = None
    notes: str = ""


def attention_sites(attn: str, out_proj: str, layout: str) -> dict[str, SiteSpec]:
    """The attention-internal sites every family shares (DESIGN §4).

    q/k/v/scores/pattern/z are produced inside the attention function that HF calls through
    its attention interface, so ``where="attention"`` and ``field`` names the tensor there.
    ``attn.result`` is computed from the output projection's input and weight (``layout`` is
    ``"linear"`` for ``nn.Linear`` weights (out, in) or ``"conv1d"`` for GPT-2's (in, out)).
    """
    hq, hk, hqk = ("head", "token", "d_head"), ("kv_head", "token", "d_head"), ("head", "query", "key")
    return {
        "attn.q": SiteSpec(attn, "attention", hq, order=2, field="q",
                           doc="queries after rotary (and q_norm)"),
        "attn.k": SiteSpec(attn, "attention", hk, order=3, field="k",
                           doc="keys after rotary (and k_norm), per KV head"),
        "attn.v": SiteSpec(attn, "attention", hk, order=4, field="v", doc="values, per KV head"),
        "attn.scores": SiteSpec(attn, "attention", hqk, order=5, field="scores",
                                doc="pre-softmax logits, scaled, soft-capped, masked"),
        "attn.pattern": SiteSpec(attn, "attention", hqk, order=6, field="pattern",
                                 doc="softmax weights; rows sum to 1"),
        "attn.z": SiteSpec(attn, "attention", ("token", "head", "d_head"), order=7, field="z",
                           doc="per-head mix of values, input of the output projection"),
        "attn.result": SiteSpec(f"{attn}.{out_proj}", "result", ("token", "head", "d_model"),
                                order=8, field=layout,
                                doc="each head's write into the stream, z_h · W_O^h"),
    }
