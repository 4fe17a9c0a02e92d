"""The `lispetorch` command.

Each subcommand lives in the module that implements it; that module provides
`configure(parser)` (adds its arguments) and `main(args) -> int` (runs it). Bad input raises
ValueError/TypeError/OSError with a message naming what was wrong; the command prints that message.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__

# name -> (module, one-line help). Modules are imported only when their subcommand runs.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lispetorch.train.cli", "train a LoRA adapter from a YAML config"),
    "run": ("lispetorch.lisp.runner", "run a Hy (.hy) or LispE (.lisp) script with the primitives in scope"),
    "default-model": ("lispetorch.default_model", "build (once) and show the embedded default model"),
    "export": ("lispetorch.merged_export", "merge a LoRA adapter into a Hugging Face model directory, shard by shard"),
    "combine": ("lispetorch.combine.cli", "find the best combination of LoRA checkpoints and build it"),
    "experiment": ("lispetorch.experiment", "run a grid of training runs (ablation, sweep) and tabulate the results"),
    "validate": ("lispetorch.checkup", "check a LoRA setup: adapters, frozen base, loss, save/load, merge, PEFT"),
    "analyze": ("lispetorch.analysis", "statistics and ΔW spectra of an adapter's modules (rank utilisation)"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lispetorch", description="Low-rank adaptation for Hugging Face models.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        args = parser.parse_args(argv)
        if args.version:
            print(__version__)
            return 0
        parser.print_help()
        return 0 if not argv else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"lispetorch {name}", description=SUBCOMMANDS[name][1])
    module.configure(sub)
    args = sub.parse_args(rest)
    try:
        return int(module.main(args) or 0)
    except (ValueError, TypeError, OSError) as err:
        # Bad input: the library's messages name what was wrong; a traceback would only hide it.
        # LISPETORCH_DEBUG=1 shows the traceback anyway.
        if os.environ.get("LISPETORCH_DEBUG"):
            raise
        print(f"lispetorch {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lispetorch {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
