"""The reader of LispE's syntax: text to forms, each list remembering its line.

What it reads, as LispE writes it:

- lists ``( … )``; ``()`` is the empty list (nil);
- integers (``70``, ``-1``, ``0x1F``), numbers (``2e-4``, ``1.0``), ``true``/``false``/``nil`` as symbols;
- strings in double quotes with the escapes ``\\n \\t \\r \\" \\\\``, and raw strings in backquotes
  (`` `C:\\path` ``: nothing is escaped);
- ``'x`` for ``(quote x)``;
- comments: ``;`` to the end of the line, and ``;;`` … ``;;`` blocks over several lines (a line whose comment
  starts with ``;;`` and has a second ``;;`` later on the same line is a one-line block);
- the composition dot: ``(f . g x)`` is ``(f (g x))``, so ``(tensor_div l . tensor_create . floats n)`` is
  ``(tensor_div l (tensor_create (floats n)))``;
- ``{k:v k2:v2}``, a dictionary literal, read as ``(dictionary k v k2 v2)``.

Every list is a :class:`Form` (a ``list`` subclass) carrying ``line`` and the ``text`` it was read from, for
error messages; symbols are :class:`Symbol` (a ``str`` subclass), strings are plain ``str``.
"""

from __future__ import annotations

import re

from ..errors import LispetorchError


class LispeSyntaxError(LispetorchError, ValueError):
    """Text that is not LispE: the message names the file, the line and what was wrong."""


class Symbol(str):
    """A LispE symbol (a name)."""

    __slots__ = ()


class Form(list):
    """A list read from the text, with the line it starts on and its source text."""

    __slots__ = ("line", "text")

    def __init__(self, items=(), line: int = 0, text: str = ""):
        super().__init__(items)
        self.line = line
        self.text = text


QUOTE = Symbol("quote")
DOT = Symbol(".")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "0": "\0"}
_INT = re.compile(r"[+-]?\d+\Z")
_HEX = re.compile(r"[+-]?0x[0-9a-fA-F]+\Z")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?\Z")
_DELIMITERS = set("()'\";`{}") | set(" \t\r\n")
MAX_DEPTH = 200  # lists, dictionaries and quotes nested deeper than this are refused (the evaluator recurses too)


def atom(token: str):
    """The value of a bare token: an int, a float, or a symbol."""
    if _INT.match(token):
        return int(token)
    if _HEX.match(token):
        return int(token, 16)
    if _FLOAT.match(token) and any(c.isdigit() for c in token):
        return float(token)
    return Symbol(token)


