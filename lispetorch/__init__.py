"""lispetorch: low-rank adaptation for Hugging Face models, on one native fused operator.

    import lispetorch as lt
    cfg = lt.LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])
    lt.inject(model, cfg)
    lt.save_adapter(model, "out/adapter")  # PEFT layout
"""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

from . import (  # noqa: F401
    _C,  # loading it registers torch.ops.lispetorch
    combine,  # lt.combine: the checkpoint optimizer
    ops,
    train,  # lt.train: the training engine
)
from .config import LoraConfig
from .layer import LoraLinear
from .methods import (
    RotationalPiSSAConfig,
    TinyLoraConfig,
    orthogonality_loss,
    restore_tinylora,
    save_as_lora,
    save_tinylora,
)
from .model import (
    active_adapter,
    adapter_layers,
    adapter_names,
    delete_adapter,
    disabled,
    inject,
    is_merged,
    match_modules,
    memory_usage,
    merge,
    set_adapter,
    set_enabled,
    trainable_parameters,
    unmerge,
)
from .nf4 import NF4Linear, quantize_nf4
from .peft_io import AdapterFormatError, load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = [
    "AdapterFormatError",
    "LoraConfig",
    "LoraLinear",
    "NF4Linear",
    "RotationalPiSSAConfig",
    "TinyLoraConfig",
    "active_adapter",
    "adapter_layers",
    "adapter_names",
    "combine",
    "delete_adapter",
    "disabled",
    "inject",
    "is_merged",
    "load_adapter",
    "match_modules",
    "memory_usage",
    "merge",
    "ops",
    "quantize_nf4",
    "orthogonality_loss",
    "restore_tinylora",
    "save_as_lora",
    "save_tinylora",
    "save_adapter",
    "set_adapter",
    "set_enabled",
    "train",
    "trainable_parameters",
    "unmerge",
]
