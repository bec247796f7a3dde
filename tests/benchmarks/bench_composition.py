"""Benchmark: composition scores of the default model, low-rank factors vs dense d × d products.

Prints, from one run on SmolLM2-135M-Instruct (30 layers × 9 heads = 270 heads, d = 576,
D = 64):

1. the wall time of ``composition_scores`` for all 270 heads and the three kinds (Q, K, V);
2. on the heads of layers 0–3, the time of the low-rank recipe next to a dense computation
   that forms every W_OV / W_QK as a d × d matrix and multiplies d × d by d × d (same folded
   weights, float32 both), their ratio (goal ≥ 5×) and the largest difference (goal ≤ 1e-5).

    python tests/benchmarks/bench_composition.py
"""

from __future__ import annotations

import time

import numpy as np
import torch
from oculi_dsl.recipes import composition_scores
from oculi_dsl.recipes._weights import folded_head_weights

import oculi_dsl as oculi

DENSE_LAYERS = range(4)


def dense_composition(model: oculi.OculiModel, layers: range) -> dict[str, np.ndarray]:
    """SPEC's Frobenius ratios from explicit d × d matrices (the slow, obvious way)."""
    n, h = len(layers), model.info.n_heads
    w = [folded_head_weights(model, layer, torch.float32) for layer in layers]
    ov = [x["W_V"] @ x["W_O"] for x in w]  # (H, d, d) each
    qk = [x["W_Q"] @ x["W_K"].transpose(1, 2) for x in w]
    dests = {"q": qk, "k": [m.transpose(1, 2) for m in qk], "v": ov}
    out = {k: np.zeros((n, h, n, h)) for k in dests}
    with torch.no_grad():
        for i in range(n):
            for j in range(i + 1, n):
                for kind, mats in dests.items():
                    norms = mats[j].flatten(1).norm(dim=1)  # (H,)
                    for s in range(h):
                        prod = ov[i][s] @ mats[j]  # (H, d, d)
                        ratio = prod.flatten(1).norm(dim=1) / (ov[i][s].norm() * norms)
                        out[kind][i, s, j] = ratio.double().numpy()
    return out


def main() -> None:
    model = oculi.load(progress=False)
    info = model.info
    composition_scores(model, layers=[0, 1], progress=False)  # warm-up (threads, allocator)

    start = time.perf_counter()
    full = composition_scores(model, progress=False)
    full_s = time.perf_counter() - start
    n_heads = info.n_layers * info.n_heads
    pairs = int(sum(info.n_heads ** 2 * (info.n_layers - 1 - i) for i in range(info.n_layers)))
    print(f"{info.model_id}: {info.n_layers} layers × {info.n_heads} heads = {n_heads} heads, "
          f"d_model {info.d_model}, d_head {info.d_head}, {torch.get_num_threads()} threads")
    print(f"composition_scores, all {n_heads} heads, Q+K+V ({pairs} source→destination pairs "
          f"per kind): {full_s:.2f} s")
    print("  random baselines: " + ", ".join(
        f"{k.upper()} {float(full[f'{k}_baseline']):.4f}" for k in "qkv")
        + f" (1/sqrt(d) = {info.d_model ** -0.5:.4f}); max scores: " + ", ".join(
        f"{k.upper()} {float(full[f'{k}_composition'].max()):.3f}" for k in "qkv"))

    start = time.perf_counter()
    # the dense side computes no baseline, so neither does the timed low-rank call
    low = composition_scores(model, layers=DENSE_LAYERS, progress=False, baseline_samples=0)
    low_s = time.perf_counter() - start
    start = time.perf_counter()
    dense = dense_composition(model, DENSE_LAYERS)
    dense_s = time.perf_counter() - start
    diff = max(float(np.abs(low[f"{k}_composition"].values - dense[k]).max()) for k in "qkv")
    sub = len(DENSE_LAYERS) * info.n_heads
    sub_pairs = int(sum(info.n_heads ** 2 * (len(DENSE_LAYERS) - 1 - i)
                        for i in range(len(DENSE_LAYERS))))
    print(f"layers 0–3 ({sub} heads, {sub_pairs} pairs × 3 kinds, no baseline): low-rank {low_s:.3f} s, "
          f"dense d×d {dense_s:.2f} s → {dense_s / low_s:.1f}× faster (goal ≥ 5×); "
          f"max |low-rank − dense| = {diff:.2e} (goal ≤ 1e-5)")


if __name__ == "__main__":
    main()
