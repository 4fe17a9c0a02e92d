"""``lispetorch run SCRIPT.hy [ARGS…]``: runs a Hy script with the primitives and the LispE-style macros in scope;
``lispetorch run SCRIPT.lisp [ARGS…]`` runs a LispE script with LispE's own syntax and semantics
(:mod:`lispetorch.lisp.lispe_eval`).

The script runs as ``__main__`` with ``sys.argv`` set to the script and its arguments. When it fails, the
traceback shows the script's own frames (and those of any other user file it called), not the frames of
lispetorch, Hy, torch or transformers underneath; ``LISPETORCH_DEBUG=1`` shows everything.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import types
from pathlib import Path

import hy
import hy.compiler
import hy.errors
import hy.macros

from . import MACRO_MODULE, lispe_eval, lispe_reader, primitives

_PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)  # lispetorch/
_HIDDEN_ROOTS = tuple({str(Path(p).resolve()) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)} |
                      {_PACKAGE_DIR})


def script_module(path: str | os.PathLike, name: str = "__main__") -> types.ModuleType:
    """A fresh module for the script at ``path``: the primitives as globals and the macros required."""
    module = types.ModuleType(name)
    module.__file__ = str(path)
    module.__dict__.update(primitives())
    module.sys = sys  # scripts read their arguments from sys.argv
    hy.macros.require(MACRO_MODULE, module, assignments="ALL")
    return module


def execute(path: str | os.PathLike, argv: list[str] | tuple[str, ...] = ()) -> dict:
    """Runs the Hy script at ``path`` with ``sys.argv = [path, *argv]``; returns its global variables.

    Raises whatever the script raises (``hy.errors.HyLanguageError`` for a script that does not compile).
    Whatever its name, the file is read as Hy; :func:`execute_lispe` reads LispE.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no script at {path}")
    source = path.read_text(encoding="utf-8")
    module = script_module(path)
    saved_argv, saved_main, saved_path0 = sys.argv, sys.modules.get("__main__"), list(sys.path)
    sys.argv = [str(path), *argv]
    sys.modules["__main__"] = module
    sys.path.insert(0, str(path.resolve().parent))
    try:
        tree = hy.read_many(source, filename=str(path), skip_shebang=True)
        code = hy.compiler.hy_compile(tree, module, filename=str(path), source=source)
        exec(compile(code, str(path), "exec"), module.__dict__)
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path0
        if saved_main is not None:
            sys.modules["__main__"] = saved_main
    return module.__dict__


def execute_lispe(path: str | os.PathLike, argv: list[str] | tuple[str, ...] = ()) -> dict:
    """Runs the LispE script at ``path`` (its arguments in ``_args``); returns its global variables.

    Raises :class:`lispetorch.lisp.lispe_eval.LispeError` (naming the script, line and form) when it fails.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no script at {path}")
    return lispe_eval.run(path, list(argv))


def _user_frame(frame: traceback.FrameSummary) -> bool:
    filename = frame.filename
    if filename.startswith("<"):
        return False
    resolved = str(Path(filename).resolve())
    return not any(resolved == root or resolved.startswith(root + os.sep) for root in _HIDDEN_ROOTS)


def format_error(error: BaseException) -> str:
    """The report of a failed script: its own frames, then the error."""
    if isinstance(error, hy.errors.HyLanguageError):  # does not compile: Hy's message shows the place
        return "".join(traceback.format_exception_only(type(error), error))
    if isinstance(error, (lispe_eval.LispeError, lispe_reader.LispeSyntaxError)):  # LispE: file, line, form
        return f"{error}\n"
    frames = [f for f in traceback.extract_tb(error.__traceback__) if _user_frame(f)]
    lines = ["Traceback (most recent call last):\n", *traceback.StackSummary.from_list(frames).format()] if frames \
        else []
    return "".join(lines + traceback.format_exception_only(type(error), error))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("script", help="the script to run: Hy (.hy) or LispE (.lisp)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script (sys.argv[1:])")


def main(args: argparse.Namespace) -> int:
    if not Path(args.script).is_file():
        raise FileNotFoundError(f"no script at {args.script}")  # the command reports it as bad input
    try:
        (execute_lispe if Path(args.script).suffix == ".lisp" else execute)(args.script, args.args)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    except Exception as err:  # the script's error: report it in the script's terms
        if os.environ.get("LISPETORCH_DEBUG"):
            raise
        print(format_error(err), end="", file=sys.stderr)
        return 1
    return 0
