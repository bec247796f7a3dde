"""``oculi-dsl`` command line: run analyses on a model, write netCDF (+ PNG) and a summary.

Each subcommand is one small function registered in :data:`COMMANDS`; recipes do the work,
the CLI only parses arguments, shows progress and prints. User mistakes (unknown site, bad
prompt, missing file) print a one-line error and exit with status 2, never a traceback.

    oculi-dsl demo --out demo.nc
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import OculiError

Runner = Callable[[argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], Runner]
# name → (one-line help, epilog with examples, configure(parser) returning run(args))
COMMANDS: dict[str, tuple[str, str, Configure]] = {}


def command(name: str, help: str, epilog: str = "") -> Callable[[Configure], Configure]:
    """Register a subcommand: the decorated function adds its arguments and returns its runner."""

    def wrap(configure: Configure) -> Configure:
        COMMANDS[name] = (help, epilog, configure)
        return configure

    return wrap


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model and --device, shared by every subcommand."""
    parser.add_argument("--model", default=None,
                        help="model path, hub id or alias (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")


def load_model(args: argparse.Namespace) -> Any:
    from .models import load

    return load(args.model, device=args.device)


@command("demo", "trace the default model, run a logit lens and a causal trace; write .nc and .png",
         "example:\n  oculi-dsl demo --out demo.nc   # also writes demo-logit-lens.nc/.png, "
         "demo-causal-trace.nc/.png")
def _demo(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    add_model_args(parser)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--out", default="oculi-demo.nc", help="netCDF file to write")
    parser.add_argument("--subject", default="France", help="subject of the prompt for the causal trace")

    def run(args: argparse.Namespace) -> int:
        from .io import to_netcdf
        from .trace import trace

        model = load_model(args)
        print(model)
        with trace(model, args.prompt) as t:
            t.layers[:].resid_post.save("resid_post")
            t.layers[:].attn.pattern.save("pattern")
            t.logits[-1].softmax(-1).save("probs")
        ds = t.result
        path = to_netcdf(ds, args.out)
        probs = ds["probs"]
        top = probs.argsort()[::-1][:5].values
        tok = model.tokenizer
        print(f"prompt: {args.prompt!r} ({ds.sizes['token']} tokens)")
        print("next token: " + ", ".join(f"{tok.decode([int(i)])!r} {float(probs[int(i)]):.3f}" for i in top))
        norms = (ds["resid_post"].isel(token=-1) ** 2).sum("d_model") ** 0.5
        print("residual norm at the last token, every 5th layer: "
              + ", ".join(f"L{int(layer)} {float(v):.1f}" for layer, v in zip(norms.layer[::5], norms[::5], strict=False)))
        print(f"wrote {path} ({', '.join(f'{k}{tuple(v.dims)}' for k, v in ds.data_vars.items())})")
        from ._cli_patching import run_demo_extras

        print(run_demo_extras(model, str(Path(args.out).with_suffix("")), args.prompt, args.subject))
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oculi-dsl", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Mechanistic interpretability on transformer LMs: one forward pass, labeled results.")
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, epilog, configure) in COMMANDS.items():
        sub = subs.add_parser(name, help=summary, description=summary, epilog=epilog or None,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(run=configure(sub))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``oculi-dsl`` console script."""
    _register_recipe_commands()
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except OculiError as err:
        print(f"oculi-dsl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
        print(f"oculi-dsl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _register_recipe_commands() -> None:
    """Import the modules whose subcommands register themselves (kept out of import time)."""
    import importlib

    for module in _COMMAND_MODULES:
        importlib.import_module(module)


# Modules that define more subcommands with @command (one line each).
_COMMAND_MODULES: list[str] = ["oculi_dsl._cli_heads", "oculi_dsl._cli_patching"]


