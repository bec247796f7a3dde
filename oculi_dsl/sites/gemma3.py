"""Gemma 3 site table (text decoder: ``gemma3_text``).

Gemma 3 wraps both blocks in extra norms: ``x_mid = x + post_attn_norm(attn(norm(x)))`` and
``x_out = x_mid + post_ff_norm(mlp(pre_ff_norm(x_mid)))``. Following SPEC, ``attn.out`` and
``mlp.out`` are what is added to the stream, so they include those post norms. Embeddings are
scaled by sqrt(d_model) inside the embedding module, so ``embed`` is the scaled value.
"""

from __future__ import annotations

from ._spec import Family, SiteSpec, WeightLayout, attention_sites

TOKEN_MODEL = ("token", "d_model")
TOKEN_NEURON = ("token", "neuron")

GEMMA3 = Family(
    name="gemma3",
    model_types=("gemma3_text",),
    layers="model.layers",
    attention="self_attn",
    layer_sites={
        "resid_pre": SiteSpec("", "input", TOKEN_MODEL, order=0, doc="layer input"),
        **attention_sites("self_attn", "o_proj", "linear"),
        "attn.out": SiteSpec("post_attention_layernorm", "output", TOKEN_MODEL, order=10,
                             doc="attention output after the post-attention norm"),
        "resid_mid": SiteSpec("pre_feedforward_layernorm", "input", TOKEN_MODEL, order=20,
                              write="residual_delta", doc="after attention, before the MLP"),
        "mlp.gate": SiteSpec("mlp.gate_proj", "output", TOKEN_NEURON, order=30,
                             doc="gate projection"),
        "mlp.up": SiteSpec("mlp.up_proj", "output", TOKEN_NEURON, order=31, doc="up projection"),
        "mlp.act": SiteSpec("mlp.down_proj", "input", TOKEN_NEURON, order=32,
                            doc="gelu(gate) * up, the input of down_proj"),
        "mlp.out": SiteSpec("post_feedforward_layernorm", "output", TOKEN_MODEL, order=40,
                            doc="MLP output after the post-feedforward norm"),
        "resid_post": SiteSpec("", "output", TOKEN_MODEL, order=50, doc="layer output"),
    },
    model_sites={
        "embed": SiteSpec("model.embed_tokens", "output", TOKEN_MODEL,
                          doc="token embeddings, scaled by sqrt(d_model)"),
        "final_norm": SiteSpec("model.norm", "output", TOKEN_MODEL, doc="final RMSNorm output"),
        "logits": SiteSpec("", "output", ("token", "vocab"), field="logits",
                           doc="model logits (after soft-capping, when configured)"),
    },
    absent={"mlp.pre": "Gemma 3 MLPs are gated: use 'mlp.gate' and 'mlp.up'"},
    config_keys={"n_neurons": ("intermediate_size",)},
    weights=WeightLayout("rms", 1.0, "input_layernorm", "post_attention_layernorm", False, "o_proj"),
)
