"""Attention entropy on hand-built patterns (SPEC § Attention, Entropy): no model needed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import xarray as xr
from oculi_dsl.recipes import pattern_entropy
from oculi_dsl.recipes._errors import RecipeError

from oculi_dsl.errors import OculiError

ROWS = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]])


def test_rows_give_zero_ln2_ln3() -> None:
    ds = pattern_entropy(ROWS)
    np.testing.assert_allclose(ds["entropy"].values, [0.0, math.log(2), math.log(3)], atol=1e-12)
    assert ds["entropy"].dims == ("query",)
    assert ds["entropy"].attrs["units"] == "nats"
    # normalized by ln n_valid: undefined (NaN) with one visible key, then 1 for uniform rows
    np.testing.assert_allclose(ds["entropy_norm"].values, [np.nan, 1.0, 1.0])
    assert ds["n_valid"].values.tolist() == [1, 2, 3]
    assert float(ds["head_entropy"]) == pytest.approx((math.log(2) + math.log(3)) / 3)
    assert float(ds["head_entropy_norm"]) == pytest.approx(1.0)
    assert "SPEC.md" in ds.attrs["definition"]


def test_zero_weights_are_zero_not_nan_and_no_negative_zero() -> None:
    ds = pattern_entropy(torch.tensor([[1.0, 0], [0, 1.0]]))
    assert ds["entropy"].values.tolist() == [0.0, 0.0]
    assert not np.signbit(ds["entropy"].values).any()


def test_masked_positions_are_excluded() -> None:
    # prompt 1 is ROWS left-padded by one position; padding keys and queries must not count
    padded = np.zeros((2, 4, 4))
    padded[0, 1:, 1:] = ROWS.numpy()
    padded[0, 0, 0] = 1.0  # a real first token in prompt 0
    padded[0, 1:, 0] = 0.0
    padded[1, 1:, 1:] = ROWS.numpy()
    padded[1, 0, :] = 0.25  # junk in the padded query row: must be ignored
    padded[1, 1:, 0] = 0.0
    mask = np.array([[1, 1, 1, 1], [0, 1, 1, 1]])
    pat = xr.DataArray(padded, dims=("prompt", "query", "key"))
    ds = pattern_entropy(pat, mask=mask)
    got = ds["entropy"].values
    assert np.isnan(got[1, 0])
    np.testing.assert_allclose(got[1, 1:], [0.0, math.log(2), math.log(3)], atol=1e-12)
    assert ds["n_valid"].values[1].tolist() == [0, 1, 2, 3]
    assert ds["n_valid"].values[0].tolist() == [1, 2, 3, 4]
    # the head summary is a nan-mean over (prompt, query) of real positions only
    expected = np.nanmean(np.concatenate([got[0], got[1, 1:]]))
    assert float(ds["head_entropy"]) == pytest.approx(expected)


def test_padding_mask_on_keys_renormalizes_nothing() -> None:
    # weight on a masked key is dropped, not redistributed: H of [0.5 (pad), 0.5] is 0.5·ln 2
    pat = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    ds = pattern_entropy(pat, mask=[0, 1])
    assert float(ds["entropy"][1]) == pytest.approx(0.5 * math.log(2))


def test_skip_queries_and_drop_first_key() -> None:
    ds = pattern_entropy(ROWS, skip_queries=1)
    assert np.isnan(ds["entropy"].values[0])
    np.testing.assert_allclose(ds["entropy"].values[1:], [math.log(2), math.log(3)])
    dropped = pattern_entropy(ROWS, drop_first_key=True)
    # row 0 has nothing left; row 1 becomes [1] → 0; row 2 becomes [.5, .5] → ln 2
    assert np.isnan(dropped["entropy"].values[0])
    np.testing.assert_allclose(dropped["entropy"].values[1:], [0.0, math.log(2)], atol=1e-12)
    assert dropped["n_valid"].values.tolist() == [0, 1, 2]


def test_sliding_window_limits_n_valid() -> None:
    pat = torch.full((4, 4), 0.0)
    for t in range(4):
        lo = max(0, t - 1)
        pat[t, lo:t + 1] = 1.0 / (t + 1 - lo)
    ds = pattern_entropy(pat, window=2)
    assert ds["n_valid"].values.tolist() == [1, 2, 2, 2]
    np.testing.assert_allclose(ds["entropy_norm"].values[1:], 1.0)
    per_layer = pattern_entropy(torch.stack([pat, pat]).unsqueeze(1), window=[2, None])
    assert per_layer["n_valid"].sel(layer=0).values.tolist() == [1, 2, 2, 2]
    assert per_layer["n_valid"].sel(layer=1).values.tolist() == [1, 2, 3, 4]


def test_layouts_by_rank_and_dataarray() -> None:
    stacked = torch.stack([ROWS, ROWS]).unsqueeze(1)  # (layer, head, query, key)
    ds = pattern_entropy(stacked)
    assert ds["entropy"].dims == ("layer", "head", "query")
    assert ds["head_entropy"].dims == ("layer", "head")
    da = xr.DataArray(ROWS.numpy().T, dims=("key", "query"))  # any order; transposed inside
    np.testing.assert_allclose(pattern_entropy(da)["entropy"].values, [0, math.log(2), math.log(3)],
                               atol=1e-12)


@pytest.mark.parametrize("bad", [torch.ones(3), torch.ones(2, 3), torch.ones(1, 1, 1, 1, 2, 2)])
def test_bad_pattern_shapes(bad: torch.Tensor) -> None:
    with pytest.raises(RecipeError, match="shape"):
        pattern_entropy(bad)


def test_bad_options() -> None:
    with pytest.raises(OculiError, match="skip_queries"):
        pattern_entropy(ROWS, skip_queries=-1)
    with pytest.raises(RecipeError, match="window"):
        pattern_entropy(ROWS, window=[2, 3])
    with pytest.raises(RecipeError, match="mask"):
        pattern_entropy(ROWS, mask=[1, 1])
    with pytest.raises(RecipeError, match="'query' and 'key'"):
        pattern_entropy(xr.DataArray(ROWS.numpy(), dims=("a", "b")))
