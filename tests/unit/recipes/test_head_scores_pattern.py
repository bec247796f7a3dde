"""Head-type scores on hand-built patterns equal hand-computed values (SPEC § Head-type scores)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from oculi_dsl.recipes import classify_heads, masked_score, rrt_scores, text_scores
from oculi_dsl.recipes._errors import RecipeError
from oculi_dsl.recipes.head_scores import (
    bos_score,
    duplicate_token_score,
    induction_score,
    previous_token_score,
    rrt_terms,
    self_score,
)


def rrt_pattern() -> torch.Tensor:
    """[BOS] a b c a b c (T = 3, o = 1): rows 0-3 on BOS, three hand-placed rows after."""
    pat = torch.zeros(7, 7)
    pat[:4, 0] = 1.0
    pat[4, 2], pat[4, 0] = 0.6, 0.4  # induction target of query 4 is key 2
    pat[5, 3], pat[5, 2] = 0.3, 0.7  # duplicate target of query 5 is key 2
    pat[6, 4] = 1.0
    return pat


def test_rrt_scores_by_hand() -> None:
    ds = rrt_scores(rrt_pattern(), 3, bos=True)
    assert float(ds["induction"]) == pytest.approx((0.6 + 0.3 + 1.0) / 3)
    assert float(ds["duplicate_token"]) == pytest.approx(0.7 / 3)
    assert float(ds["previous_token"]) == pytest.approx(1 / 6)
    assert float(ds["bos"]) == pytest.approx(4.4 / 7)
    assert float(ds["self"]) == pytest.approx(1 / 7)
    assert float(induction_score(rrt_pattern(), 3, bos=True)) == pytest.approx(1.9 / 3)
    assert float(duplicate_token_score(rrt_pattern(), 3, bos=True)) == pytest.approx(0.7 / 3)


def test_rrt_without_bos_shifts_the_offsets() -> None:
    pat = rrt_pattern()[1:, 1:].clone()  # a b c a b c, o = 0
    pat[:3, 0] = 1.0
    ds = rrt_scores(pat, 3, bos=False)
    # induction: A[3, 1], A[4, 2], A[5, 3] = 0.6, 0.3, 1.0
    assert float(ds["induction"]) == pytest.approx(1.9 / 3)
    assert float(ds["duplicate_token"]) == pytest.approx(0.7 / 3)


def test_rrt_batch_and_heads_average_over_prompts_only() -> None:
    a, b = rrt_pattern(), torch.zeros(7, 7)
    b[:, 0] = 1.0
    pat = torch.stack([a, b])[None, :, None]  # (layer, prompt, head, query, key)
    ds = rrt_scores(pat, 3, bos=True)
    assert ds["induction"].dims == ("layer", "head")
    assert ds["induction"].item() == pytest.approx(1.9 / 3 / 2)
    assert ds["bos"].item() == pytest.approx((4.4 / 7 + 1) / 2)


def test_rrt_terms_runs_on_plain_tensors() -> None:
    terms = rrt_terms(rrt_pattern()[None], 3, 1)
    assert set(terms) == {"induction", "duplicate_token", "previous_token", "bos", "self"}
    assert terms["induction"].shape == (1,)


def test_rrt_length_must_match() -> None:
    with pytest.raises(RecipeError, match="1 \\+ 2·4 positions"):
        rrt_scores(rrt_pattern(), 4, bos=True)


TOKENS = [5, 7, 5, 7]
TEXT = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.3, 0.5, 0], [0.1, 0.6, 0.1, 0.2]])


def test_simple_scores_by_hand() -> None:
    assert float(previous_token_score(TEXT)) == pytest.approx(0.3)
    assert float(bos_score(TEXT)) == pytest.approx(0.45)
    assert float(self_score(TEXT)) == pytest.approx(0.55)


def test_text_scores_by_hand() -> None:
    ds = text_scores(TEXT, TOKENS)
    assert float(ds["previous_token"]) == pytest.approx(0.3)
    assert float(ds["duplicate_token"]) == pytest.approx((0.2 + 0.6) / 2)
    assert float(ds["induction"]) == pytest.approx((0.3 + 0.1) / 2)
    assert float(ds["bos"]) == pytest.approx(0.45)
    assert float(ds["self"]) == pytest.approx(0.55)
    assert float(ds["previous_token_masked"]) == pytest.approx(0.9 / 4)
    assert float(ds["duplicate_token_masked"]) == pytest.approx(0.8 / 4)
    assert float(ds["induction_masked"]) == pytest.approx(0.4 / 4)
    assert float(duplicate_token_score(TEXT, tokens=TOKENS)) == pytest.approx(0.4)


@pytest.mark.parametrize(("exclude_bos", "exclude_current", "expected"), [
    (True, False, (0.4 / 2.2, 0.6 / 2.2, 0.4 / 2.2)),
    (False, True, (0.9 / 1.8, 0.8 / 1.8, 0.4 / 1.8)),
    (True, True, (0.4, 0.6, 0.4)),
])
def test_masked_score_exclusions(exclude_bos: bool, exclude_current: bool,
                                 expected: tuple[float, float, float]) -> None:
    got = [float(masked_score(TEXT, TOKENS, kind, exclude_bos=exclude_bos,
                              exclude_current_token=exclude_current))
           for kind in ("previous_token", "duplicate_token", "induction")]
    np.testing.assert_allclose(got, expected)


def test_no_repeated_token_gives_nan_not_zero() -> None:
    ds = text_scores(TEXT, [1, 2, 3, 4])
    assert np.isnan(float(ds["duplicate_token"])) and np.isnan(float(ds["induction"]))
    assert float(ds["duplicate_token_masked"]) == 0.0


def test_padding_is_masked() -> None:
    """A left-padded prompt scores like the same prompt alone."""
    width = 6
    padded = torch.zeros(2, width, width)
    padded[0, 2:, 2:] = TEXT
    padded[0, :2, :] = 0.3  # junk in padded rows is ignored
    other = torch.tril(torch.ones(width, width))
    padded[1] = other / other.sum(-1, keepdim=True)
    tokens = [TOKENS, [9, 8, 9, 8, 9, 8]]
    pat = xr.DataArray(padded.numpy(), dims=("prompt", "query", "key"))
    alone = [masked_score(TEXT, TOKENS, "duplicate_token", exclude_bos=True),
             masked_score(padded[1], tokens[1], "duplicate_token", exclude_bos=True)]
    both = masked_score(pat, tokens, "duplicate_token", exclude_bos=True)
    assert float(both) == pytest.approx(float(np.mean(alone)))
    pooled = text_scores(pat, tokens)
    # previous-token: 3 positions of prompt 0 and 5 of prompt 1, pooled
    prev_other = float(np.diagonal(padded[1].numpy(), -1).sum())
    assert float(pooled["previous_token"]) == pytest.approx((0.9 + prev_other) / 8)
    assert float(pooled["bos"]) == pytest.approx(
        (1.8 + float(padded[1, :, 0].sum())) / 10)


def test_tokens_must_match_the_pattern() -> None:
    with pytest.raises(RecipeError, match="length 3"):
        text_scores(TEXT, [1, 2, 3])
    with pytest.raises(RecipeError, match="Valid kinds"):
        masked_score(TEXT, TOKENS, "copy")
    with pytest.raises(RecipeError, match="seq_len"):
        duplicate_token_score(TEXT)


def _scores(**values: list[float]) -> xr.Dataset:
    return xr.Dataset({k: (("layer", "head"), [v]) for k, v in values.items()},
                      coords={"layer": [3], "head": np.arange(len(next(iter(values.values()))))})


def test_classify_rule() -> None:
    ds = _scores(induction=[0.9, 0.1, 0.0, 0.5, 0.2, np.nan],
                 previous_token=[0.1, 0.8, 0.0, 0.5, 0.1, 0.6],
                 duplicate_token=[0.0, 0.0, 0.45, 0.1, 0.1, 0.1],
                 bos=[0.0, 0.1, 0.2, 0.1, 0.39, 0.1],
                 self=[0.0, 0.0, 0.0, 0.0, 0.3, 0.0])
    out = classify_heads(ds)
    assert out["label"].values[0].tolist() == [
        "induction", "previous_token", "duplicate_token", "induction", "unknown", "previous_token"]
    np.testing.assert_allclose(out["score"].values[0], [0.9, 0.8, 0.45, 0.5, 0.39, 0.6])
    assert out["layer"].values.tolist() == [3]
    assert out.attrs["threshold"] == 0.4
    lower = classify_heads(ds, threshold=0.3)
    assert lower["label"].values[0, 4] == "bos"


def test_classify_errors() -> None:
    with pytest.raises(RecipeError, match="lacks"):
        classify_heads(_scores(induction=[0.5]))
    with pytest.raises(RecipeError, match="threshold"):
        classify_heads(_scores(induction=[0.5]), threshold=2)
