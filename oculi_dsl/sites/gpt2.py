"""GPT-2 site table.

LayerNorm pre-norm decoder with absolute position embeddings and a non-gated GELU MLP
(``c_proj(gelu(c_fc(x)))``). ``embed`` is token + position embedding (the input of the
embedding dropout); ``mlp.pre`` is the MLP's pre-activation, ``mlp.act`` its activation.
"""

from __future__ import annotations

from ._spec import Family, SiteSpec, WeightLayout, attention_sites

TOKEN_MODEL = ("token", "d_model")
TOKEN_NEURON = ("token", "neuron")

GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    layers="transformer.h",
    attention="attn",
    layer_sites={
        "resid_pre": SiteSpec("", "input", TOKEN_MODEL, order=0, doc="layer input"),
        **attention_sites("attn", "c_proj", "conv1d"),
        "attn.out": SiteSpec("attn", "output", TOKEN_MODEL, order=10,
                             doc="attention block output (c_proj), as added to the stream"),
        "resid_mid": SiteSpec("ln_2", "input", TOKEN_MODEL, order=20, write="residual_delta",
                              doc="after attention, before the MLP"),
        "mlp.pre": SiteSpec("mlp.c_fc", "output", TOKEN_NEURON, order=30,
                            doc="MLP pre-activation (c_fc output)"),
        "mlp.act": SiteSpec("mlp.c_proj", "input", TOKEN_NEURON, order=32,
                            doc="gelu(pre), the input of c_proj"),
        "mlp.out": SiteSpec("mlp", "output", TOKEN_MODEL, order=40, doc="MLP output"),
        "resid_post": SiteSpec("", "output", TOKEN_MODEL, order=50, doc="layer output"),
    },
    model_sites={
        "embed": SiteSpec("transformer.drop", "output", TOKEN_MODEL,
                          doc="token + position embeddings"),
        "final_norm": SiteSpec("transformer.ln_f", "output", TOKEN_MODEL,
                               doc="final LayerNorm output"),
        "logits": SiteSpec("", "output", ("token", "vocab"), field="logits", doc="model logits"),
    },
    absent={
        "mlp.gate": "GPT-2's MLP is not gated: use 'mlp.pre' (pre-activation) or 'mlp.act'",
        "mlp.up": "GPT-2's MLP is not gated: use 'mlp.pre' (pre-activation) or 'mlp.act'",
    },
    config_keys={"n_neurons": ("n_inner",)},
    weights=WeightLayout("layer", 0.0, "ln_1", None, True, "c_proj"),
)
