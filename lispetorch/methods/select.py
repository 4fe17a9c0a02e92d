"""One entry point from a method name to its config, for callers that choose the method by name (the Hy
primitives' ``method`` option, command lines)."""

from __future__ import annotations

from ..config import LoraConfig, pissa_niter
from .config import RotationalPiSSAConfig, TinyLoraConfig

METHODS = ("lora", "pissa", "pissa_niter_K", "lora_ga", "rotational_pissa", "tinylora")


def method_config(name: str, r: int, alpha: float, target_modules="all-linear", dtype=None, dropout: float = 0.0,
                  **options):
    """The config of the method ``name`` with the common fields set.

    Args:
        name (str): the method: ``"lora"``, ``"pissa"``, ``"pissa_niter_K"`` (K an integer), ``"lora_ga"`` (pass the
            calibration batches to ``inject``), ``"rotational_pissa"`` or ``"tinylora"``.
        r (int): rank. alpha (float): scaling numerator (ignored by TinyLoRA, whose scaling is 1).
        target_modules, dtype, dropout: as in :class:`~lispetorch.LoraConfig` (TinyLoRA has no dropout).
        **options: the method's own fields: ``init`` for ``"lora"`` (kaiming or gaussian), ``use_rslora``;
            ``method``, ``orthogonality_reg_weight``, ``init_identity``, ``freeze_singular_values``,
            ``quantize_residual``, ``quantize_base_components``, ``skew_rank`` for Rotational PiSSA; ``u``,
            ``seed``, ``groups`` for TinyLoRA.

    Raises:
        ValueError: an unknown method or option, or a field out of range.
    """
    if not isinstance(name, str):
        raise ValueError(f"method must be one of {METHODS}, got {name!r}")
    try:
        if name == "lora" or name in ("pissa", "lora_ga") or pissa_niter(name) is not None:
            init = options.pop("init", "kaiming") if name == "lora" else name
            return LoraConfig(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, dtype=dtype,
                              init=init, **options)
        if name == "rotational_pissa":
            return RotationalPiSSAConfig(r=r, lora_alpha=alpha, dropout=dropout, target_modules=target_modules,
                                         dtype=dtype, **options)
        if name == "tinylora":
            if dropout:
                raise ValueError("TinyLoRA has no dropout")
            return TinyLoraConfig(r=r, target_modules=target_modules, dtype=dtype, **options)
    except TypeError as e:  # an option the method's config does not have
        raise ValueError(f"method {name!r}: {e}") from None
    raise ValueError(f"method must be one of {METHODS}, got {name!r}")
