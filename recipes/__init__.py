"""Reusable analyses built only on the public oculi-dsl API (installed as ``oculi_dsl.recipes``).

Each recipe returns one ``xarray.Dataset`` and names, in its docstring, the exact definition
it implements (``SPEC``): logit lens, activation patching, causal tracing, attention entropy,
head scores and classification, direct logit / component attribution, composition scores.

>>> import oculi_dsl as oculi
>>> from oculi_dsl.recipes import logit_lens
>>> ds = logit_lens(oculi.testing.tiny_model("llama"), "The capital of France is", top_k=3)
>>> ds["top_probs"].dims
('layer', 'token', 'k')
"""

from ._reports import plot_recovery, recovery_matrix, summary, top_cells
from .attribution import component_attribution, direct_logit_attribution
from .causal_trace import causal_trace
from .composition import composition_scores, induction_circuits, random_baseline
from .entropy import attention_entropy, pattern_entropy
from .head_scores import masked_score, rrt_scores, text_scores
from .heads import classify_heads, detect_heads, head_scores, random_repeated_tokens
from .logit_lens import format_predictions, logit_lens, plot_logit_lens
from .patching import activation_patching

__all__ = [
    "activation_patching",
    "attention_entropy",
    "causal_trace",
    "classify_heads",
    "component_attribution",
    "composition_scores",
    "detect_heads",
    "direct_logit_attribution",
    "format_predictions",
    "head_scores",
    "induction_circuits",
    "logit_lens",
    "masked_score",
    "pattern_entropy",
    "plot_logit_lens",
    "plot_recovery",
    "random_baseline",
    "random_repeated_tokens",
    "recovery_matrix",
    "rrt_scores",
    "summary",
    "text_scores",
    "top_cells",
]
