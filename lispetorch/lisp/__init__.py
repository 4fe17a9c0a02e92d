"""The Lisp surface: LispE's ``torch_hf_lora_*`` primitives and LispE-style macros, as Hy modules.

Every primitive of the LispeTorch guide exists here under its LispE name and with its LispE argument order; each
is a short call into the Python API (:mod:`lispetorch`). Scripts get all of them, and the macros, with
``lispetorch run SCRIPT.hy``; Hy code can also import them::

    (import lispetorch.lisp *)              ; the primitives and the LispE functions
    (require lispetorch.lisp.lispe *)       ; the LispE-style macros (setq, defun, check, loopcount, @, ...)

From Python, :func:`primitives` gives the same names as a dictionary.
"""

from __future__ import annotations

import importlib

import hy  # noqa: F401  (installs the importer that loads the .hy modules below)

# The modules whose exported names make up the scripting surface, in the order they are documented.
MODULES = (
    "lispetorch.lisp.hf",  # models by name: torch_hf_*, tokenizer, generation
    "lispetorch.lisp.lora",  # standalone LoRA layers: torch_lora_*, torch_linear
    "lispetorch.lisp.training",  # optimizer, scheduler, backward, gradients, devices
    "lispetorch.lisp.tensors",  # tensor_* and the loss
    "lispetorch.lisp.methods",  # SVD-family methods' extras, NF4, the checkpoint optimizer
    "lispetorch.lisp.lispe",  # LispE's list, string, file and JSON functions; nil, true, false
    "lispetorch.lisp.lispe_tiktoken",  # LispE's lispe_tiktoken library, on the tiktoken package
)
MACRO_MODULE = "lispetorch.lisp.lispe"
_SUBMODULES = {m.rsplit(".", 1)[1] for m in MODULES} | {"checks", "runner", "lispe_reader", "lispe_eval"}


def primitives() -> dict[str, object]:
    """Every exported function and constant of :data:`MODULES`, by (mangled, LispE) name."""
    names: dict[str, object] = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            names[name] = getattr(module, name)
    return names


def __getattr__(name: str):
    # `(import lispetorch.lisp *)` and `lispetorch.lisp.torch_hf_forward` reach the primitives lazily, so that
    # importing the package stays cheap.
    if name.startswith("_") and name != "__all__" or name in _SUBMODULES:
        raise AttributeError(f"module 'lispetorch.lisp' has no attribute {name!r}")  # lets submodules import
    table = primitives()
    if name == "__all__":
        return list(table)
    if name in table:
        return table[name]
    raise AttributeError(f"module 'lispetorch.lisp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(primitives()))
