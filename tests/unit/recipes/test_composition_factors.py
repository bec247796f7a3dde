"""The low-rank composition kernel equals the dense Frobenius formula (SPEC § Composition)."""

from __future__ import annotations

import math

import pytest
import torch
from oculi_dsl.recipes import random_baseline
from oculi_dsl.recipes.composition import block_scores, head_factors


def _ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b).norm() / (a.norm() * b.norm()))


def _weights(gen: torch.Generator, heads: int, d: int, dh: int) -> dict[str, torch.Tensor]:
    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {"W_Q": draw(heads, d, dh), "W_K": draw(heads, d, dh), "W_V": draw(heads, d, dh),
            "W_O": draw(heads, dh, d)}


def test_low_rank_equals_dense() -> None:
    gen = torch.Generator().manual_seed(0)
    src_w, dst_w = _weights(gen, 3, 24, 5), _weights(gen, 2, 24, 5)
    # make one destination matrix strongly aligned with a source so scores are not all tiny
    dst_w["W_Q"][1] = src_w["W_O"][0].T.clone()
    src, dst = head_factors(src_w), head_factors(dst_w)
    got = {kind: block_scores(src["src"], dst[kind]) for kind in ("q", "k", "v")}
    for s in range(3):
        ov = src_w["W_V"][s] @ src_w["W_O"][s]
        for t in range(2):
            qk = dst_w["W_Q"][t] @ dst_w["W_K"][t].T
            ov_t = dst_w["W_V"][t] @ dst_w["W_O"][t]
            assert float(got["q"][s, t]) == pytest.approx(_ratio(ov, qk), abs=1e-12)
            assert float(got["k"][s, t]) == pytest.approx(_ratio(ov, qk.T), abs=1e-12)
            assert float(got["v"][s, t]) == pytest.approx(_ratio(ov, ov_t), abs=1e-12)
    assert float(got["q"][0, 1]) > 1.5 * float(got["q"][1, 1])


def test_factors_ignore_scale_and_zero_heads_are_nan() -> None:
    gen = torch.Generator().manual_seed(1)
    w = _weights(gen, 2, 16, 4)
    scaled = {k: 3.0 * v for k, v in w.items()}
    a, b = head_factors(w), head_factors(scaled)
    torch.testing.assert_close(block_scores(a["src"], a["k"]), block_scores(b["src"], b["k"]))
    w["W_O"][1] = 0.0
    assert torch.isnan(head_factors(w)["src"][1]).all()
    w["W_V"][0] = 0.0  # a rank-deficient (zero) factor is handled, not an error
    assert torch.isnan(head_factors(w)["src"][0]).all()


def test_random_baseline_is_about_one_over_sqrt_d() -> None:
    for d in (64, 256):
        for kind, (mean, std) in random_baseline(d, 16, samples=50).items():
            assert mean == pytest.approx(1 / math.sqrt(d), rel=0.1), kind
            assert 0 < std < mean
    assert random_baseline(64, 16, seed=3) == random_baseline(64, 16, seed=3)
    assert random_baseline(64, 16, seed=3) != random_baseline(64, 16, seed=4)
