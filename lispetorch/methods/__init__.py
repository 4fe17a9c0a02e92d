"""SVD-family methods on the one operator: PiSSA and LoRA-GA inits, Rotational PiSSA, TinyLoRA, and the
conversion of any of them to a plain PEFT LoRA on the original weights."""

from .config import ROTATION_METHODS, RotationalPiSSAConfig, TinyLoraConfig
from .convert import lora_equivalent, save_as_lora
from .inject import (
    average_gradients,
    inject_lora_init,
    inject_rotational_pissa,
    inject_tinylora,
    orthogonality_loss,
    svd_factors,
)
from .select import METHODS, method_config
from .tinylora import restore_tinylora, save_tinylora

__all__ = [
    "METHODS",
    "ROTATION_METHODS",
    "RotationalPiSSAConfig",
    "TinyLoraConfig",
    "average_gradients",
    "inject_lora_init",
    "inject_rotational_pissa",
    "inject_tinylora",
    "lora_equivalent",
    "method_config",
    "orthogonality_loss",
    "restore_tinylora",
    "save_as_lora",
    "save_tinylora",
    "svd_factors",
]
