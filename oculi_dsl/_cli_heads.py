"""``oculi-dsl heads`` and ``oculi-dsl dla``: head classification and direct logit attribution.

Both commands only parse arguments, call the recipes (:mod:`oculi_dsl.recipes.heads`,
:mod:`oculi_dsl.recipes.attribution`, :mod:`oculi_dsl.recipes.composition`), print a readable
summary and write the result Dataset (``--out``, netCDF) and a figure (``--plot``, PNG).

    oculi-dsl heads --plot heads.png --out heads.nc
    oculi-dsl dla "The capital of France is" --target " Paris" --wrong " London"
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np

from .cli import add_model_args, command, load_model

HEADS_EPILOG = """\
examples:
  oculi-dsl heads                                  # repeated random tokens, T=50, B=10
  oculi-dsl heads --plot heads.png --out heads.nc  # heatmaps + netCDF
  oculi-dsl heads --text "the cat sat. the cat sat." --threshold 0.3
  oculi-dsl heads --circuits 5                     # + previous-token → induction pairs"""

DLA_EPILOG = """\
examples:
  oculi-dsl dla "The capital of France is" --target " Paris"
  oculi-dsl dla "The capital of France is" --target " Paris" --wrong " London" --top 15
  oculi-dsl dla "The capital of France is" --target " Paris" --out dla.nc --plot dla.png
note: a target must be ONE token; mind the leading space (" Paris")."""

SCORES = ("induction", "previous_token", "duplicate_token", "bos", "self")


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: works without a display

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_head_scores(ds: Any, path: str) -> str:
    """One layer × head heatmap per score kind, in [0, 1], written as PNG."""
    fig = _figure(3.0 * len(SCORES), max(3.0, 1.2 + 0.22 * ds.sizes["layer"]))
    axes = fig.subplots(1, len(SCORES), sharey=True)
    image = None
    for ax, kind in zip(axes, SCORES, strict=True):
        image = ax.imshow(ds[kind].transpose("layer", "head").values, vmin=0, vmax=1,
                          cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(kind.replace("_", " "))
        ax.set_xlabel("head")
        ax.set_xticks(range(ds.sizes["head"]))
    axes[0].set_ylabel("layer")
    axes[0].set_yticks(range(ds.sizes["layer"]), [str(v) for v in ds["layer"].values],
                       fontsize=7)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="score")
    fig.suptitle(f"head scores: {ds.attrs.get('model_id', '')}")
    fig.savefig(path)
    return path


def plot_dla(ds: Any, path: str) -> str:
    """Per-layer attention / MLP terms as bars, and per-head terms as a heatmap (if any)."""
    heads = "head_dla" in ds
    fig = _figure(11 if heads else 7, 4.5)
    axes = fig.subplots(1, 2 if heads else 1, squeeze=False)[0]
    kinds = ds["component_kind"].values
    layers = np.arange(int((kinds == "attn").sum()))
    attn = ds["dla"].values[kinds == "attn"]
    mlp = ds["dla"].values[kinds == "mlp"]
    axes[0].bar(layers - 0.2, attn, width=0.4, label="attn")
    axes[0].bar(layers + 0.2, mlp, width=0.4, label="mlp")
    axes[0].axhline(0, color="black", linewidth=0.5)
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("direct logit attribution")
    axes[0].legend()
    axes[0].set_title(f"embed {float(ds['dla'].values[0]):+.2f}, total {float(ds['total']):+.2f}")
    if heads:
        values = ds["head_dla"].transpose("layer", "head").values
        limit = float(np.abs(values).max()) or 1.0
        image = axes[1].imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto",
                               interpolation="nearest")
        axes[1].set_xlabel("head")
        axes[1].set_ylabel("layer")
        axes[1].set_title("per-head terms")
        fig.colorbar(image, ax=axes[1], shrink=0.8)
    what = " ".join(repr(t) for t in ds.attrs.get("target_tokens", [])[:1])
    if ds.attrs.get("wrong_tokens"):
        what += f" − {ds.attrs['wrong_tokens'][0]!r}"
    fig.suptitle(f"DLA of {what}: {ds.attrs.get('model_id', '')}")
    fig.savefig(path)
    return path


