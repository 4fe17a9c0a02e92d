"""Checking the values read from files and configs: strict types, finite numbers in range, patterns matched in
linear time, and values shown in messages at a bounded size.

Every check raises the error kind its caller names (:class:`~lispetorch.errors.ConfigError` by default,
:class:`~lispetorch.errors.AdapterFormatError` for adapter files) with a message naming the file (``source``),
the key and the value: ``train.yaml: 'learning_rate' must be > 0 and ≤ 10, got 1000.0 (float)``.

- Types are strict: a string is not a boolean (``"false"`` is refused, not read as true), a boolean is not a
  number, a float is not an integer.
- Numbers are finite and in the range the caller gives.
- Values are shown through :func:`show`, a ``reprlib`` repr of bounded size: a value built from nested YAML
  aliases, or a string of a megabyte, is shown in a line.
- Regular expressions are compiled and matched with RE2 (``google-re2``), whose time is linear in the text:
  a pattern such as ``(.|.)*!`` cannot backtrack. RE2 reads the usual syntax (alternation, classes, repetition,
  groups, anchors) and refuses lookaround and backreferences, which a pattern taken from a file cannot use here.
"""

from __future__ import annotations

import functools
import json
import math
import os
import reprlib
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import re2

from .errors import ConfigError, DataError


class _BoundedRepr(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 2, 200, 80, 40
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdeque = 6

    def repr_int(self, x, level):
        if x.bit_length() > 128:  # repr of a huge int is slow, and refused beyond 4300 digits
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_REPR = _BoundedRepr()


SHOWN = 320  # the most characters a value takes in a message


def show(value) -> str:
    """``repr(value)`` cut to a bounded size: strings to 200 characters (a long module name fits), containers to 6
    items and 2 levels, the whole to :data:`SHOWN` characters."""
    text = _REPR.repr(value)
    return text if len(text) <= SHOWN else text[:SHOWN - 3] + "..."


def type_name(value) -> str:
    """The name a message gives a value's type: ``null`` for None, else the Python type's name."""
    return "null" if value is None else type(value).__name__


def _fail(error: type[Exception], source: str, key: str, expected: str, value):
    where = f"{source}: " if source else ""
    raise error(f"{where}'{key}' must be {expected}, got {show(value)} ({type_name(value)})")


def bounds(lo=None, hi=None, lo_open: bool = False, hi_open: bool = False) -> str:
    """The text of a range for a message: ``"> 0 and ≤ 10"``."""
    def text(x) -> str:
        return f"{x:g}" if isinstance(x, float) else str(x)

    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '≥'} {text(lo)}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '≤'} {text(hi)}")
    return " and ".join(parts)


def _in_range(x, lo, hi, lo_open: bool, hi_open: bool) -> bool:
    if lo is not None and (x <= lo if lo_open else x < lo):
        return False
    return not (hi is not None and (x >= hi if hi_open else x > hi))


def boolean(value, key: str, source: str = "", error: type[Exception] = ConfigError) -> bool:
    """``value`` if it is ``True`` or ``False``; a string (``"false"``), a number or null is refused."""
    if not isinstance(value, bool):
        _fail(error, source, key, "true or false", value)
    return value


def integer(value, key: str, source: str = "", lo: int | None = None, hi: int | None = None,
            error: type[Exception] = ConfigError, integral_float: bool = False) -> int:
    """``value`` if it is an integer (not a boolean) in ``[lo, hi]``; with ``integral_float``, a float with an
    integral value (``3.0``) is taken as that integer. A bound of 1 is said ``> 0``."""
    if isinstance(value, float) and integral_float and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(error, source, key, "an integer", value)
    if not _in_range(value, lo, hi, False, False):
        _fail(error, source, key, bounds(0, hi, lo_open=True) if lo == 1 else bounds(lo, hi), value)
    return value


