"""Training: ``lispetorch.train.train(config)`` or ``lispetorch train CONFIG.yaml``.

    import lispetorch as lt
    result = lt.train.train({"data": "corpus/", "output_dir": "runs/a", "max_steps": 200,
                             "lora": {"rank": 16, "alpha": 32}})
    result.adapter_dir  # a PEFT adapter directory
"""

from ..devices import available_devices, resolve_device
from ..errors import CheckpointError, ConfigError, DataError, NonFiniteError, WriteError
from ..schedule import SCHEDULER_TYPES, lr_at, make_scheduler
from .config import DistributedSection, LoraSection, TrainConfig
from .data import Dataset, load_dataset, read_documents
from .distributed import DistributedError
from .engine import Trainer, TrainResult, check_checkpoint, checkpoint_dirs, checkpoints, train

__all__ = [
    "SCHEDULER_TYPES",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Dataset",
    "DistributedError",
    "DistributedSection",
    "LoraSection",
    "NonFiniteError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "WriteError",
    "available_devices",
    "check_checkpoint",
    "checkpoint_dirs",
    "checkpoints",
    "load_dataset",
    "lr_at",
    "make_scheduler",
    "read_documents",
    "resolve_device",
    "train",
]
