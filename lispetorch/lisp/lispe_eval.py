"""The LispE evaluator: runs forms read by :mod:`lispetorch.lisp.lispe_reader` with LispE's semantics.

Scopes are LispE's: ``setq`` at top level sets a global, inside a function or method a local; ``setg`` sets a
global from anywhere; ``setqi`` sets a field of the instance a method runs on. A name is looked up in the
function's locals, then the instance's fields, then the globals, then the built-in functions. Truth is LispE's
(:func:`lispetorch.lisp.lispe.truthy`): nil, false, 0 and empty strings, lists and dictionaries are false.

The primitives are lispetorch's own (the ``torch_*``/``tensor_*`` functions of :mod:`lispetorch.lisp`, called,
not reimplemented); this module adds LispE's special forms (``if``, ``check``, ``loop``, ``class@``, …) and the
functions of LispE's core library that scripts use (:data:`FUNCTIONS`).

An error names the script, the line and the form that failed, then the chain of function calls that led there.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..errors import LispetorchError
from . import lispe_tiktoken, primitives
from .checks import PrimitiveError, describe
from .lispe import at as _at_value
from .lispe import count, integers, string, truthy
from .lispe import floats as _floats
from .lispe import strings as _strings
from .lispe_reader import Form, LispeSyntaxError, Symbol, read_lines

LIBRARIES = {"lispe_torch": {}, "lispe_tiktoken": lispe_tiktoken.PRIMITIVES}


class LispeError(LispetorchError, ValueError):
    """An error in a LispE script: ``file:line: form: message``, then the calls that led there."""

    def __init__(self, message: str, location: str, form_text: str):
        self.detail, self.location, self.form_text, self.trail = message, location, form_text, []
        super().__init__(message)

    def __str__(self) -> str:
        lines = [f"{self.location}: {self.form_text}", f"  {self.detail}"]
        lines += [f"  in {name}, called at {where}: {text}" for name, where, text in self.trail]
        return "\n".join(lines)


class _Return(Exception):  # noqa: N818  (control flow, not an error)
    def __init__(self, value):
        self.value = value


class _Break(Exception):  # noqa: N818
    pass


def _short(text: str, limit: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Function:
    """A function defined by ``defun`` or ``lambda``: parameters (with optional defaults) and a body."""

    def __init__(self, name: str, params, body: list, line: int):
        self.name, self.body, self.line = name, body, line
        self.params = []  # (name, default form or _REQUIRED)
        for p in params:
            if isinstance(p, Symbol):
                self.params.append((str(p), _REQUIRED))
            elif isinstance(p, Form) and len(p) == 2 and isinstance(p[0], Symbol):
                self.params.append((str(p[0]), p[1]))
            else:
                raise TypeError(f"defun {name}: a parameter is a name or (name default), got {_text(p)}")

    def __repr__(self) -> str:
        return f"<function {self.name}>"


_REQUIRED = object()


class LispeClass:
    """A class defined by ``class@``: its fields (constructor parameters) and methods."""

    def __init__(self, name: str, fields: Function, methods: dict[str, Function]):
        self.name, self.fields, self.methods = name, fields, methods

    def __repr__(self) -> str:
        return f"<class@ {self.name}>"


class Instance:
    """An object of a ``class@``: its fields by name."""

    def __init__(self, cls: LispeClass):
        self.cls, self.fields, self.cleanups = cls, {}, []

    def __repr__(self) -> str:
        return f"<{self.cls.name} instance>"


class Frame:
    """Where names live while a form runs: locals (the globals at top level) and the instance of a method."""

    __slots__ = ("locals", "instance", "toplevel")

    def __init__(self, local_vars: dict, instance: Instance | None = None, toplevel: bool = False):
        self.locals, self.instance, self.toplevel = local_vars, instance, toplevel


def _text(x) -> str:
    if isinstance(x, Form):
        return _short(x.text) if x.text else "(" + " ".join(_text(i) for i in x) + ")"
    if isinstance(x, str) and not isinstance(x, Symbol):
        return repr(x)
    return str(x)


# --- LispE's core functions ----------------------------------------------------------------------------------
def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def add(*values):
    """``+``: numbers add; a string first concatenates the text of everything after it; tensors add."""
    if not values:
        return 0
    first = values[0]
    if isinstance(first, str):
        return "".join(v if isinstance(v, str) else string(v) for v in values)
    total = first
    for v in values[1:]:
        if isinstance(v, str):
            raise TypeError(f"+ cannot add the string {v!r} to {describe(total)}: put a string first to concatenate")
        total = total + v
    return total


def sub(first, *rest):
    """``-``: subtraction; with one value, its negation."""
    if not rest:
        return -first
    for v in rest:
        first = first - v
    return first


def mul(*values):
    total = 1
    for v in values:
        total = total * v
    return total


def div(first, *rest):
    """``/``: division; two integers that divide exactly give an integer."""
    for v in rest:
        if _is_number(v) and v == 0:
            raise ZeroDivisionError(f"division of {describe(first)} by zero")
        if isinstance(first, int) and isinstance(v, int) and not isinstance(first, bool) and first % v == 0:
            first = first // v
        else:
            first = first / v
    return first


def mod(a, b):
    return a % b


def _chain(op):
    def compare(a, b, *more):
        values = [a, b, *more]
        return all(op(x, y) for x, y in itertools.pairwise(values))
    return compare


def equal(a, b, *more):
    values = [a, b, *more]
    return all(_same(x, y) for x, y in itertools.pairwise(values))


def _same(x, y) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return bool(torch.equal(torch.as_tensor(x), torch.as_tensor(y)))
    return x == y


def lispe_round(value, divisor=None):
    """``(round x)``: the nearest integer (halves away from zero); ``(round x d)``: that integer divided by d,
    the form LispE scripts use to keep decimals, ``(round (* v 100) 100)``."""
    r = math.floor(abs(value) + 0.5) * (1 if value >= 0 else -1)
    return r if divisor is None else r / divisor


def lispe_floor(value):
    return math.floor(value)


def lispe_ceiling(value):
    return math.ceil(value)


def fill(text, n):
    """``(fill "=" 70)``: ``text`` repeated ``n`` times."""
    return text * count(n)


def _print(stream, values, end):
    stream.write(" ".join(string(v) for v in values) + end)
    stream.flush()


def lispe_print(*values):
    _print(sys.stdout, values, "")


def lispe_println(*values):
    _print(sys.stdout, values, "\n")


def printerr(*values):
    _print(sys.stderr, values, "")


def printerrln(*values):
    _print(sys.stderr, values, "\n")


def lispe_list(*values):
    return list(values)


def pushfirst(container, value):
    """``(pushfirst l v)``: ``v`` inserted at the front of the list ``l``; returns ``l``."""
    if not isinstance(container, list):
        raise TypeError(f"pushfirst expects a list, got {describe(container)}")
    container.insert(0, value)
    return container


def extend(container, values):
    """``(extend l1 l2)``: the elements of ``l2`` appended to ``l1``; returns ``l1``."""
    if not isinstance(container, list):
        raise TypeError(f"extend expects a list, got {describe(container)}")
    container.extend(values)
    return container


def pop(container, key=None):
    """``(pop l)``: removes the last element (or the one at ``key``, or a dictionary's key); returns the container."""
    if isinstance(container, dict):
        container.pop(key)
    elif key is None:
        container.pop()
    else:
        container.pop(key)
    return container


def lispe_copy(value):
    """``(copy x)`` / ``(clone x)``: a deep copy (tensors are cloned)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Instance):
        other = Instance(value.cls)
        other.fields = {k: lispe_copy(v) for k, v in value.fields.items()}
        return other
    if isinstance(value, (list, dict, tuple)):
        return copy.deepcopy(value)
    return value


def slice_of(container, begin=0, end=None):
    """``(@@ l beg end)``: elements ``beg`` to ``end`` (excluded) of a list, string or tensor."""
    if not isinstance(container, (list, tuple, str, torch.Tensor)):
        raise TypeError(f"@@ expects a list, string or tensor, got {describe(container)}")
    return container[int(begin): None if end is None else int(end)]


def at(container, *keys):
    """``(@ c k…)``: nested access; ``(@ obj 'field)`` reads a field of an instance."""
    if isinstance(container, Instance):
        if not keys:
            return container
        name = str(keys[0])
        if name not in container.fields:
            raise KeyError(f"{container.cls.name} has no field {name!r}; its fields are {list(container.fields)}")
        return at(container.fields[name], *keys[1:]) if len(keys) > 1 else container.fields[name]
    return _at_value(container, *keys)


def set_at(container, *keys_and_value):
    """``(set@ c k… v)``: sets an element of a list or dictionary, or a field of an instance; returns ``c``."""
    *keys, value = keys_and_value
    if not keys:
        raise TypeError("set@ expects a container, one key or more, and a value")
    target = at(container, *keys[:-1]) if len(keys) > 1 else container
    if isinstance(target, Instance):
        target.fields[str(keys[-1])] = value
    else:
        target[keys[-1]] = value
    return container


def lispe_integers(*values):
    """``(integers 1 2 3)``, or ``(integers l)`` with a list (or tensor): a list of integers."""
    if len(values) == 1 and isinstance(values[0], (list, tuple, torch.Tensor)):
        values = values[0].tolist() if isinstance(values[0], torch.Tensor) else values[0]
    return integers(*[int(v) if isinstance(v, str) else v for v in values])


def lispe_floats(*values):
    """``(floats 1 2.5)``, or ``(floats l)`` with a list (or tensor): a list of numbers."""
    if len(values) == 1 and isinstance(values[0], (list, tuple, torch.Tensor)):
        values = values[0].tolist() if isinstance(values[0], torch.Tensor) else values[0]
    return _floats(*[float(v) if isinstance(v, str) else v for v in values])


def lispe_strings(*values):
    """``(strings "a" "b")``, or ``(strings l)`` with a list."""
    if len(values) == 1 and isinstance(values[0], (list, tuple)):
        values = values[0]
    return _strings(*[v if isinstance(v, str) else string(v) for v in values])


def rho(*args):
    """``(rho n values)``: a list of ``n`` elements taken from ``values`` in a cycle; ``(rho r c values)``: an
    ``r × c`` matrix (a list of lists)."""
    *shape, values = args
    if not isinstance(values, (list, tuple)):
        values = [values]
    if not values:
        raise ValueError("rho needs at least one value to repeat")
    shape = [count(n) for n in shape]
    total = math.prod(shape)
    flat = [values[i % len(values)] for i in range(total)]
    for n in reversed(shape[1:]):
        flat = [flat[i: i + n] for i in range(0, len(flat), n)]
    return flat


def chrbyte(value):
    """``(chrbyte b)``: the character of a byte; with a list of bytes, their UTF-8 text."""
    if isinstance(value, (list, tuple)):
        return bytes(value).decode("utf-8", errors="replace")
    return bytes([value]).decode("latin-1")


def memory_size():
    """The memory the process uses now (resident set), in bytes."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def command(text):
    """``(command "mkdir -p d")``: runs a shell command; returns its output. A command that fails is an error."""
    if not isinstance(text, str):
        raise TypeError(f"command expects a string, got {describe(text)}")
    result = subprocess.run(text, shell=True, capture_output=True, text=True)  # noqa: S602  (LispE's command)
    if result.returncode != 0:
        raise OSError(f"command {text!r} failed with status {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def lispe_in(container, value):
    if isinstance(container, str):
        return isinstance(value, str) and value in container
    return value in container


def lispe_not(value):
    return not truthy(value)


def nullp(value):
    return value is None


def emptyp(value):
    return value is None or (hasattr(value, "__len__") and len(value) == 0)


def lispe_min(*values):
    return min(values[0]) if len(values) == 1 else min(values)


def lispe_max(*values):
    return max(values[0]) if len(values) == 1 else max(values)


def lispe_sum(values):
    return sum(values)


def keys(d):
    return list(d.keys())


def values_of(d):
    return list(d.values())


def irange(start, end=None, step=1):
    if end is None:
        start, end = 0, start
    if all(isinstance(v, int) for v in (start, end, step)):
        return list(range(start, end, step))
    out, x = [], start
    while (step > 0 and x < end) or (step < 0 and x > end):
        out.append(x)
        x += step
    return out


def iota(n):
    return list(range(1, count(n) + 1))


def iota0(n):
    return list(range(count(n)))


def join(values, sep=""):
    return sep.join(v if isinstance(v, str) else string(v) for v in values)


def split(text, sep=None):
    return text.split(sep) if sep else text.split()


def trim(text, chars=None):
    return text.strip(chars)


def to_integer(value):
    return int(float(value)) if isinstance(value, str) else int(value)


def to_float(value):
    return float(value)


def car(values):
    return values[0] if len(values) else None


def cdr(values):
    return values[1:] if len(values) > 1 else None


def reverse(values):
    return values[::-1]


def typeof(value):
    if value is None:
        return "nil"
    if isinstance(value, Instance):
        return value.cls.name
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "list", dict: "dictionary"}.get(
        type(value), type(value).__name__)


FUNCTIONS = {
    "+": add, "-": sub, "*": mul, "/": div, "%": mod,
    "<": _chain(lambda a, b: a < b), ">": _chain(lambda a, b: a > b), "<=": _chain(lambda a, b: a <= b),
    ">=": _chain(lambda a, b: a >= b), "==": equal, "=": equal, "eq": equal,
    "!=": lambda a, b: not _same(a, b), "neq": lambda a, b: not _same(a, b),
    "not": lispe_not, "min": lispe_min, "max": lispe_max, "sum": lispe_sum, "abs": abs,
    "floor": lispe_floor, "ceiling": lispe_ceiling, "round": lispe_round, "sqrt": math.sqrt, "exp": math.exp,
    "log": math.log,
    "fill": fill, "print": lispe_print, "println": lispe_println, "printerr": printerr, "printerrln": printerrln,
    "list": lispe_list, "pushfirst": pushfirst, "extend": extend, "pop": pop, "copy": lispe_copy,
    "clone": lispe_copy, "@@": slice_of, "@": at, "set@": set_at, "rho": rho, "integers": lispe_integers,
    "floats": lispe_floats, "strings": lispe_strings, "integer": to_integer, "float": to_float, "string": string,
    "chrbyte": chrbyte, "memory_size": memory_size, "command": command, "in": lispe_in, "nullp": nullp,
    "emptyp": emptyp, "keys": keys, "values": values_of, "irange": irange, "iota": iota, "iota0": iota0,
    "join": join, "split": split, "trim": trim, "car": car, "cdr": cdr, "reverse": reverse, "typeof": typeof,
}
CONSTANTS = {"nil": None, "true": True, "false": False}


# --- the evaluator -----------------------------------------------------------------------------------------
class Interpreter:
    """One LispE program: its globals, the built-in functions, and the script it runs."""

    def __init__(self, path: str | os.PathLike = "<lispe>"):
        self.path = str(path)
        hidden = {"at", "truthy", "use", *lispe_tiktoken.PRIMITIVES}  # tiktoken_*: after (use 'lispe_tiktoken)
        self.builtins: dict[str, object] = {k: v for k, v in primitives().items()
                                            if not k.startswith("hyx_") and k not in hidden}
        self.builtins.update(FUNCTIONS)
        self.builtins.update(CONSTANTS)
        directory = str(Path(self.path).resolve().parent) if self.path != "<lispe>" else os.getcwd()
        self.globals: dict[str, object] = {"_current": directory.rstrip(os.sep) + os.sep}
        self.top = Frame(self.globals, toplevel=True)
        self.cleanups: list = []
        self.filename = self.path
        self.special = {
            "quote": self.sf_quote, "setq": self.sf_setq, "setg": self.sf_setg, "setqi": self.sf_setqi,
            "defun": self.sf_defun, "lambda": self.sf_lambda, "λ": self.sf_lambda, "if": self.sf_if,
            "ife": self.sf_ife, "check": self.sf_check, "ncheck": self.sf_ncheck, "block": self.sf_block,
            "loop": self.sf_loop, "loopcount": self.sf_loopcount, "while": self.sf_while, "and": self.sf_and,
            "or": self.sf_or, "cond": self.sf_cond, "select": self.sf_select, "maybe": self.sf_maybe,
            "return": self.sf_return, "break": self.sf_break, "+=": self.sf_update, "-=": self.sf_update,
            "*=": self.sf_update, "/=": self.sf_update, "class@": self.sf_class, "withclass": self.sf_withclass,
            "elapse": self.sf_elapse, "use": self.sf_use, "load": self.sf_load, "toclean": self.sf_toclean,
            "let": self.sf_let, "map": self.sf_map, "filter": self.sf_filter, "apply": self.sf_apply,
        }

    # running ----------------------------------------------------------------------------------------------
    def run_text(self, text: str, filename: str | None = None):
        """Evaluates every form of ``text`` at top level; returns the last value."""
        saved = self.filename
        self.filename = filename or self.filename
        try:
            value = None
            for line, form in read_lines(text, self.filename):
                try:
                    value = self.eval(form, self.top)
                except NameError as err:  # a bare name at top level: no form around it to report it
                    raise LispeError(str(err), f"{self.filename}:{line}", _text(form)) from err
            return value
        finally:
            self.filename = saved

    def run_file(self, path: str | os.PathLike):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LispeSyntaxError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        value = self.run_text(text, str(path))
        for instance, method in reversed(self.cleanups):
            self.call_method(instance, method, [], None)
        self.cleanups.clear()
        return value

    # evaluation -------------------------------------------------------------------------------------------
    def eval(self, x, frame: Frame):
        if isinstance(x, Symbol):
            return self.lookup(x, frame)
        if not isinstance(x, Form):
            return x
        if not x:
            return None
        try:
            return self.eval_form(x, frame)
        except (_Return, _Break, LispeError, KeyboardInterrupt):
            raise
        except LispeSyntaxError as err:
            raise LispeError(str(err), f"{self.filename}:{x.line}", _text(x)) from err
        except PrimitiveError as err:
            raise LispeError(f"{err.primitive}: {err.detail}", f"{self.filename}:{x.line}", _text(x)) from err
        except Exception as err:  # noqa: BLE001  (every failure is reported at the form that failed)
            message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
            raise LispeError(message or type(err).__name__, f"{self.filename}:{x.line}", _text(x)) from err

    def eval_form(self, x: Form, frame: Frame):
        head = x[0]
        if isinstance(head, Symbol):
            special = self.special.get(head)
            if special is not None:
                return special(x, frame)
            if frame.instance is not None and head in frame.instance.cls.methods \
                    and head not in frame.locals:
                return self.call_method(frame.instance, head, [self.eval(a, frame) for a in x[1:]], x)
        fn = self.eval(head, frame)
        if isinstance(fn, Instance):
            return self.instance_call(fn, x, frame)
        if isinstance(fn, LispeClass):
            return self.instantiate(fn, x, frame)
        args = [self.eval(a, frame) for a in x[1:]]
        if isinstance(fn, Function):
            return self.call(fn, args, x)
        if callable(fn):
            return fn(*args)
        raise TypeError(f"{_text(head)} is {describe(fn)}, not a function")

    def lookup(self, name: Symbol, frame: Frame):
        if name in frame.locals:
            return frame.locals[name]
        if frame.instance is not None and name in frame.instance.fields:
            return frame.instance.fields[name]
        if name in self.globals:
            return self.globals[name]
        if name in self.builtins:
            return self.builtins[name]
        if frame.instance is not None and name in frame.instance.cls.methods:
            return frame.instance.cls.methods[name]
        raise NameError(f"unknown name {str(name)!r}")

    def call(self, fn: Function, args: list, form: Form | None, instance: Instance | None = None):
        if len(args) > len(fn.params):
            raise TypeError(f"{fn.name} takes {len(fn.params)} argument{'s' if len(fn.params) != 1 else ''}, "
                            f"got {len(args)}")
        frame = Frame({}, instance)
        for i, (name, default) in enumerate(fn.params):
            if i < len(args):
                frame.locals[name] = args[i]
            elif default is _REQUIRED:
                raise TypeError(f"{fn.name} expects a value for {name!r} (argument {i + 1})")
            else:
                frame.locals[name] = self.eval(default, frame)
        try:
            value = None
            for f in fn.body:
                value = self.eval(f, frame)
            return value
        except _Return as ret:
            return ret.value
        except LispeError as err:
            if form is not None:
                err.trail.append((fn.name, f"{self.filename}:{form.line}", _text(form)))
            raise

    def call_method(self, instance: Instance, name: str, args: list, form: Form | None):
        method = instance.cls.methods.get(name)
        if method is None:
            raise AttributeError(f"{instance.cls.name} has no method {name!r}; its methods are "
                                 f"{', '.join(instance.cls.methods)}")
        return self.call(method, args, form, instance)

    def instance_call(self, instance: Instance, x: Form, frame: Frame):
        """``(obj (method args…))`` or ``(obj Class (method args…))``."""
        rest = x[1:]
        if len(rest) == 2 and isinstance(rest[0], Symbol):
            if rest[0] != instance.cls.name:
                raise TypeError(f"{_text(x[0])} is a {instance.cls.name}, not a {rest[0]}")
            rest = rest[1:]
        if len(rest) != 1 or not isinstance(rest[0], Form) or not rest[0] or not isinstance(rest[0][0], Symbol):
            raise TypeError(f"a call on an instance is (object (method arguments…)), got {_text(x)}")
        call = rest[0]
        return self.call_method(instance, call[0], [self.eval(a, frame) for a in call[1:]], x)

    def instantiate(self, cls: LispeClass, x: Form, frame: Frame):
        """``(Class v1 v2 …)``: the fields in order; an argument that is a call of one of the class's methods,
        such as ``(configure)``, runs on the new instance, and its value is the field's."""
        instance = Instance(cls)
        args = x[1:]
        params = cls.fields.params
        if len(args) > len(params):
            raise TypeError(f"{cls.name} has {len(params)} field{'s' if len(params) != 1 else ''}, "
                            f"got {len(args)} values")
        for i, (name, default) in enumerate(params):
            if i < len(args):
                a = args[i]
                if isinstance(a, Form) and a and isinstance(a[0], Symbol) and a[0] in cls.methods:
                    instance.fields[name] = None
                    value = self.call_method(instance, a[0], [self.eval(v, frame) for v in a[1:]], a)
                else:
                    value = self.eval(a, frame)
            elif default is _REQUIRED:
                raise TypeError(f"{cls.name} expects a value for its field {name!r}")
            else:
                value = self.eval(default, Frame({}, instance))
            instance.fields[name] = value
        return instance

    def assign_local(self, frame: Frame, name, value):
        frame.locals[str(name)] = value

    # special forms ----------------------------------------------------------------------------------------
    @staticmethod
    def _arity(x: Form, low: int, high: int | None = None):
        n = len(x) - 1
        if n < low or (high is not None and n > high):
            expected = f"{low}" if high == low else f"{low} to {high}" if high is not None else f"at least {low}"
            raise TypeError(f"{x[0]} expects {expected} argument{'s' if (high or low) != 1 else ''}, got {n}")

    @staticmethod
    def _name(x: Form, value) -> str:
        if not isinstance(value, Symbol):
            raise TypeError(f"{x[0]} expects a name, got {_text(value)}")
        return str(value)

    def sf_quote(self, x, frame):
        self._arity(x, 1, 1)
        return x[1]

    def sf_setq(self, x, frame):
        self._arity(x, 2)
        if (len(x) - 1) % 2:
            raise TypeError(f"{x[0]} expects names and values in pairs")
        value = None
        for name, form in zip(x[1::2], x[2::2], strict=True):
            value = self.eval(form, frame)
            frame.locals[self._name(x, name)] = value
        return value

    def sf_setg(self, x, frame):
        self._arity(x, 2, 2)
        value = self.eval(x[2], frame)
        self.globals[self._name(x, x[1])] = value
        return value

    def sf_setqi(self, x, frame):
        self._arity(x, 2, 2)
        if frame.instance is None:
            raise TypeError("setqi sets a field of an instance: it belongs inside a method of a class@")
        value = self.eval(x[2], frame)
        frame.instance.fields[self._name(x, x[1])] = value
        return value

    def _function(self, x, name: str, params, body) -> Function:
        if not isinstance(params, Form):
            raise TypeError(f"{x[0]} {name}: the parameters must be a parenthesised list, got {_text(params)}")
        return Function(name, params, list(body), x.line)

    def sf_defun(self, x, frame):
        self._arity(x, 2)
        name = self._name(x, x[1])
        fn = self._function(x, name, x[2], x[3:])
        self.globals[name] = fn
        return fn

    def sf_lambda(self, x, frame):
        self._arity(x, 1)
        return self._function(x, "lambda", x[1], x[2:])

    def sf_if(self, x, frame):
        self._arity(x, 2, 3)
        if truthy(self.eval(x[1], frame)):
            return self.eval(x[2], frame)
        return self.eval(x[3], frame) if len(x) > 3 else None

    def sf_ife(self, x, frame):
        self._arity(x, 2)
        if truthy(self.eval(x[1], frame)):
            return self.eval(x[2], frame)
        return self.block(x[3:], frame)

    def block(self, forms, frame):
        value = None
        for f in forms:
            value = self.eval(f, frame)
        return value

    def sf_block(self, x, frame):
        return self.block(x[1:], frame)

    def sf_check(self, x, frame):
        self._arity(x, 1)
        return self.block(x[2:], frame) if truthy(self.eval(x[1], frame)) else None

    def sf_ncheck(self, x, frame):
        self._arity(x, 2)
        if truthy(self.eval(x[1], frame)):
            return self.block(x[3:], frame)
        return self.eval(x[2], frame)

    def sf_loop(self, x, frame):
        self._arity(x, 2)
        name = self._name(x, x[1])
        collection = self.eval(x[2], frame)
        if isinstance(collection, dict):
            collection = list(collection)
        elif collection is None:
            collection = []
        elif not isinstance(collection, (list, tuple, str, torch.Tensor, range)):
            raise TypeError(f"loop goes over a list, string, dictionary or tensor, got {describe(collection)}")
        value = None
        try:
            for item in collection:
                frame.locals[name] = item
                value = self.block(x[3:], frame)
        except _Break:
            pass
        return value

    def sf_loopcount(self, x, frame):
        self._arity(x, 1)
        n = count(self.eval(x[1], frame))
        body = x[2:]
        counter = None
        if len(body) > 1 and isinstance(body[0], Symbol):
            counter, body = str(body[0]), body[1:]
        value = None
        try:
            for i in range(n):
                if counter is not None:
                    frame.locals[counter] = i
                value = self.block(body, frame)
        except _Break:
            pass
        return value

    def sf_while(self, x, frame):
        self._arity(x, 1)
        value = None
        try:
            while truthy(self.eval(x[1], frame)):
                value = self.block(x[2:], frame)
        except _Break:
            pass
        return value

    def sf_and(self, x, frame):
        return all(truthy(self.eval(f, frame)) for f in x[1:])

    def sf_or(self, x, frame):
        return any(truthy(self.eval(f, frame)) for f in x[1:])

    def sf_cond(self, x, frame):
        for clause in x[1:]:
            if not isinstance(clause, Form) or not clause:
                raise TypeError(f"cond expects clauses (condition body…), got {_text(clause)}")
            if truthy(self.eval(clause[0], frame)):
                return self.block(clause[1:], frame)
        return None

    def sf_select(self, x, frame):
        for f in x[1:]:
            value = self.eval(f, frame)
            if value is not None:
                return value
        return None

    def sf_maybe(self, x, frame):
        self._arity(x, 1)
        if len(x) == 2:
            try:
                self.eval(x[1], frame)
                return False
            except LispeError:
                return True
        try:
            return self.block(x[1:-1], frame)
        except LispeError:
            return self.eval(x[-1], frame)

    def sf_return(self, x, frame):
        raise _Return(self.eval(x[1], frame) if len(x) > 1 else None)

    def sf_break(self, x, frame):
        raise _Break()

    def sf_update(self, x, frame):
        """``(+= name v)`` (and ``-=``, ``*=``, ``/=``): updates ``name`` where it lives."""
        self._arity(x, 2, 2)
        name = self._name(x, x[1])
        op = {"+=": add, "-=": sub, "*=": mul, "/=": div}[x[0]]
        value = self.eval(x[2], frame)
        for scope in (frame.locals, frame.instance.fields if frame.instance is not None else None, self.globals):
            if scope is not None and name in scope:
                scope[name] = op(scope[name], value)
                return scope[name]
        raise NameError(f"unknown name {name!r}")

    def sf_class(self, x, frame):
        """``(class@ Name (field (field default) …) (defun method(…) …) …)``."""
        self._arity(x, 2)
        name = self._name(x, x[1])
        if not isinstance(x[2], Form):
            raise TypeError(f"class@ {name}: the fields must be a parenthesised list, got {_text(x[2])}")
        methods = {}
        for f in x[3:]:
            if not (isinstance(f, Form) and len(f) >= 3 and f[0] == "defun" and isinstance(f[1], Symbol)):
                raise TypeError(f"class@ {name}: the body holds methods (defun name(…) …), got {_text(f)}")
            methods[str(f[1])] = self._function(f, str(f[1]), f[2], f[3:])
        cls = LispeClass(name, Function(name, x[2], [], x.line), methods)
        self.globals[name] = cls
        return cls

    def sf_withclass(self, x, frame):
        """``(withclass Class body…)``: the body, where method calls name that class."""
        self._arity(x, 1)
        cls = self.eval(x[1], frame)
        if not isinstance(cls, LispeClass):
            raise TypeError(f"withclass expects a class@, got {describe(cls)}")
        return self.block(x[2:], frame)

    def sf_elapse(self, x, frame):
        """``(elapse body…)``: the milliseconds the body took."""
        start = time.perf_counter()
        self.block(x[1:], frame)
        return (time.perf_counter() - start) * 1000.0

    def sf_use(self, x, frame):
        self._arity(x, 1, 1)
        name = str(self.eval(x[1], frame))
        if name not in LIBRARIES:
            raise ValueError(f"unknown library {name!r}; the libraries are {', '.join(LIBRARIES)}")
        self.builtins.update(LIBRARIES[name])
        return True

    def sf_load(self, x, frame):
        self._arity(x, 1, 1)
        path = self.eval(x[1], frame)
        if not isinstance(path, str):
            raise TypeError(f"load expects a file name, got {describe(path)}")
        candidate = Path(path)
        if not candidate.is_file() and not candidate.is_absolute():
            candidate = Path(self.globals["_current"]) / path
        if not candidate.is_file():
            raise FileNotFoundError(f"no LispE file at {path!r}")
        return self.run_text(candidate.read_text(encoding="utf-8"), str(candidate))

    def sf_toclean(self, x, frame):
        """``(toclean 'method)``: the instance's method runs when the program ends."""
        self._arity(x, 1, 1)
        if frame.instance is None:
            raise TypeError("toclean belongs inside a method of a class@")
        name = str(self.eval(x[1], frame))
        if name not in frame.instance.cls.methods:
            raise AttributeError(f"{frame.instance.cls.name} has no method {name!r}")
        self.cleanups.append((frame.instance, name))
        return True

    def invoke(self, fn, args: list, form: Form, frame: Frame):
        """Calls ``fn`` (a function, a primitive, or a quoted name of either) with ``args``."""
        if isinstance(fn, Symbol):
            fn = self.lookup(fn, frame)
        if isinstance(fn, Function):
            return self.call(fn, args, form)
        if callable(fn):
            return fn(*args)
        raise TypeError(f"{describe(fn)} is not a function")

    def sf_map(self, x, frame):
        """``(map f l)``: ``f`` of each element."""
        self._arity(x, 2, 2)
        fn, values = self.eval(x[1], frame), self.eval(x[2], frame)
        return [self.invoke(fn, [v], x, frame) for v in values]

    def sf_filter(self, x, frame):
        """``(filter f l)``: the elements for which ``f`` is true."""
        self._arity(x, 2, 2)
        fn, values = self.eval(x[1], frame), self.eval(x[2], frame)
        return [v for v in values if truthy(self.invoke(fn, [v], x, frame))]

    def sf_apply(self, x, frame):
        """``(apply f l)``: ``f`` called with the elements of ``l`` as its arguments."""
        self._arity(x, 2, 2)
        return self.invoke(self.eval(x[1], frame), list(self.eval(x[2], frame)), x, frame)

    def sf_let(self, x, frame):
        """``(let ((a 1) (b 2)) body…)``: ``a`` and ``b`` set, then the body."""
        self._arity(x, 1)
        if not isinstance(x[1], Form):
            raise TypeError(f"let expects a list of (name value), got {_text(x[1])}")
        for binding in x[1]:
            if not (isinstance(binding, Form) and len(binding) == 2 and isinstance(binding[0], Symbol)):
                raise TypeError(f"let expects (name value), got {_text(binding)}")
            frame.locals[str(binding[0])] = self.eval(binding[1], frame)
        return self.block(x[2:], frame)


def run(path: str | os.PathLike, args: list[str] | None = None) -> dict:
    """Runs the LispE script at ``path``, its arguments in ``_args``; returns its global variables."""
    interpreter = Interpreter(path)
    interpreter.globals["_args"] = list(args or [])
    interpreter.run_file(path)
    return interpreter.globals
