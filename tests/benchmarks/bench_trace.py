"""Benchmark: the cost of a trace over a bare forward, side by side with nnsight 0.8.

On the default model (SmolLM2-135M-Instruct, 30 layers) with one 64-token prompt, measured
interleaved (every repetition runs every variant once, in a rotating order), after warm-up,
median of ``REPEATS`` repetitions:

- ``bare``: ``model.hf(input_ids, use_cache=False)`` under ``torch.no_grad()``
- ``trace``: ``t.layers[:].resid_post.save()`` and ``t.logits.save()`` (raw tensors)
- ``trace+result``: the same, plus building the ``t.result`` Dataset inside the timed block
- ``nnsight``: nnsight 0.8 saving the 30 decoder layer outputs and the logits
- ``early-stop``: a trace that only needs ``layers[3].resid_post`` (stops after layer 3)

    python tests/benchmarks/bench_trace.py [--repeats N] [--threads T]

Not collected by pytest (the file name does not start with ``test_``). It prints numbers and
asserts nothing about them.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

import oculi_dsl as oculi

N_TOKENS = 64
WARMUP = 3
REPEATS = 15
TEXT = (
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker who repaired every clock in the valley. Each morning he opened his shop, lit the "
    "lamp on his workbench and listened to the ticking of a hundred clocks, and each evening he "
    "wound them all before walking home along the river under the tall dark trees."
)


def prompt_ids(model: oculi.OculiModel) -> list[int]:
    ids = model.tokenizer(TEXT)["input_ids"]
    if len(ids) < N_TOKENS:
        raise SystemExit(f"benchmark text has only {len(ids)} tokens, need {N_TOKENS}")
    return list(ids[:N_TOKENS])


def variants(model: oculi.OculiModel, ids: list[int]) -> dict[str, Callable[[], object]]:
    from nnsight import NNsight

    hf = model.hf
    input_ids = torch.tensor([ids])
    n_layers = model.info.n_layers
    nn = NNsight(hf)

    def bare() -> object:
        with torch.no_grad():
            return hf(input_ids, use_cache=False).logits

    def trace() -> object:
        with oculi.trace(model, ids) as t:
            t.layers[:].resid_post.save("resid")
            t.logits.save("logits")
        return t.saved

    def trace_result() -> object:
        with oculi.trace(model, ids) as t:
            t.layers[:].resid_post.save("resid")
            t.logits.save("logits")
        return t.result

    def nnsight() -> object:
        outs: list[object] = []
        with torch.no_grad(), nn.trace(input_ids):
            for i in range(n_layers):
                outs.append(nn.model.layers[i].output.save())
            logits = nn.output.logits.save()
        return outs, logits

    def early_stop() -> object:
        with oculi.trace(model, ids) as t:
            t.layers[3].resid_post.save("l3")
        return t.saved

    return {"bare": bare, "trace": trace, "trace+result": trace_result, "nnsight": nnsight,
            "early-stop": early_stop}


def check_same_numbers(model: oculi.OculiModel, ids: list[int], fns: dict[str, Callable[[], object]]) -> None:
    """The variants compute the same thing (else the timing comparison would be meaningless)."""
    bare = fns["bare"]()
    saved = fns["trace"]()
    outs, logits = fns["nnsight"]()
    assert torch.equal(saved["logits"], bare[0])  # type: ignore[index]
    nn_resid = torch.stack([o if isinstance(o, torch.Tensor) else o[0] for o in outs])[:, 0]  # type: ignore[union-attr]
    torch.testing.assert_close(saved["resid"], nn_resid, atol=1e-5, rtol=1e-6)  # type: ignore[index]
    torch.testing.assert_close(saved["logits"], logits[0], atol=1e-5, rtol=1e-6)  # type: ignore[index]
    early = fns["early-stop"]()
    assert torch.equal(early["l3"], saved["resid"][3])  # type: ignore[index]
    assert saved["resid"].shape == (model.info.n_layers, N_TOKENS, model.info.d_model)  # type: ignore[index]


def measure(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    for _ in range(WARMUP):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); 1 is steadier "
                             "on a shared machine")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.repeats < 10:
        raise SystemExit("use at least 10 repetitions")

    model = oculi.load(progress=False)
    ids = prompt_ids(model)
    fns = variants(model, ids)
    check_same_numbers(model, ids, fns)
    times = measure(fns, args.repeats)
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}

    import nnsight
    import transformers

    print(f"model: {model!r}")
    print(f"prompt: {N_TOKENS} tokens, batch 1; {args.repeats} interleaved repetitions after "
          f"{WARMUP} warm-up rounds; torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, nnsight {nnsight.__version__}, "
          f"{platform.machine()}")
    print()
    print(f"{'variant':<14}{'median ms':>11}{'min ms':>10}{'max ms':>10}")
    for name, values in times.items():
        print(f"{name:<14}{med[name]:>11.2f}{min(values) * 1e3:>10.2f}{max(values) * 1e3:>10.2f}")
    print()
    bare = med["bare"]
    print(f"trace / bare              : {med['trace'] / bare:.2f}x  (all 30 resid_post + logits)")
    print(f"nnsight / bare            : {med['nnsight'] / bare:.2f}x  (30 layer outputs + logits)")
    print(f"early-stop / bare         : {med['early-stop'] / bare:.2f}x  (layers[3].resid_post only)")
    print(f"trace+result / bare       : {med['trace+result'] / bare:.2f}x  (t.result Dataset built in the timed block)")
    print(f"trace / nnsight           : {med['trace'] / med['nnsight']:.2f}x")


if __name__ == "__main__":
    main()
