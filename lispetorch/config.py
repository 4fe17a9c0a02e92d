"""Adapter configurations."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

_INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_K", "lora_ga")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")  # K, the number of subspace iterations


def pissa_niter(init: str) -> int | None:
    """K of ``"pissa_niter_K"``; None for a full SVD (``"pissa"``) or any other init."""
    m = _PISSA_NITER.fullmatch(init)
    return int(m.group(1)) if m else None


@dataclass
class LoraConfig:
    """Configuration of a LoRA adapter (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    The adapted layer computes ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` with ``s = alpha / r`` (or
    ``alpha / √r`` with ``use_rslora``, Kalajdzievski 2023).

    Args:
        r (int): rank. Default 8.
        alpha (float): scaling numerator (PEFT's ``lora_alpha``). Default 16.
        dropout (float): dropout on the adapter input, in ``[0, 1)``. Default 0.0.
        target_modules (list[str] | str): module names or name suffixes (``["q_proj", "v_proj"]``), a regular
            expression matched against full module names, or ``"all-linear"`` (every linear layer but the
            output head). Default ``["q_proj", "v_proj"]``.
        exclude_modules (list[str] | str | None): names, suffixes or a regular expression never to adapt.
        use_rslora (bool): rank-stabilised scaling ``alpha / √r``. Default False.
        init (str): ``"kaiming"`` (A Kaiming-uniform with a=√5, B zeros; PEFT's default), ``"gaussian"``
            (A normal with std 1/r, B zeros), ``"pissa"`` (principal singular vectors of W, the base becoming the
            residual; Meng et al., 2024), ``"pissa_niter_K"`` (the same from a randomised SVD with K subspace
            iterations) or ``"lora_ga"`` (from the SVD of the averaged gradient of W over calibration batches
            passed to ``inject``; Wang et al., 2024). Default ``"kaiming"``.
        dtype (str | torch.dtype | None): dtype of the adapter factors; the base weight's when None.

    Raises:
        ValueError: a field out of range, named with its value.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False
    init: str = "kaiming"
    dtype: object = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0 \
                or not math.isfinite(self.alpha):
            raise ValueError(f"LoraConfig.alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.init, str) or not (self.init in _INITS and self.init != "pissa_niter_K"
                                                  or _PISSA_NITER.fullmatch(self.init)):
            raise ValueError(f"LoraConfig.init must be one of {_INITS}, got {self.init!r}")
        self.target_modules = _check_targets(self.target_modules, "target_modules")
        if self.exclude_modules is not None:
            self.exclude_modules = _check_targets(self.exclude_modules, "exclude_modules")

    @property
    def scaling(self) -> float:
        """The factor ``s`` applied to ``B A``."""
        return scaling(self.alpha, self.r, self.use_rslora)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dtype"] = None if self.dtype is None else str(self.dtype).replace("torch.", "")
        return d


def scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / √r`` for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _check_targets(value, name: str):
    if isinstance(value, str):
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"LoraConfig.{name} is not a valid regular expression: {value!r} ({e})") from None
        return value
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(t, str) and t for t in value):
        return list(value)
    raise ValueError(
        f"LoraConfig.{name} must be a non-empty list of module names, a regular expression or 'all-linear', "
        f"got {value!r}"
    )
