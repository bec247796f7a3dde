"""Benchmark: batched patching sweeps and the one-pass logit lens on the default model.

1. Causal-trace sweep, counterfactual mode: all 30 layers × 3 sites (resid_post, attn.out,
   mlp.out; window 1) × every token of a 10-token prompt = 900 cells.
   * batched: ``causal_trace(..., corrupt=..., kind=[None, "mlp", "attn"], window=1)``;
   * per-cell loop: plain torch hooks, the clean activations captured once, then one HF
     forward of the corrupted prompt per cell with the clean value written in.
   Both give P(target) per cell; the script prints the max abs difference.
2. Logit lens over all layers (all tokens, and the last token) vs a bare forward of the same
   prompt, with the cost of the one matmul the lens cannot avoid (every other layer's rows
   against the full unembedding) as the floor, and the last-token lens on a ~70-token prompt.

Timings are interleaved (batched, loop, batched, loop …) and medians are reported. CPU
timings on a shared machine swing with its load: the load average is printed too.

    python tests/benchmarks/bench_recipes.py [--sweep-rounds 1] [--lens-rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import numpy as np
import torch
from oculi_dsl.recipes import causal_trace, logit_lens

import oculi_dsl as oculi

PROMPT = "The Eiffel Tower is located in the city of"
CORRUPT = "The Colosseum is located in the city of"
KINDS = {"resid_post": None, "mlp.out": "mlp", "attn.out": "attn"}


def _module(model: Any, site: str, layer: int) -> torch.nn.Module:
    block = model.hf.model.layers[layer]  # SmolLM2 is a Llama: paths written out by hand
    return {"resid_post": block, "mlp.out": block.mlp, "attn.out": block.self_attn}[site]


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _swap(out: Any, value: torch.Tensor) -> Any:
    return (value, *out[1:]) if isinstance(out, tuple) else value


def per_cell_loop(model: Any, target: int) -> np.ndarray:
    """(site, token, layer) P(target) with one forward per cell (hooks only, no DSL)."""
    clean = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    corrupt = torch.tensor([model.tokenizer(CORRUPT)["input_ids"]])
    n_layers, n_tok = model.info.n_layers, clean.shape[1]
    saved: dict[tuple[str, int], torch.Tensor] = {}
    handles = [
        _module(model, site, layer).register_forward_hook(
            lambda m, a, o, key=(site, layer): saved.__setitem__(key, _first(o).detach().clone()))
        for site in KINDS for layer in range(n_layers)]
    try:
        with torch.no_grad():
            model.hf(input_ids=clean)
    finally:
        for h in handles:
            h.remove()
    out = np.zeros((len(KINDS), n_tok, n_layers))
    for s, site in enumerate(KINDS):
        for tok in range(n_tok):
            for layer in range(n_layers):
                def patch(m: Any, a: Any, o: Any, value: torch.Tensor = saved[(site, layer)],
                          tok: int = tok) -> Any:
                    new = _first(o).clone()
                    new[:, tok] = value[:, tok]
                    return _swap(o, new)
                handle = _module(model, site, layer).register_forward_hook(patch)
                try:
                    with torch.no_grad():
                        logits = model.hf(input_ids=corrupt).logits[0, -1]
                finally:
                    handle.remove()
                out[s, tok, layer] = float(logits.softmax(-1)[target])
    return out


def batched(model: Any) -> Any:
    return causal_trace(model, PROMPT, subject="Eiffel Tower", corrupt=CORRUPT,
                        kind=list(KINDS.values()), window=1, progress=False)


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-rounds", type=int, default=1)
    parser.add_argument("--lens-rounds", type=int, default=7)
    args = parser.parse_args()
    model = oculi.load(progress=False)
    n_tok = len(model.tokenizer(PROMPT)["input_ids"])
    assert n_tok == 10 == len(model.tokenizer(CORRUPT)["input_ids"])
    print(f"model {model}; torch threads {torch.get_num_threads()}; load average {load_average()}")

    # -- 1. sweep -------------------------------------------------------------------------
    batched(model)  # warm-up (imports, kernels)
    t_batched, t_loop = [], []
    for _ in range(args.sweep_rounds):
        dt, ds = timed(lambda: batched(model))
        t_batched.append(dt)
        dt, ref = timed(lambda ds=ds: per_cell_loop(model, ds.attrs["target_id"]))
        t_loop.append(dt)
    got = ds["score"].sel(site=list(KINDS)).values
    cells = got.size
    b, lp = statistics.median(t_batched), statistics.median(t_loop)
    print(f"\ncausal-trace sweep, {model.info.n_layers} layers x {len(KINDS)} sites x {n_tok} tokens "
          f"= {cells} cells (target {ds.attrs['target_token']!r}, high {float(ds['high']):.4f}, "
          f"low {float(ds['low']):.4f})")
    print(f"  batched : median {b:7.2f} s over {len(t_batched)} run(s), {ds.attrs['forward_passes']} "
          f"forward passes ({ds.attrs['cells']} cells run, {ds.attrs['skipped_cells']} provably "
          f"unchanged), chunk {ds.attrs['chunk_size']}")
    print(f"  loop    : median {lp:7.2f} s over {len(t_loop)} run(s), {cells + 1} forward passes")
    print(f"  speed-up: {lp / b:.1f}x  (goal >= 10x); per cell actually run: "
          f"{lp / cells * ds.attrs['cells'] / b:.1f}x")
    print(f"  max abs diff batched vs loop: {np.abs(got - ref).max():.2e}")

    # -- 2. logit lens --------------------------------------------------------------------
    long_prompt = " ".join([PROMPT + "."] * 7)  # ~70 tokens
    ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    long_ids = torch.tensor([model.tokenizer(long_prompt)["input_ids"]])
    weight = model.hf.get_output_embeddings().weight
    rows_last = torch.randn(model.info.n_layers - 1, model.info.d_model)
    rows_all = torch.randn((model.info.n_layers - 1) * n_tok, model.info.d_model)

    def bare(x: torch.Tensor = ids) -> None:
        with torch.no_grad():
            model.hf(input_ids=x)
    runs: dict[str, Any] = {
        "bare": bare,
        "lens": lambda: logit_lens(model, PROMPT),
        "lens_last": lambda: logit_lens(model, PROMPT, positions=[-1]),
        # the exact unembedding the lens cannot avoid: every earlier layer's rows x full vocabulary
        "gemm_last": lambda: torch.nn.functional.linear(rows_last, weight),
        "gemm_all": lambda: torch.nn.functional.linear(rows_all, weight),
        "bare_long": lambda: bare(long_ids),
        "lens_long_last": lambda: logit_lens(model, long_prompt, positions=[-1]),
    }
    results: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for _ in range(args.lens_rounds):
        with torch.no_grad():
            for name, fn in runs.items():
                results[name].append(timed(fn)[0])
    med = {k: 1000 * statistics.median(v) for k, v in results.items()}
    print(f"\nlogit lens, {model.info.n_layers} layers, {n_tok} tokens, vocab {model.info.vocab} "
          f"({args.lens_rounds} interleaved rounds)")
    print(f"  bare forward        : median {med['bare']:7.1f} ms")
    print(f"  lens, all tokens    : median {med['lens']:7.1f} ms  ratio {med['lens'] / med['bare']:.2f}x"
          "  (goal <= 1.3x)")
    print(f"  lens, last token    : median {med['lens_last']:7.1f} ms  ratio "
          f"{med['lens_last'] / med['bare']:.2f}x  (goal <= 1.3x)")
    print(f"  floor: the unembedding matmul of the other {model.info.n_layers - 1} layers alone takes "
          f"{med['gemm_all']:.1f} ms for all tokens ({1 + med['gemm_all'] / med['bare']:.2f}x) and "
          f"{med['gemm_last']:.1f} ms for the last token ({1 + med['gemm_last'] / med['bare']:.2f}x)")
    print(f"  {long_ids.shape[1]}-token prompt, last token: bare {med['bare_long']:.1f} ms, lens "
          f"{med['lens_long_last']:.1f} ms, ratio {med['lens_long_last'] / med['bare_long']:.2f}x")
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    main()
