"""Learning-rate schedules with LispE's names, formulas and config keys, built on ``torch.optim.lr_scheduler``.

``t`` is the number of scheduler steps taken (0 before the first), ``T`` = ``total_steps``,
``W`` = ``warmup_steps``, ``lr0`` = ``initial_lr``, ``lr_min`` = ``min_lr``:

==========================  ==========================================================================
``linear_warmup_cosine``    ``lr0·t/W`` while ``t < W``, then ``lr_min + (lr0 − lr_min)·½(1 + cos(π(t−W)/(T−W)))``
``cosine``                  ``lr_min + (lr0 − lr_min)·½(1 + cos(πt/T))``
``linear``                  ``lr_min + (lr0 − lr_min)·(T − t)/T``
``exponential``             ``lr0·γ^t``
``step``                    ``lr0·γ^⌊t/step_size⌋``
``constant``                ``lr0``
==========================  ==========================================================================

Where LispE's formulas would divide by zero or leave their range, these hold the end value instead: past
``T`` the cosine and linear schedules stay at ``lr_min`` (LispE's cosine climbs back up and its linear one
goes negative), and when ``T ≤ W`` the schedule jumps from warmup straight to ``lr_min``. ``initial_lr``
defaults to the optimizer's learning rate (LispE silently uses 0.001 when the key is absent).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .errors import ConfigError
from .validate import number, show

SCHEDULER_TYPES = ("linear_warmup_cosine", "cosine", "linear", "exponential", "step", "constant")

# LispE's defaults for the keys a config leaves out (initial_lr: the optimizer's own learning rate).
DEFAULTS = {"min_lr": 1e-6, "total_steps": 1000, "warmup_steps": 0, "gamma": 0.1, "step_size": 100}
_KEYS = {"initial_lr": float, "min_lr": float, "total_steps": int, "warmup_steps": int, "gamma": float,
         "step_size": int}


def _check_config(scheduler_type: str, config: Mapping) -> dict:
    if scheduler_type not in SCHEDULER_TYPES:
        raise ConfigError(f"unknown scheduler type {scheduler_type!r}; choose one of {', '.join(SCHEDULER_TYPES)}")
    if not isinstance(config, Mapping):
        raise TypeError(f"scheduler config must be a mapping, got {type(config).__name__}")
    out = dict(DEFAULTS)
    for key, value in config.items():
        if key not in _KEYS:
            raise ConfigError(f"unknown scheduler config key {show(key)}; the keys are {', '.join(_KEYS)}")
        kind = _KEYS[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int:
            ok = ok and (isinstance(value, int) or float(value).is_integer())
        if not ok:
            raise TypeError(f"scheduler config key {show(key)} must be {'an integer' if kind is int else 'a number'}, "
                            f"got {show(value)}")
        out[key] = kind(value) if kind is int else number(value, key, "scheduler config")  # NaN and inf refused
    for key in ("total_steps", "warmup_steps"):
        if out[key] < 0:
            raise ConfigError(f"scheduler config key {key!r} must be ≥ 0, got {out[key]}")
    if out["step_size"] < 1:
        raise ConfigError(f"scheduler config key 'step_size' must be ≥ 1, got {out['step_size']}")
    if out["min_lr"] < 0:
        raise ConfigError(f"scheduler config key 'min_lr' must be ≥ 0, got {out['min_lr']}")
    if out["gamma"] <= 0:
        raise ConfigError(f"scheduler config key 'gamma' must be > 0, got {out['gamma']}")
    if "initial_lr" in out and out["initial_lr"] <= 0:
        raise ConfigError(f"scheduler config key 'initial_lr' must be > 0, got {out['initial_lr']}")
    return out


def lr_at(scheduler_type: str, t: int, config: Mapping) -> float:
    """The learning rate after ``t`` scheduler steps (``config`` must contain ``initial_lr``)."""
    c = _check_config(scheduler_type, config)
    if "initial_lr" not in c:
        raise ConfigError("scheduler config needs 'initial_lr' to compute a learning rate")
    return _lr(scheduler_type, t, c)


def _lr(scheduler_type: str, t: int, c: dict) -> float:
    """:func:`lr_at` on a config already checked by ``_check_config`` (with ``initial_lr``)."""
    lr0, lr_min, T, W = c["initial_lr"], c["min_lr"], c["total_steps"], c["warmup_steps"]

    def cosine(progress: float) -> float:
        return lr_min + (lr0 - lr_min) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    if scheduler_type == "linear_warmup_cosine":
        if t < W:
            return lr0 * t / W
        return cosine((t - W) / (T - W)) if T > W else lr_min
    if scheduler_type == "cosine":
        return cosine(t / T) if T > 0 else lr_min
    if scheduler_type == "linear":
        return lr_min + (lr0 - lr_min) * max(T - t, 0) / T if T > 0 else lr_min
    if scheduler_type == "exponential":
        return lr0 * c["gamma"] ** t
    if scheduler_type == "step":
        return lr0 * c["gamma"] ** (t // c["step_size"])
    return lr0  # constant


class _Multiplier:
    # A class rather than a closure so that LambdaLR.state_dict() can skip it cleanly (it saves only
    # callable objects' __dict__, which here is plain data). ``config`` is checked and holds initial_lr.
    def __init__(self, scheduler_type: str, config: dict):
        self.scheduler_type, self.config = scheduler_type, config

    def __call__(self, t: int) -> float:
        return _lr(self.scheduler_type, t, self.config) / self.config["initial_lr"]


def make_scheduler(optimizer: torch.optim.Optimizer, scheduler_type: str, config: Mapping | None = None
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following LispE's ``scheduler_type`` with its config keys.

    ``initial_lr`` (when given) becomes the learning rate of every parameter group; without it each group's
    own learning rate plays that part. The returned scheduler's ``state_dict`` round-trips through
    ``torch.save``/``torch.load(weights_only=True)``.
    """
    c = _check_config(scheduler_type, config or {})
    if "initial_lr" in c:
        for group in optimizer.param_groups:
            group["lr"] = c["initial_lr"]
            group.pop("initial_lr", None)
    base = optimizer.param_groups[0]["lr"] if optimizer.param_groups else 1.0
    if base <= 0:
        raise ConfigError(f"the optimizer's learning rate must be > 0 for a schedule, got {base}")
    c["initial_lr"] = c.get("initial_lr", base)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Multiplier(scheduler_type, c))
