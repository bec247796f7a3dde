"""CLI subcommands for the logit lens, causal tracing and activation patching recipes.

Importing this module registers ``logit-lens``, ``causal-trace`` and ``patch`` with
:func:`oculi_dsl.cli.command`. Each loads a model (``--model``, ``--device``), runs ONE recipe
(progress bars on stderr over batched forward passes), prints a readable summary, and writes
``--out`` (netCDF) and ``--plot`` (PNG) when given. :func:`run_demo_extras` is what the
``demo`` command adds on top of its own trace.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .cli import add_model_args, command, load_model
from .errors import OculiError

__all__ = ["parse_index", "run_demo_extras"]


class CLIError(OculiError):
    """A command-line value could not be understood."""


def parse_index(text: str | None, what: str) -> Any:
    """``None``/"all" → as is; "3" → 3; "0,5,-1" → [0, 5, -1]; "10:20" → slice(10, 20).

    >>> parse_index("3", "layers"), parse_index("0,5,-1", "layers"), parse_index("10:20", "layers")
    (3, [0, 5, -1], slice(10, 20, None))
    """
    if text is None or text == "all":
        return text
    try:
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            return slice(*parts)
        items = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise CLIError(f"--{what} {text!r} is not understood: give 'all', an int (3), a list "
                       "(0,5,-1) or a range (10:20).") from None
    return items[0] if len(items) == 1 and "," not in text else items


def _token(args: argparse.Namespace, name: str) -> Any:
    text, ident = getattr(args, name), getattr(args, f"{name}_id")
    if text is not None and ident is not None:
        raise CLIError(f"Give --{name} (a token text) or --{name}-id (a token id), not both.")
    return ident if ident is not None else text


def _add_token(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    parser.add_argument(f"--{name}", default=None, metavar="TEXT",
                        help=f"{help} as a single-token text (mind the leading space: ' Paris')")
    parser.add_argument(f"--{name}-id", type=int, default=None, metavar="ID", help=f"{help} as a token id")


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, metavar="FILE.nc", help="write the result as netCDF")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="write a PNG plot")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _write(ds: Any, args: argparse.Namespace, plot: Callable[[str], Any]) -> None:
    from .io import to_netcdf

    if args.out:
        print(f"wrote {to_netcdf(ds, args.out)}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.close(plot(args.plot))
        print(f"wrote {args.plot}")


LENS_EPILOG = """examples:
  oculi-dsl logit-lens "The capital of France is" --every 3
  oculi-dsl logit-lens "The capital of France is" --target " Paris" --out lens.nc --plot lens.png
  oculi-dsl logit-lens "The capital of France is" --layers 20:30 --positions -1 --top-k 5"""


@command("logit-lens", "what each layer would predict: top-k, target trajectory, KL, entropy",
         LENS_EPILOG)
def _logit_lens(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("prompt", help="the prompt text")
    add_model_args(parser)
    parser.add_argument("--top-k", type=int, default=10, help="predictions kept per layer and token")
    _add_token(parser, "target", "token whose probability is tracked (default: final top-1)")
    parser.add_argument("--layers", default=None, help="layers: all (default), 5, 0,5,10 or 20:30")
    parser.add_argument("--positions", default=None, help="token positions (default: all)")
    parser.add_argument("--token", type=int, default=-1, help="position shown in the table (-1)")
    parser.add_argument("--every", type=int, default=1, help="show every n-th layer in the table")
    parser.add_argument("--plot-kind", choices=("heatmap", "trajectory"), default="heatmap")
    _add_output(parser)

    def run(args: argparse.Namespace) -> int:
        from .recipes import format_predictions, logit_lens, plot_logit_lens

        layers, positions = parse_index(args.layers, "layers"), parse_index(args.positions, "positions")
        target = _token(args, "target")
        model = load_model(args)
        ds = logit_lens(model, args.prompt, layers=layers, top_k=args.top_k, target=target,
                        positions=positions)
        print(f"{model}\nlogit lens of {args.prompt!r}, token {args.token}; "
              f"target {ds.attrs['target_token']!r}")
        print(format_predictions(ds, token=args.token, k=min(3, args.top_k), every=args.every))
        traj = ds["target_prob"].isel(token=args.token)
        print(f"P({ds.attrs['target_token']!r}) by layer: "
              + ", ".join(f"L{int(la)} {float(p):.3f}" for la, p in zip(traj["layer"], traj, strict=False)))
        _write(ds, args, lambda path: plot_logit_lens(ds, path, kind=args.plot_kind, token=args.token))
        return 0

    return run


TRACE_EPILOG = """examples:
  oculi-dsl causal-trace "The Eiffel Tower is located in the city of" --subject "Eiffel Tower"
  oculi-dsl causal-trace "The capital of France is" --subject France --kind all --plot trace.png
  oculi-dsl causal-trace "The capital of France is" --subject France \\
      --corrupt "The capital of Poland is" --out trace.nc"""


@command("causal-trace", "ROME causal tracing: restore clean states into a noised run",
         TRACE_EPILOG)
def _causal_trace(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("prompt", help="the prompt text")
    add_model_args(parser)
    parser.add_argument("--subject", required=True, help="text in the prompt to corrupt")
    _add_token(parser, "target", "token whose probability is measured (default: clean top-1)")
    parser.add_argument("--kind", choices=("hidden", "mlp", "attn", "all"), default="hidden",
                        help="what is restored: hidden states, MLP or attention outputs (window)")
    parser.add_argument("--window", type=int, default=10, help="layers restored together (mlp/attn)")
    parser.add_argument("--samples", type=int, default=10, help="noised copies")
    parser.add_argument("--noise", type=float, default=3.0, help="noise scale, × std of embeddings")
    parser.add_argument("--std", default="matrix", help="'matrix', 'subject' or a number")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corrupt", default=None, help="counterfactual prompt instead of noise")
    parser.add_argument("--chunk-size", type=int, default=None, help="cells per forward pass")
    _add_output(parser)

    def run(args: argparse.Namespace) -> int:
        from .recipes import causal_trace, plot_recovery, summary

        kinds = {"hidden": None, "mlp": "mlp", "attn": "attn", "all": [None, "mlp", "attn"]}
        try:
            std: Any = float(args.std)
        except ValueError:
            std = args.std
        target = _token(args, "target")
        model = load_model(args)
        ds = causal_trace(model, args.prompt, subject=args.subject, target=target,
                          kind=kinds[args.kind], window=args.window, samples=args.samples,
                          noise=args.noise, std=std, seed=args.seed, corrupt=args.corrupt,
                          chunk_size=args.chunk_size, progress=not args.quiet)
        print(f"{model}\n{summary(ds)}")
        _write(ds, args, lambda path: plot_recovery(ds, path))
        return 0

    return run


PATCH_EPILOG = """examples:
  oculi-dsl patch --clean "The capital of France is" --corrupt "The capital of Poland is"
  oculi-dsl patch --clean "The capital of France is" --corrupt "The capital of Poland is" \\
      --sites resid_post,attn_out,mlp_out --tokens all --plot patch.png --out patch.nc
  oculi-dsl patch --clean ... --corrupt ... --sites head --layers 20:30 --tokens -1 --metric kl"""


@command("patch", "activation patching: which site/layer/token restores the clean behaviour",
         PATCH_EPILOG)
def _patch(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    add_model_args(parser)
    parser.add_argument("--clean", required=True, help="the clean prompt")
    parser.add_argument("--corrupt", required=True, help="the corrupted prompt (same token length)")
    parser.add_argument("--sites", default="resid_post,attn_out,mlp_out",
                        help="comma-separated sites or guide names (default: %(default)s)")
    parser.add_argument("--layers", default=None, help="layers: all (default), 5, 0,5,10 or 20:30")
    parser.add_argument("--tokens", default=None, help="positions patched one at a time: all, "
                        "4 or 3,4 (default: the whole sequence at once)")
    parser.add_argument("--heads", default=None, help="per-head cells: all or 0,3")
    parser.add_argument("--metric", choices=("prob", "logit_diff", "kl"), default=None,
                        help="default: prob, or logit_diff when a wrong token is given")
    _add_token(parser, "target", "correct token (default: clean top-1)")
    _add_token(parser, "wrong", "wrong token for logit_diff (default: corrupted top-1)")
    parser.add_argument("--direction", choices=("denoise", "noise"), default="denoise")
    parser.add_argument("--position", type=int, default=-1, help="position measured (default -1)")
    parser.add_argument("--chunk-size", type=int, default=None, help="cells per forward pass")
    _add_output(parser)

    def run(args: argparse.Namespace) -> int:
        from .recipes import activation_patching, plot_recovery, summary

        grid = {name: parse_index(getattr(args, name), name) for name in ("layers", "tokens", "heads")}
        target, wrong = _token(args, "target"), _token(args, "wrong")
        model = load_model(args)
        ds = activation_patching(
            model, args.clean, args.corrupt, sites=[s.strip() for s in args.sites.split(",") if s.strip()],
            metric=args.metric, target=target, wrong=wrong, direction=args.direction,
            position=args.position, chunk_size=args.chunk_size, progress=not args.quiet, **grid)
        print(f"{model}\n{summary(ds)}")
        _write(ds, args, lambda path: plot_recovery(ds, path))
        return 0

    return run


def run_demo_extras(model: Any, out_prefix: str, prompt: str = "The capital of France is",
                    subject: str = "France", progress: bool = True) -> str:
    """Logit lens + causal trace on ``prompt`` for the ``demo`` command; returns the summary.

    Writes ``{out_prefix}-logit-lens.nc/.png`` and ``{out_prefix}-causal-trace.nc/.png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import to_netcdf
    from .recipes import (
        causal_trace,
        format_predictions,
        logit_lens,
        plot_logit_lens,
        plot_recovery,
        summary,
    )

    lens = logit_lens(model, prompt, top_k=5)
    trace = causal_trace(model, prompt, subject=subject, progress=progress)
    written = []
    for name, ds, plot in (("logit-lens", lens, lambda p: plot_logit_lens(lens, p)),
                           ("causal-trace", trace, lambda p: plot_recovery(trace, p))):
        written.append(str(to_netcdf(ds, f"{out_prefix}-{name}.nc")))
        plt.close(plot(f"{out_prefix}-{name}.png"))
        written.append(f"{out_prefix}-{name}.png")
    every = max(1, lens.sizes["layer"] // 6)
    return "\n".join([f"logit lens of {prompt!r} (last token, every {every} layers):",
                      format_predictions(lens, k=3, every=every), "", summary(trace), "",
                      "wrote " + ", ".join(written)])