def number(value, key: str, source: str = "", lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False, error: type[Exception] = ConfigError) -> float:
    """``value`` as a float if it is a finite number (an int or a float, not a boolean) in the range
    ``lo`` … ``hi`` (each bound excluded when its ``*_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(error, source, key, "a number", value)
    try:
        x = float(value)
    except OverflowError:  # an int beyond the float range
        x = math.inf
    if not math.isfinite(x) or not _in_range(x, lo, hi, lo_open, hi_open):
        _fail(error, source, key, bounds(lo, hi, lo_open, hi_open) or "a finite number", value)
    return x


def string(value, key: str, source: str = "", error: type[Exception] = ConfigError) -> str:
    """``value`` if it is a string."""
    if not isinstance(value, str):
        _fail(error, source, key, "a string", value)
    return value


# --- patterns ----------------------------------------------------------------------------------------------------
_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # the error is raised, with the pattern named, rather than logged as well


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str):
    return re2.compile(pattern, _OPTIONS)


def _error_text(e: Exception) -> str:
    arg = e.args[0] if e.args else e
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


def compile_pattern(value, key: str, source: str = "", error: type[Exception] = ConfigError, form: str = "{}"):
    """The RE2 regular expression ``form.format(value)``; ``value`` must be a string RE2 compiles (``form`` is
    how the caller anchors it, e.g. PEFT's ``(.*\\.)?({})$``).

    Raises:
        ``error``: not a string, or a pattern RE2 cannot compile (lookaround, backreferences, a syntax error, a
            pattern too large), naming the file, the key and the pattern.
    """
    if not isinstance(value, str):
        _fail(error, source, key, "a regular expression (a string)", value)
    try:
        return _compiled(form.format(value))
    except re2.error as e:
        where = f"{source}: " if source else ""
        raise error(f"{where}'{key}' is not a valid regular expression (RE2 syntax): {show(value)} "
                    f"({_error_text(e)}; lookaround and backreferences are not supported)") from None


def fullmatch(pattern: str, text: str) -> bool:
    """Whether the RE2 pattern matches the whole of ``text`` (in time linear in ``text``).

    Raises:
        ConfigError: a pattern RE2 cannot compile.
    """
    return compile_pattern(pattern, "pattern").fullmatch(text) is not None


PEFT_PATTERN = r"(.*\.)?({})$"


def suffix_match(key: str, name: str) -> bool:
    """PEFT's rule for a ``rank_pattern`` / ``alpha_pattern`` key: the regular expression ``key`` matches the
    module name or a dotted suffix of it (PEFT's ``re.match(rf"(.*\\.)?({key})$", name)``), here with RE2."""
    return compile_pattern(key, "pattern key", form=PEFT_PATTERN).match(name) is not None


# --- files ---------------------------------------------------------------------------------------------------------
def file_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, for a message: ``"a FIFO"``, ``"a socket"``, ``"a directory"``…"""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike, why: str = "data is read from regular files only") -> TextIO:
    """``path`` opened for reading as UTF-8 text, if it is a regular file. It is opened without blocking and checked
    on the open descriptor, so a FIFO or a device put in its place is refused, never waited on.

    Raises:
        DataError: not a regular file (what it is named, and ``why``), or unreadable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DataError(f"{path}: {file_kind(mode)}, not a regular file; {why}")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return open(fd, encoding="utf-8")


def _not_utf8(path: Path) -> str:
    """``path:line: not UTF-8 text (…)`` for a file that failed to decode, the line of its first bad byte."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})"
    return f"{path}: not UTF-8 text"


def jsonl(path: str | os.PathLike, why: str = "data is read from regular files only") -> Iterator[tuple[str, object]]:
    """``(where, value)`` for each non-blank line of the JSON Lines file ``path`` (a regular file, see
    :func:`open_regular`); ``where`` is ``path:line`` for messages.

    Raises:
        DataError: not a regular file, text that is not UTF-8, or a line that is not JSON or cannot be read as
            such (an integer of more digits than Python reads, arrays nested too deep) (its ``path:line``).
    """
    path = Path(path)
    with open_regular(path, why) as fh:
        lineno = 0
        while True:
            lineno += 1
            try:
                line = fh.readline()
            except UnicodeDecodeError:
                raise DataError(_not_utf8(path)) from None
            if not line:
                break
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            except (ValueError, RecursionError) as e:  # an integer of too many digits; arrays nested too deep
                raise DataError(f"{path}:{lineno}: JSON that cannot be read ({show(str(e) or type(e).__name__)})") \
                    from None
            yield f"{path}:{lineno}", value
