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
    dora_caching,
    is_merged,
    memory_usage,
    merge,
    set_adapter,
    set_dora_recompute,
    set_enabled,
    set_trainable_adapters,
    trainable_parameters,
    unmerge,
)
from .analysis import Analysis, analyze
from .config import LoraConfig, RotationalPiSSAConfig, TinyLoraConfig
from .dispatch import inject
from .errors import (
    AdapterFormatError,
    AdapterStateError,
    CheckpointError,
    ConfigError,
    DataError,
    LispetorchError,
    NonFiniteError,
    ShapeError,
    TinyLoraFormatError,
    WriteError,
)
from .experts import LoraExperts
from .layer import LoraLinear
from .merged_export import export_merged
from .methods import orthogonality_loss, restore_tinylora, save_tinylora
from .nf4 import NF4Linear
from .optim import optimizer_param_groups
from .peft_io import export, hotswap_adapter, load_adapter, save_adapter, save_as_lora
from .saved_modules import ModulesToSave
from .targets import match_modules, quantize_nf4
from .unload import merge_and_unload

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "AdapterFormatError",
    "AdapterStateError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "LispetorchError",
    "LoraConfig",
    "LoraExperts",
    "LoraLinear",
    "ModulesToSave",
    "NF4Linear",
    "NonFiniteError",
    "RotationalPiSSAConfig",
    "ShapeError",
    "TinyLoraConfig",
    "TinyLoraFormatError",
    "WriteError",
    "active_adapter",
    "adapter_layers",
    "adapter_names",
    "analyze",
    "combine",
    "delete_adapter",
    "disabled",
    "dora_caching",
    "experiment",
    "export",
    "export_merged",
    "hotswap_adapter",
    "inject",
    "is_merged",
    "load_adapter",
    "match_modules",
    "memory_usage",
    "merge",
    "merge_and_unload",
    "methods",
    "ops",
    "optimizer_param_groups",
    "orthogonality_loss",
    "quantize_nf4",
    "restore_tinylora",
    "save_adapter",
    "save_as_lora",
    "save_tinylora",
    "set_adapter",
    "set_dora_recompute",
    "set_trainable_adapters",
    "set_enabled",
    "tasks",
    "train",
    "trainable_parameters",
    "unmerge",
]
