"""The one device policy: which devices this machine has, and what a device name resolves to.

``auto`` picks cuda, then mps, then cpu. A name that is no device at all is always an error. An accelerator
this machine lacks (``cuda:7``, ``mps`` on a Linux box) is an error for a training config, which asks for
hardware it needs (``strict=True``); a script written elsewhere (the Lisp surfaces) runs on the best device
there is instead, with a notice on stderr once per name (``strict=False``).
"""

from __future__ import annotations

import re
import sys

import torch

from .errors import ConfigError
from .validate import show

_ACCELERATOR = re.compile(r"cuda(:\d+)?|mps")
_noticed: set[str] = set()


def available_devices() -> list[str]:
    """The device names usable here: ``cpu``, then ``cuda`` and ``cuda:N`` for each GPU, then ``mps``."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def best_device() -> str:
    """What ``auto`` means here: cuda, then mps, then cpu."""
    devices = available_devices()
    return "cuda" if "cuda" in devices else "mps" if "mps" in devices else "cpu"


def resolve_device(name: str, strict: bool = True, who: str = "") -> torch.device:
    """The ``torch.device`` for ``name`` (``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``).

    Args:
        name (str): the device name.
        strict (bool): an accelerator this machine lacks is an error (True) or falls back to :func:`best_device`
            with a notice on stderr, once per name (False). Default True.
        who (str): what asked, for the notice (a primitive's name).

    Raises:
        ConfigError: a device not available here (strict), or a name that is no device at all; the message lists
            the available ones.
    """
    devices = available_devices()
    if name == "auto":
        return torch.device(best_device())
    if name in devices:
        return torch.device(name)
    if strict:
        raise ConfigError(f"device {show(name)} is not available here; available: {', '.join(devices)} (or auto)")
    if isinstance(name, str) and _ACCELERATOR.fullmatch(name):
        best = best_device()
        if name not in _noticed:
            _noticed.add(name)
            print(f"{who + ': ' if who else ''}device {name!r} is not available here; using {best}", file=sys.stderr)
        return torch.device(best)
    raise ConfigError(f"unknown device {show(name)}; available here: {', '.join(devices)} (or auto)")