class _Reader:
    def __init__(self, text: str, filename: str):
        self.text, self.filename, self.pos, self.line = text, filename, 0, 1
        self.depth = 0

    def error(self, message: str, line: int | None = None):
        raise LispeSyntaxError(f"{self.filename}:{line or self.line}: {message}")

    def skip(self) -> None:
        """Skips blanks and comments."""
        text, n = self.text, len(self.text)
        while self.pos < n:
            c = text[self.pos]
            if c == "\n":
                self.line += 1
                self.pos += 1
            elif c in " \t\r":
                self.pos += 1
            elif c == ";":
                if text.startswith(";;", self.pos) and not self._one_line_comment():
                    start_line = self.line
                    end = text.find(";;", self.pos + 2)
                    if end < 0:
                        self.error("a ;; comment block is not closed by ;;", start_line)
                    self.line += text.count("\n", self.pos, end)
                    self.pos = end + 2
                else:
                    end = text.find("\n", self.pos)
                    self.pos = n if end < 0 else end
            else:
                return

    def _one_line_comment(self) -> bool:
        # `;; title` alone on its line is an ordinary comment unless the block is closed further down:
        # LispE's blocks open with a line that is only `;;`.
        end = self.text.find("\n", self.pos)
        rest = self.text[self.pos + 2: len(self.text) if end < 0 else end]
        return rest.strip() != ""

    def read(self):
        self.skip()
        if self.pos >= len(self.text):
            self.error("unexpected end of text")
        if self.text[self.pos] not in "({'":
            return self._read()
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                self.error(f"lists nested more than {MAX_DEPTH} deep")
            return self._read()
        finally:
            self.depth -= 1

    def _read(self):
        c = self.text[self.pos]
        if c == "(":
            return self.read_list()
        if c == "{":
            return self.read_dict()
        if c in ")}":
            self.error(f"unexpected {c!r}")
        if c == "'":
            line = self.line
            self.pos += 1
            return Form([QUOTE, self.read()], line, "'")
        if c == '"':
            return self.read_string()
        if c == "`":
            end = self.text.find("`", self.pos + 1)
            if end < 0:
                self.error("a raw string (`…`) is not closed")
            value = self.text[self.pos + 1: end]
            self.line += value.count("\n")
            self.pos = end + 1
            return value
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in _DELIMITERS:
            self.pos += 1
        token = self.text[start: self.pos]
        try:
            return atom(token)
        except ValueError as e:  # an integer of more digits than Python reads
            self.error(f"the number {token[:20]}… ({len(token)} characters) cannot be read: {e}")

    def read_string(self) -> str:
        out, start_line = [], self.line
        self.pos += 1
        text, n = self.text, len(self.text)
        while self.pos < n:
            c = text[self.pos]
            if c == '"':
                self.pos += 1
                return "".join(out)
            if c == "\\" and self.pos + 1 < n:
                nxt = text[self.pos + 1]
                out.append(_ESCAPES.get(nxt, "\\" + nxt))
                self.pos += 2
                continue
            if c == "\n":
                self.line += 1
            out.append(c)
            self.pos += 1
        self.error("a string is not closed", start_line)

    def read_list(self) -> Form:
        start, line = self.pos, self.line
        self.pos += 1
        items = []
        while True:
            self.skip()
            if self.pos >= len(self.text):
                self.error("a list opened here is not closed", line)
            if self.text[self.pos] == ")":
                self.pos += 1
                break
            items.append(self.read())
        return compose(Form(items, line, self.text[start: self.pos]), self.filename)

    def read_dict(self) -> Form:
        start, line = self.pos, self.line
        self.pos += 1
        items = [Symbol("dictionary")]
        while True:
            self.skip()
            if self.pos >= len(self.text):
                self.error("a dictionary opened here is not closed", line)
            if self.text[self.pos] == "}":
                self.pos += 1
                break
            if self.text[self.pos] == ":":
                self.pos += 1
                continue
            value = self.read()
            if isinstance(value, Symbol) and value.endswith(":") and len(value) > 1:  # key:value with no space
                value = atom(value[:-1])
            items.append(value)
        if len(items) % 2 == 0:
            self.error("a dictionary needs keys and values in pairs", line)
        return Form(items, line, self.text[start: self.pos])


def compose(form: Form, filename: str = "<lispe>") -> Form:
    """``(f . g x)`` → ``(f (g x))``, repeatedly: everything after a lone dot is one call."""
    parts = []  # the items before each dot, outermost first
    rest = list(form)
    while True:
        dots = [i for i, item in enumerate(rest) if isinstance(item, Symbol) and item == DOT]
        if not dots:
            break
        i = dots[0]
        if i == 0 or i == len(rest) - 1:
            raise LispeSyntaxError(f"{filename}:{form.line}: a composition dot needs a function on each side: "
                                   f"{form.text}")
        parts.append(rest[:i])
        rest = rest[i + 1:]
    if not parts:
        return form
    if len(parts) > MAX_DEPTH:
        raise LispeSyntaxError(f"{filename}:{form.line}: more than {MAX_DEPTH} composition dots in one list (each "
                               "nests a call)")
    out = Form(rest, form.line, form.text)
    for items in reversed(parts):
        out = Form([*items, out], form.line, form.text)
    return out


def read_lines(text: str, filename: str = "<lispe>") -> list[tuple[int, object]]:
    """Every form of ``text``, in order, each with the line it starts on (a bare name or value has no line of its
    own)."""
    reader = _Reader(text, filename)
    forms = []
    while True:
        reader.skip()
        if reader.pos >= len(text):
            return forms
        line = reader.line
        forms.append((line, reader.read()))


def read_all(text: str, filename: str = "<lispe>") -> list:
    """Every form of ``text``, in order."""
    return [form for _, form in read_lines(text, filename)]


def read_one(text: str, filename: str = "<lispe>"):
    """The first form of ``text``."""
    forms = read_all(text, filename)
    if not forms:
        raise LispeSyntaxError(f"{filename}:1: no form to read")
    return forms[0]
