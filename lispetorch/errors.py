"""The exceptions lispetorch raises: one base, one class per kind of failure.

Each class is also a subclass of the built-in type that callers caught before it existed (``ValueError``, and
``RuntimeError`` for a state error), so ``except ValueError`` keeps working; ``except lt.LispetorchError``
catches everything the library raises on purpose.
"""

from __future__ import annotations


class LispetorchError(Exception):
    """Base of every error lispetorch raises on purpose; the message names the file, key or value at fault."""


class ConfigError(LispetorchError, ValueError):
    """A configuration that cannot run: the message names the key (and file and line, for YAML)."""


class AdapterFormatError(LispetorchError, ValueError):
    """An adapter file or directory that cannot be read: the message names the file and what is wrong."""


class TinyLoraFormatError(AdapterFormatError):
    """A ``tiny_lora_v.pt`` that cannot be restored: the message names the file and what is wrong."""


class AdapterStateError(LispetorchError, RuntimeError, ValueError):
    """An operation the adapters' current state forbids (an adapter is merged, absent, or of another kind)."""


class ShapeError(LispetorchError, ValueError):
    """Tensors whose shapes do not fit each other or the model: the message names them and both shapes."""


class DataError(LispetorchError, ValueError):
    """Data that cannot be used (training text, calibration batches): the message names the file (and line)."""


class CheckpointError(AdapterFormatError):
    """No training checkpoint to resume from is intact: the message names the directory and, for each checkpoint
    skipped, why (a file missing, cut short or changed since its manifest was written)."""


class NonFiniteError(LispetorchError, ValueError):
    """A NaN or infinite loss, gradient or result: the message names the step (or the tensor) and what was not
    finite. Nothing non-finite is written."""


class WriteError(LispetorchError, OSError):
    """A file or directory that could not be written (a full disk, a quota, no permission): the message names the
    path and the cause; nothing partial is left under the final name. ``errno`` is the system's error number."""


def merged_error(name: str, layer: str | None = None, then: str = "unmerge it first") -> AdapterStateError:
    """The one message for "adapter ``name`` is merged", naming the layer when known and what to do."""
    where = f" into {layer!r}" if layer else " into the weight"
    return AdapterStateError(f"adapter {name!r} is merged{where}: {then}")
