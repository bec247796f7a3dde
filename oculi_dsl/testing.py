"""Tiny random-weight models for tests: real HF architectures, no download, built in milliseconds.

:func:`tiny_model` builds a Llama (GQA), Gemma 3 (MQA, sliding + full attention, head_dim ≠
d_model / heads) or GPT-2 model from a small config, seeded so that two calls give identical
weights. :func:`tiny_tokenizer` trains a byte-level BPE on an embedded English corpus at first
use, so prompts like "The capital of France is" tokenize into readable pieces (" capital").
The weights are random: the structure, shapes and code paths are real, the predictions are not.

>>> from oculi_dsl.testing import tiny_model
>>> tiny_model("gemma3").info.n_kv_heads
1
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .errors import ModelError, did_you_mean
from .models import OculiModel

__all__ = ["FAMILIES", "tiny_model", "tiny_tokenizer"]

FAMILIES: tuple[str, ...] = ("llama", "gemma3", "gpt2")

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
# Order fixes the ids: <pad>=0, <s>=1, </s>=2.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS)
VOCAB_SIZE = 512

# Llama-style models prepend BOS; GPT-2 never did.
_FAMILY_BOS: dict[str, bool] = {"llama": True, "gemma3": True, "gpt2": False}

_CORPUS = """\
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
The capital of Spain is Madrid. The capital of Japan is Tokyo. The capital of England is London.
Paris is a city in France, and the Eiffel Tower is in Paris. Berlin is a city in Germany.
The Eiffel Tower is in Paris. The Colosseum is in Rome. Big Ben is in London.
When Mary and John went to the store, John gave a drink to Mary.
When Alice and Bob went to the park, Bob gave a ball to Alice.
Once upon a time, there was a little girl who lived in a small house near the forest.
Once upon a time, a young king ruled a quiet country by the sea.
Every morning she walked to the river to watch the water and listen to the birds.
One day she found an old key under a stone. She picked it up and put it in her pocket.
The key opened a door in the garden wall, and behind the door there was a secret garden.
The sun was warm, the sky was blue, and the flowers were red, yellow and white.
She told her mother about the garden, and her mother smiled and said nothing.
The quick brown fox jumps over the lazy dog. The dog was not happy about it.
A cat sat on the mat. The cat was black and the mat was green.
Numbers: one, two, three, four, five, six, seven, eight, nine, ten. 1 2 3 4 5 6 7 8 9 10.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the days of the week.
January, February, March, April, May, June, July, August, September, October, November, December.
The scientist measured the temperature of the water and wrote the number in her notebook.
The model reads the text, one token at a time, and predicts the next word.
The teacher asked the students a question, and the answer was correct.
If it rains tomorrow, we will stay at home and read a book by the fire.
He was tired after the long day, so he went to bed early and slept well.
The train to London leaves at nine o'clock from the station near the market.
Water is wet, fire is hot, ice is cold, and the night is dark.
The doctor said that the patient should drink more water and walk every day.
They built a bridge over the river so that the people could cross it safely.
My favourite colour is blue, and my brother's favourite colour is green.
"""


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """Train the byte-level BPE once per process; the JSON is immutable, so it can be shared."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, so any text (not only the corpus) encodes without unknowns.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    return tok.to_str()


def tiny_tokenizer(bos: bool = True) -> Any:
    """A fresh ``PreTrainedTokenizerFast`` over the embedded BPE (~512 tokens).

    ``bos=True`` prepends ``<s>`` to every encoded text (Llama, Gemma); ``bos=False`` adds
    nothing (GPT-2). Pad is ``<pad>`` (id 0), BOS ``<s>`` (1), EOS ``</s>`` (2). Each call returns
    a new object, so changing ``padding_side`` on one does not leak into other tests.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_trained_tokenizer_json())
    if bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=None
    )


def _token_ids(tokenizer: Any) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _llama(vocab: int, n_layers: int) -> tuple[str, str, dict[str, Any]]:
    return "LlamaForCausalLM", "LlamaConfig", {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }


def _gemma3(vocab: int, n_layers: int) -> tuple[str, str, dict[str, Any]]:
    # Alternate so that any model with 2+ layers has both kinds, ending the pattern on full
    # attention the way the real Gemma 3 does.
    layer_types = ["full_attention" if i % 2 else "sliding_attention" for i in range(n_layers)]
    return "Gemma3ForCausalLM", "Gemma3TextConfig", {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        # A window shorter than test prompts, so sliding and full layers really differ.
        "sliding_window": 4,
        "layer_types": layer_types,
        "query_pre_attn_scalar": 32,
        "max_position_embeddings": 256,
        # None, as in the released Gemma 3 270M: logits are not soft-capped.
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    }


def _gpt2(vocab: int, n_layers: int) -> tuple[str, str, dict[str, Any]]:
    return "GPT2LMHeadModel", "GPT2Config", {
        "vocab_size": vocab,
        "n_embd": 64,
        "n_layer": n_layers,
        "n_head": 4,
        "n_positions": 256,
    }


_BUILDERS = {"llama": _llama, "gemma3": _gemma3, "gpt2": _gpt2}


def tiny_model(
    family: str = "llama", *, seed: int = 0, n_layers: int = 4, **config_overrides: Any
) -> OculiModel:
    """A tiny random-weight model of ``family`` ("llama", "gemma3" or "gpt2"), fp32, eval mode.

    Sizes: d_model 64, 4 heads, 128 MLP neurons (GPT-2: 256), vocab = the tiny tokenizer's.
    ``config_overrides`` go to the HF config (e.g. ``num_key_value_heads=4``). The same ``seed``
    gives the same weights; the caller's global torch RNG state is left untouched.
    """
    builder = _BUILDERS.get(family)
    if builder is None:
        raise ModelError(
            f"Unknown tiny model family {family!r}. Valid families: {', '.join(FAMILIES)}."
            f"{did_you_mean(family, FAMILIES)} Example: oculi.testing.tiny_model('llama')."
        )
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ModelError(
            f"n_layers must be a positive int, got {n_layers!r}. Use e.g. n_layers=4 "
            "(gemma3 needs n_layers >= 2 to have both sliding and full attention layers)."
        )
    tokenizer = tiny_tokenizer(bos=_FAMILY_BOS[family])
    import transformers

    model_name, config_name, defaults = builder(len(tokenizer), n_layers)
    config = getattr(transformers, config_name)(
        **{**defaults, **_token_ids(tokenizer), **config_overrides}
    )
    model_cls = getattr(transformers, model_name)
    # fork_rng: seeding must not reset the RNG of the test that asked for a model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf_model = model_cls(config)
    hf_model.to(torch.float32).eval()
    return OculiModel(hf_model, tokenizer, model_id=f"tiny-{family}")
