"""lispetorch: low-rank adaptation for Hugging Face models, on one native fused operator.

    import lispetorch as lt
    cfg = lt.LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])
    lt.inject(model, cfg)
    lt.save_adapter(model, "out/adapter")  # PEFT layout
"""

import torch  # noqa: F401  (libtorch must be loaded before the extension, which lispetorch.ops loads)

from . import (  # noqa: F401
    combine,  # lt.combine: the checkpoint optimizer
    experiment,  # lt.experiment: grids of training runs and their results
    methods,
    ops,  # loads the extension, which registers torch.ops.lispetorch
    tasks,  # lt.tasks: classification and QA tasks with their metrics
    train,  # lt.train: the training engine
)
from .adapters import (
    active_adapter,
    adapter_layers,
    adapter_names,
    delete_adapter,
    disabled,
    is_merged,
    memory_usage,
    merge,
    set_adapter,
    set_enabled,
    trainable_parameters,
    unmerge,
)
from .analysis import Analysis, analyze
from .config import LoraConfig, RotationalPiSSAConfig, TinyLoraConfig
from .dispatch import inject
from .errors import (
    AdapterFormatError,
    AdapterStateError,
    ConfigError,
    DataError,
    LispetorchError,
    ShapeError,
    TinyLoraFormatError,
)
from .layer import LoraLinear
from .methods import orthogonality_loss, restore_tinylora, save_tinylora
from .nf4 import NF4Linear
from .peft_io import export, load_adapter, save_adapter, save_as_lora
from .targets import match_modules, quantize_nf4

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "AdapterFormatError",
    "AdapterStateError",
    "ConfigError",
    "DataError",
    "LispetorchError",
    "LoraConfig",
    "LoraLinear",
    "NF4Linear",
    "RotationalPiSSAConfig",
    "ShapeError",
    "TinyLoraConfig",
    "TinyLoraFormatError",
    "active_adapter",
    "adapter_layers",
    "adapter_names",
    "analyze",
    "combine",
    "delete_adapter",
    "disabled",
    "experiment",
    "export",
    "inject",
    "is_merged",
    "load_adapter",
    "match_modules",
    "memory_usage",
    "merge",
    "methods",
    "ops",
    "orthogonality_loss",
    "quantize_nf4",
    "restore_tinylora",
    "save_adapter",
    "save_as_lora",
    "save_tinylora",
    "set_adapter",
    "set_enabled",
    "tasks",
    "train",
    "trainable_parameters",
    "unmerge",
]
