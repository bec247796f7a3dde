"""Tests of the tiny random-weight models and their embedded tokenizer."""

from __future__ import annotations

import pytest
import torch

from oculi_dsl.errors import ModelError
from oculi_dsl.models import OculiModel
from oculi_dsl.testing import FAMILIES, tiny_model, tiny_tokenizer

PROMPT = "The capital of France is"


def test_each_family_builds_and_runs(tiny: OculiModel) -> None:
    enc = tiny.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = tiny.hf(**enc).logits
    assert logits.shape == (1, enc.input_ids.shape[1], len(tiny.tokenizer))
    assert torch.isfinite(logits).all()
    assert not tiny.hf.training
    assert next(tiny.hf.parameters()).dtype == torch.float32
    assert tiny.hf.config._attn_implementation == "sdpa"
    assert tiny.info.model_id == f"tiny-{tiny.info.family}"


def test_config_token_ids_match_tokenizer(tiny: OculiModel) -> None:
    config, tok = tiny.hf.config, tiny.tokenizer
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert config.vocab_size == len(tok)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_weights(family: str) -> None:
    a, b = tiny_model(family, seed=3), tiny_model(family, seed=3)
    other = tiny_model(family, seed=4)
    for (name, pa), pb in zip(a.hf.named_parameters(), b.hf.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(p, q) for p, q in
                   zip(a.hf.parameters(), other.hf.parameters(), strict=True))


def test_seeding_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model("llama", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_architecture_details() -> None:
    llama = tiny_model("llama").hf.config
    assert (llama.num_attention_heads, llama.num_key_value_heads) == (4, 2)
    assert not llama.tie_word_embeddings
    gemma = tiny_model("gemma3").hf.config
    assert (gemma.num_key_value_heads, gemma.head_dim, gemma.hidden_size) == (1, 32, 64)
    assert set(gemma.layer_types) == {"sliding_attention", "full_attention"}
    assert gemma.sliding_window == 4
    assert tiny_model("gpt2").hf.config.n_positions == 256


def test_overrides_and_layers() -> None:
    model = tiny_model("llama", n_layers=2, num_key_value_heads=4)
    assert model.info.n_layers == 2
    assert model.info.n_kv_heads == 4


def test_bad_family_and_layers() -> None:
    with pytest.raises(ModelError, match="Did you mean 'gemma3'"):
        tiny_model("gemma")
    with pytest.raises(ModelError, match="n_layers"):
        tiny_model("llama", n_layers=0)


def test_tokenizer_round_trips_text() -> None:
    tok = tiny_tokenizer(bos=False)
    for text in [PROMPT, "Once upon a time", "Unseen wörds, digits 42 and émojis 🙂!"]:
        assert tok.decode(tok(text).input_ids) == text


def test_tokenizer_pieces_are_readable() -> None:
    tok = tiny_tokenizer(bos=False)
    pieces = [tok.decode([i]) for i in tok(PROMPT).input_ids]
    assert pieces == ["The", " capital", " of", " France", " is"]
    assert tok.decode(tok(" Paris").input_ids) == " Paris"
    assert 400 <= len(tok) <= 600


def test_tokenizer_is_deterministic_and_fresh() -> None:
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a is not b  # callers may mutate it (padding_side) without affecting others
    assert a.get_vocab() == b.get_vocab()


@pytest.mark.parametrize(("family", "bos"), [("llama", True), ("gemma3", True), ("gpt2", False)])
def test_bos_per_family(family: str, bos: bool) -> None:
    tok = tiny_model(family).tokenizer
    ids = tok(PROMPT).input_ids
    assert (ids[0] == tok.bos_token_id) is bos
    assert ids.count(tok.bos_token_id) == int(bos)
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")


def test_batch_padding() -> None:
    tok = tiny_tokenizer()
    batch = tok(["The cat", PROMPT], padding=True, return_tensors="pt")
    assert batch.input_ids.shape[0] == 2
    assert batch.attention_mask[0].tolist()[-1] == 0
    assert batch.input_ids[0, -1].item() == tok.pad_token_id
