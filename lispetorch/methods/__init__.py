"""One module per method, each a choice of the factors of ``y = x Wᵀ + b + s·((drop(x) Aᵀ) Rᵀ) Bᵀ`` on the same
:class:`~lispetorch.LoraLinear`, the same native operator and the same merge:

=================  ====================  =============================  ====================  ==================
method             A                     R                              B                     base W
=================  ====================  =============================  ====================  ==================
LoRA               Kaiming/Gaussian      none                           zeros                 W
PiSSA              √(S_r/s)·V_rᵀ, train  none                           U_r·√(S_r/s), train   W − s·BA
LoRA-GA            V[:, :r]ᵀ·c, train    none                           U[:, r:2r]·c, train   W − s·BA
Rotational PiSSA   V_rᵀ, frozen          R_U diag(S_r/s) R_Vᵀ, trained  U_r, frozen           W − s·BR₀A
TinyLoRA           V_rᵀ, frozen          Σᵢ vᵢPᵢ, v trained             U_r diag(S_r), frozen W (unchanged)
=================  ====================  =============================  ====================  ==================

Each module has an ``inject(model, config, adapter_name, calibration_batches)`` that computes and checks every
factor, then hands them to :func:`lispetorch.adapters.install`; :func:`lispetorch.inject` picks the module by
the config (:func:`lispetorch.config.method_of`).
"""

from ..config import METHODS, ROTATION_METHODS, ROTATIONS, RotationalPiSSAConfig, TinyLoraConfig, method_config
from ..ops import svd_factors
from .lora_ga import average_gradients
from .rotational import orthogonality_loss
from .tinylora import restore_tinylora, save_tinylora

__all__ = [
    "METHODS",
    "ROTATIONS",
    "ROTATION_METHODS",
    "RotationalPiSSAConfig",
    "TinyLoraConfig",
    "average_gradients",
    "method_config",
    "orthogonality_loss",
    "restore_tinylora",
    "save_tinylora",
    "svd_factors",
]
