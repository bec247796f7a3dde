"""Benchmark: attention patterns with oculi vs a bare forward and vs nnsight 0.8 (issue 3).

Run: ``python tests/benchmarks/bench_attention.py [--reps 15] [--tokens 128] [--layer 15]
[--threads N]`` (on a shared, loaded machine ``--threads 1`` gives steadier ratios).

On the default model (``oculi.load()``, SmolLM2-135M, cached) with a prompt of exactly
``--tokens`` tokens, all variants run interleaved (one of each per round, after warm-up rounds)
and the median of each is reported, in ms and as a ratio to the bare SDPA forward:

- ``bare sdpa``: ``model(input_ids, use_cache=False)``, the model as configured (SDPA);
- ``bare eager+attn``: a copy of the model on eager attention with ``output_attentions=True``,
  what plain HF needs to return every pattern;
- ``oculi 1 layer``: a trace saving one layer's pattern and the logits (a full forward: only that
  layer leaves SDPA); goal ≤ 1.05×;
- ``oculi 1 layer (stop early)``: the same pattern alone (the trace stops after that layer);
- ``oculi all layers``: ``t.layers[:].attn.pattern.save()`` (stops after the last attention,
  skipping the last MLP and the LM head); ``oculi all layers + logits`` also saves the last
  logits, so it runs the whole forward like the others; goal ≤ 1.5×;
- ``nnsight 1 layer`` / ``nnsight all layers``: nnsight 0.8 on the eager copy, saving
  ``self_attn.output[1]`` (the attention weights eager attention returns) and the logits.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import oculi_dsl as oculi

TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889. Locally nicknamed the Iron Lady, it was constructed as the centrepiece of "
    "the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution. "
    "Although initially criticised by some of France's leading artists and intellectuals for its "
    "design, it has since become a global cultural icon of France and one of the most recognisable "
    "structures in the world. The tower received 5,889,000 visitors in 2022."
)


def prompt_ids(model: oculi.OculiModel, n_tokens: int) -> torch.Tensor:
    ids: list[int] = model.tokenizer(TEXT)["input_ids"]
    while len(ids) < n_tokens:
        ids = ids + ids
    return torch.tensor(ids[:n_tokens])


def variants(model: oculi.OculiModel, eager_hf: torch.nn.Module, ids: torch.Tensor,
             layer: int) -> dict[str, Callable[[], Any]]:
    from nnsight import NNsight

    batch = ids[None]
    n_layers = model.info.n_layers
    nn_model = NNsight(eager_hf)

    def bare_sdpa() -> Any:
        with torch.no_grad():
            return model.hf(input_ids=batch, use_cache=False).logits

    def bare_eager() -> Any:
        with torch.no_grad():
            return eager_hf(input_ids=batch, use_cache=False, output_attentions=True).attentions

    def oculi_one() -> Any:
        with oculi.trace(model, ids) as t:
            t.layers[layer].attn.pattern.save("pattern")
            t.logits[-1].save("logits")
        return t.saved["pattern"]

    def oculi_one_stop() -> Any:
        with oculi.trace(model, ids) as t:
            t.layers[layer].attn.pattern.save("pattern")
        return t.saved["pattern"]

    def oculi_all() -> Any:
        with oculi.trace(model, ids) as t:
            t.layers[:].attn.pattern.save("patterns")
        return t.saved["patterns"]

    def oculi_all_logits() -> Any:
        with oculi.trace(model, ids) as t:
            t.layers[:].attn.pattern.save("patterns")
            t.logits[-1].save("logits")
        return t.saved["patterns"]

    def nnsight_one() -> Any:
        with torch.no_grad(), nn_model.trace(batch, use_cache=False):
            pattern = nn_model.model.layers[layer].self_attn.output[1].save()
            logits = nn_model.output.logits[:, -1].save()
        return pattern, logits

    def nnsight_all() -> Any:
        patterns: list[Any] = []
        with torch.no_grad(), nn_model.trace(batch, use_cache=False):
            for i in range(n_layers):
                patterns.append(nn_model.model.layers[i].self_attn.output[1].save())
        return patterns

    return {
        "bare sdpa": bare_sdpa,
        "bare eager+attn": bare_eager,
        "oculi 1 layer": oculi_one,
        "oculi 1 layer (stop early)": oculi_one_stop,
        "oculi all layers": oculi_all,
        "oculi all layers + logits": oculi_all_logits,
        "nnsight 1 layer": nnsight_one,
        "nnsight all layers": nnsight_all,
    }


def check_agreement(fns: dict[str, Callable[[], Any]], layer: int) -> float:
    """The patterns being timed agree (oculi vs nnsight vs HF eager), max abs difference."""
    ours = fns["oculi all layers"]()
    theirs = torch.stack([p[0] for p in fns["nnsight all layers"]()])
    hf = torch.stack([p[0] for p in fns["bare eager+attn"]()])
    one = fns["oculi 1 layer"]()
    diff = max(float((ours - theirs).abs().max()), float((ours - hf).abs().max()),
               float((one - hf[layer]).abs().max()))
    assert diff < 1e-5, f"patterns disagree by {diff}"
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = oculi.load(progress=False)
    eager_hf = copy.deepcopy(model.hf)
    eager_hf.set_attn_implementation("eager")
    ids = prompt_ids(model, args.tokens)
    fns = variants(model, eager_hf, ids, args.layer)
    diff = check_agreement(fns, args.layer)

    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(args.warmup + args.reps):
        for name, fn in fns.items():  # interleaved: one of each per round
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if rep >= args.warmup:
                times[name].append(elapsed * 1e3)

    import nnsight
    import transformers

    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = times["bare sdpa"]
    # ratio within each round (neighbours in time share the machine's load), then the median
    ratio = {name: statistics.median(t / b for t, b in zip(ts, base, strict=True)) for name, ts in times.items()}
    print(f"model {model.info.model_id} ({model.info.n_layers} layers, {model.info.n_heads} heads), "
          f"{len(ids)} tokens, fp32 on {model.device}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"nnsight {nnsight.__version__}")
    print(f"{args.reps} interleaved rounds after {args.warmup} warm-up rounds; saved patterns agree "
          f"with HF eager / nnsight within {diff:.1e}")
    print(f"{'variant':28} {'median ms':>10} {'min ms':>8} {'× bare (median of rounds)':>26} {'× bare (min)':>13}")
    for name in fns:
        print(f"{name:28} {med[name]:10.1f} {min(times[name]):8.1f} {ratio[name]:25.2f}× "
              f"{min(times[name]) / min(base):12.2f}×")
    for name, goal in (("oculi 1 layer", 1.05), ("oculi all layers + logits", 1.5)):
        print(f"goal {name} / bare sdpa <= {goal}x: {ratio[name]:.3f}x "
              f"{'met' if ratio[name] <= goal else 'NOT met'}")
    for ours, theirs in (("oculi 1 layer", "nnsight 1 layer"), ("oculi all layers + logits", "nnsight all layers")):
        print(f"{ours} / {theirs}: {ratio[ours] / ratio[theirs]:.2f}x")


if __name__ == "__main__":
    main()
