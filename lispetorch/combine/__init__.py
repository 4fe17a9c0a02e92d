"""The LoRA checkpoint optimizer: optimal combination weights of trained LoRA checkpoints, and the combined
adapter.

    from lispetorch import combine
    result = combine.optimize("checkpoints_config.yml", target="concatenationTrained")
    combine.build("checkpoints_config.yml", result, "combined/", mode="cat")   # exact; or "svd", "linear"

``optimize`` streams every module's factors from the checkpoint files and computes the Gram of the deltas
``⟨sᵢBᵢAᵢ, sⱼBⱼAⱼ⟩_F`` from the factors only (:func:`lispetorch.ops.lora_gram`), then solves the k-weight
least-squares problem exactly. The steps of the original pipeline (``extract``, ``organize``) are here too.
"""

from .build import MODES, build, weights_of
from .config import CombineConfig, load_config, verify_paths, write_default_config
from .optimize import module_grams, optimize
from .reader import Checkpoint, open_checkpoint
from .solver import CONSTRAINTS, Solution, kkt, solve
from .steps import extract, organize, run_all, summarize, write_results

__all__ = [
    "CONSTRAINTS",
    "MODES",
    "Checkpoint",
    "CombineConfig",
    "Solution",
    "build",
    "extract",
    "kkt",
    "load_config",
    "module_grams",
    "open_checkpoint",
    "optimize",
    "organize",
    "run_all",
    "solve",
    "summarize",
    "verify_paths",
    "weights_of",
    "write_default_config",
    "write_results",
]
