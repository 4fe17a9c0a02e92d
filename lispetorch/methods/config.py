"""Configurations of the SVD-family methods (LoRA's own SVD inits are ``LoraConfig.init`` values)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..config import _check_targets

ROTATION_METHODS = ("way0", "way1", "way2", "way3")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _positive_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


def _dropout(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


@dataclass
class RotationalPiSSAConfig:
    """Rotational PiSSA: ``W = W_res + U_r R_U diag(S) R_Vᵀ V_rᵀ`` with ``U_r``, ``V_r``, ``W_res`` frozen.

    On the one operator: ``A = V_rᵀ`` and ``B = U_r`` are frozen, and the core ``R = R_U diag(S/s) R_Vᵀ`` is
    computed at every forward from the trained rotations (and singular values), so ``s · B R A`` is the principal
    part and the base weight becomes ``W − s · B R₀ A`` for the ``R₀`` actually produced at init.

    Args:
        r (int): rank (number of singular triplets). Default 8.
        lora_alpha (float): scaling numerator, ``s = lora_alpha / r``. Default 16.
        method (str): how ``R_U`` and ``R_V`` are parametrised. ``"way0"``: free ``r×r`` matrices, from the
            identity, with the penalty ``λ(‖R_UᵀR_U − I‖² + ‖R_VᵀR_V − I‖²)`` (:func:`orthogonality_loss`) to add
            to the loss; ``"way1"``: a product of Givens rotations over all ``r(r−1)/2`` planes (angles from 0);
            ``"way2"``: the Cayley transform ``(I − K)⁻¹(I + K)`` of a low-rank skew-symmetric
            ``K = X Yᵀ − Y Xᵀ``, exactly orthogonal (the reference code's ``I + K`` is orthogonal only to first
            order in K); ``"way3"``: the matrix exponential of a skew-symmetric matrix. Default ``"way0"``.
        orthogonality_reg_weight (float): λ of ``way0``'s penalty. Default 1e-3.
        init_identity (bool): start the rotations at the identity; otherwise at a random rotation (the residual
            absorbs it, so outputs are still unchanged at init). Default True.
        freeze_singular_values (bool): keep ``S`` fixed. Default False.
        quantize_residual (bool): store the frozen residual ``W_res`` in NF4. Default False.
        quantize_base_components (bool): store ``U_r`` and ``V_r`` in NF4 (dequantised at init). Default False.
        skew_rank (int): rank of ``X`` and ``Y`` for ``way2``. Default 2 (capped at ``r``).
        dropout (float): dropout on the adapter input. Default 0.0.
        target_modules (list[str] | str): as in :class:`~lispetorch.LoraConfig`. Default ``["q_proj", "v_proj"]``.
        exclude_modules (list[str] | str | None): as in :class:`~lispetorch.LoraConfig`.
        dtype (str | torch.dtype | None): dtype of the factors; the base weight's when None.

    Raises:
        ValueError: a field out of range or an unknown ``method``, named with its value.
    """

    r: int = 8
    lora_alpha: float = 16.0
    method: str = "way0"
    orthogonality_reg_weight: float = 1e-3
    init_identity: bool = True
    freeze_singular_values: bool = False
    quantize_residual: bool = False
    quantize_base_components: bool = False
    skew_rank: int = 2
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    exclude_modules: list[str] | str | None = None
    dtype: object = None

    def __post_init__(self) -> None:
        _positive_int(self.r, "RotationalPiSSAConfig.r")
        _positive_number(self.lora_alpha, "RotationalPiSSAConfig.lora_alpha")
        if self.method not in ROTATION_METHODS:
            raise ValueError(f"RotationalPiSSAConfig.method must be one of {ROTATION_METHODS}, got {self.method!r}")
        w = self.orthogonality_reg_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 or not math.isfinite(w):
            raise ValueError(f"RotationalPiSSAConfig.orthogonality_reg_weight must be ≥ 0, got {w!r}")
        _positive_int(self.skew_rank, "RotationalPiSSAConfig.skew_rank")
        _dropout(self.dropout, "RotationalPiSSAConfig.dropout")
        self.target_modules = _check_targets(self.target_modules, "target_modules")
        if self.exclude_modules is not None:
            self.exclude_modules = _check_targets(self.exclude_modules, "exclude_modules")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dtype"] = None if self.dtype is None else str(self.dtype).replace("torch.", "")
        return d


@dataclass
class TinyLoraConfig:
    """TinyLoRA: ``ΔW = U_r diag(S_r) (Σᵢ vᵢ Pᵢ) V_rᵀ`` with one trained vector ``v`` of ``u`` values.

    ``U_r, S_r, V_r`` are the frozen rank-``r`` SVD factors of each adapted W (which stays frozen, unchanged);
    ``Pᵢ`` (``u × r × r`` per module) are fixed standard-normal tensors drawn from a generator seeded with
    ``seed``, module after module in the model's module order; ``v`` starts at zero, so outputs are unchanged at
    init. On the one operator: ``A = V_rᵀ``, ``B = U_r diag(S_r)`` (S sits on the output side of R, as in
    LoRA-XS), ``R = Σᵢ vᵢ Pᵢ`` and ``s = 1``.

    Args:
        r (int): rank of the frozen SVD factors. Default 2.
        u (int): length of the trained vector; ``u = 1`` works. Default 32.
        seed (int): seed of the generator that draws the ``Pᵢ``. Default 42.
        groups (int): tying: the adapted modules, in module order, are split into this many contiguous groups of
            (nearly) equal size, each with its own ``v``; 1 shares one ``v`` across all. Default 1.
        target_modules (list[str] | str): as in :class:`~lispetorch.LoraConfig`. Default ``"all-linear"``.
        exclude_modules (list[str] | str | None): as in :class:`~lispetorch.LoraConfig`.
        dtype (str | torch.dtype | None): dtype of the frozen factors; the base weight's when None (``v`` and
            ``P`` are float32).

    Raises:
        ValueError: a field out of range (``u ≤ 0`` included), named with its value.
    """

    r: int = 2
    u: int = 32
    seed: int = 42
    groups: int = 1
    target_modules: list[str] | str = "all-linear"
    exclude_modules: list[str] | str | None = None
    dtype: object = None

    def __post_init__(self) -> None:
        _positive_int(self.r, "TinyLoraConfig.r")
        _positive_int(self.u, "TinyLoraConfig.u")
        _positive_int(self.groups, "TinyLoraConfig.groups")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"TinyLoraConfig.seed must be an integer, got {self.seed!r}")
        self.target_modules = _check_targets(self.target_modules, "target_modules")
        if self.exclude_modules is not None:
            self.exclude_modules = _check_targets(self.exclude_modules, "exclude_modules")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dtype"] = None if self.dtype is None else str(self.dtype).replace("torch.", "")
        return d
