"""Llama-family site table (Llama 2/3, SmolLM, Mistral, Qwen2/Qwen3).

Pre-norm decoder: ``x_mid = x + attn(norm(x))``, ``x_out = x_mid + mlp(norm(x_mid))``, with a
gated SiLU MLP (``down(act(gate(x)) * up(x))``). ``resid_mid`` is the input of
``post_attention_layernorm``.
"""

from __future__ import annotations

from ._spec import Family, SiteSpec, WeightLayout, attention_sites

TOKEN_MODEL = ("token", "d_model")
TOKEN_NEURON = ("token", "neuron")

LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "smollm", "smollm3"),
    layers="model.layers",
    attention="self_attn",
    layer_sites={
        "resid_pre": SiteSpec("", "input", TOKEN_MODEL, order=0, doc="layer input"),
        **attention_sites("self_attn", "o_proj", "linear"),
        "attn.out": SiteSpec("self_attn", "output", TOKEN_MODEL, order=10,
                             doc="attention block output (o_proj), as added to the stream"),
        "resid_mid": SiteSpec("post_attention_layernorm", "input", TOKEN_MODEL, order=20,
                              write="residual_delta", doc="after attention, before the MLP"),
        "mlp.gate": SiteSpec("mlp.gate_proj", "output", TOKEN_NEURON, order=30,
                             doc="gate projection"),
        "mlp.up": SiteSpec("mlp.up_proj", "output", TOKEN_NEURON, order=31, doc="up projection"),
        "mlp.act": SiteSpec("mlp.down_proj", "input", TOKEN_NEURON, order=32,
                            doc="act(gate) * up, the input of down_proj"),
        "mlp.out": SiteSpec("mlp", "output", TOKEN_MODEL, order=40, doc="MLP output"),
        "resid_post": SiteSpec("", "output", TOKEN_MODEL, order=50, doc="layer output"),
    },
    model_sites={
        "embed": SiteSpec("model.embed_tokens", "output", TOKEN_MODEL, doc="token embeddings"),
        "final_norm": SiteSpec("model.norm", "output", TOKEN_MODEL, doc="final RMSNorm output"),
        "logits": SiteSpec("", "output", ("token", "vocab"), field="logits", doc="model logits"),
    },
    absent={"mlp.pre": "Llama-family MLPs are gated: use 'mlp.gate' and 'mlp.up'"},
    config_keys={"n_neurons": ("intermediate_size",)},
    weights=WeightLayout("rms", 0.0, "input_layernorm", None, False, "o_proj"),
)