def _print_heads(labels: Any, scores: Any, threshold: float, show: int) -> None:
    found = [(str(labels["label"].values[i, j]), float(labels["score"].values[i, j]),
              int(labels["layer"].values[i]), int(labels["head"].values[j]))
             for i in range(labels.sizes["layer"]) for j in range(labels.sizes["head"])]
    named = sorted((f for f in found if f[0] != "unknown"), key=lambda f: (f[0], -f[1]))
    counts = {k: sum(1 for f in named if f[0] == k) for k in SCORES}
    print(f"{len(named)} of {len(found)} heads labelled (score >= {threshold}): "
          + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    print(f"{'head':>8}  {'label':<16}{'score':>6}   " + " ".join(f"{k[:9]:>9}" for k in SCORES))
    shown = {k: 0 for k in SCORES}
    for label, score, layer, head in named:
        shown[label] += 1
        if shown[label] > show:
            if shown[label] == counts[label]:
                print(f"{'':>8}  … and {counts[label] - show} more {label} heads")
            continue
        row = " ".join(f"{float(scores[k].sel(layer=layer, head=head)):9.3f}" for k in SCORES)
        print(f"{f'L{layer}H{head}':>8}  {label:<16}{score:6.3f}   {row}")
    ind = scores["induction"].transpose("layer", "head")
    print("induction score per layer (max over heads): " + ", ".join(
        f"L{int(layer)} {float(v):.2f}" for layer, v in zip(ind["layer"].values, ind.max("head").values, strict=True)))


@command("heads", "score and classify every attention head (induction, previous-token, …)",
         HEADS_EPILOG)
def _heads(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    add_model_args(parser)
    parser.add_argument("--text", default=None,
                        help="score on this text instead of repeated random tokens")
    parser.add_argument("--seq-len", type=int, default=50, help="length T of R in [BOS] R R")
    parser.add_argument("--batch", type=int, default=10, help="number of random sequences B")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.4,
                        help="label a head only if its best score is >= this (default 0.4)")
    parser.add_argument("--circuits", type=int, default=0, metavar="N",
                        help="also print the top N induction circuits (K-composition)")
    parser.add_argument("--show", type=int, default=10, metavar="N",
                        help="print at most N heads per label (default 10)")
    parser.add_argument("--out", default=None, help="netCDF file for the scores and labels")
    parser.add_argument("--plot", default=None, help="PNG file for the score heatmaps")

    def run(args: argparse.Namespace) -> int:
        from .io import to_netcdf
        from .recipes import classify_heads, detect_heads, head_scores, induction_circuits

        model = load_model(args)
        print(model)
        if args.text is not None:
            scores = detect_heads(model, args.text)
            print(f"scores on the text {args.text!r}")
        else:
            scores = head_scores(model, seq_len=args.seq_len, batch=args.batch, seed=args.seed)
            print(f"repeated random tokens: B={args.batch}, T={args.seq_len}, seed={args.seed}, "
                  f"BOS {'prepended' if scores.attrs['bos'] else 'not prepended'}; loss "
                  f"first half {float(scores['loss_first_half']):.2f}, second half "
                  f"{float(scores['loss_second_half']):.2f} nats")
        labels = classify_heads(scores, threshold=args.threshold)
        _print_heads(labels, scores, args.threshold, max(args.show, 0))
        if args.circuits > 0 and args.text is None:
            circuits = induction_circuits(model, scores=scores, threshold=args.threshold)
            print(f"induction circuits (K-composition, random baseline "
                  f"{float(circuits['k_baseline']):.3f}): {circuits.sizes['circuit']} pairs")
            for i in range(min(args.circuits, circuits.sizes["circuit"])):
                c = circuits.isel(circuit=i)
                print(f"  L{int(c.prev_layer)}H{int(c.prev_head)} → "
                      f"L{int(c.induction_layer)}H{int(c.induction_head)}  "
                      f"{float(c.k_composition):.3f}")
        if args.out:
            extra = [v for v in ("loss", "loss_first_half", "loss_second_half", "tokens")
                     if v in scores]
            ds = labels.merge(scores[extra]) if extra else labels
            ds.attrs = labels.attrs
            print(f"wrote {to_netcdf(ds, args.out)}")
        if args.plot:
            print(f"wrote {plot_head_scores(labels, args.plot)}")
        return 0

    return run


def _component_rows(ds: Any) -> list[tuple[str, float]]:
    rows = [(str(c), float(v)) for c, v in zip(ds["component"].values, ds["dla"].values, strict=True)]
    if "head_dla" in ds:
        heads = ds["head_dla"].transpose("layer", "head")
        rows += [(f"L{int(layer)}H{int(head)}", float(heads.values[i, j]))
                 for i, layer in enumerate(heads["layer"].values)
                 for j, head in enumerate(heads["head"].values)]
    return rows


@command("dla", "direct logit attribution of a target token (per layer component and per head)",
         DLA_EPILOG)
def _dla(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    add_model_args(parser)
    parser.add_argument("prompt", help="the prompt to attribute")
    parser.add_argument("--target", required=True, help="target token (text or id)")
    parser.add_argument("--wrong", default=None, help="attribute target − wrong (logit difference)")
    parser.add_argument("--position", type=int, default=-1, help="token position (default last)")
    parser.add_argument("--top", type=int, default=10, help="how many components to print")
    parser.add_argument("--no-heads", action="store_true", help="skip the per-head terms")
    parser.add_argument("--out", default=None, help="netCDF file for the attribution")
    parser.add_argument("--plot", default=None, help="PNG file (per-layer bars, per-head map)")

    def run(args: argparse.Namespace) -> int:
        from .io import to_netcdf
        from .recipes import direct_logit_attribution

        model = load_model(args)
        print(model)
        target = int(args.target) if args.target.lstrip("-").isdigit() else args.target
        wrong = args.wrong
        if wrong is not None and wrong.lstrip("-").isdigit():
            wrong = int(wrong)
        ds = direct_logit_attribution(model, args.prompt, target, wrong=wrong,
                                      position=args.position, per_head=not args.no_heads)
        what = f"logit({ds.attrs['target_tokens'][0]!r})"
        if wrong is not None:
            what += f" − logit({ds.attrs['wrong_tokens'][0]!r})"
        print(f"prompt: {args.prompt!r}, position {args.position}")
        print(f"{what}: model {float(ds['logit']):+.4f}, sum of components "
              f"{float(ds['total']):+.4f} (bias {float(ds['bias']):+.4f}, final-norm scale "
              f"{float(ds['scale']):.3f})")
        rows = sorted(_component_rows(ds), key=lambda r: -abs(r[1]))[: max(args.top, 0)]
        print(f"top {len(rows)} components by |DLA| (heads are parts of their layer's attn):")
        for name, value in rows:
            print(f"  {name:>10} {value:+9.4f}")
        if args.out:
            print(f"wrote {to_netcdf(ds, args.out)}")
        if args.plot:
            print(f"wrote {plot_dla(ds, args.plot)}")
        return 0

    return run
