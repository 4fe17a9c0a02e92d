"""Hugging Face specifics: GPT-2's ``Conv1D`` orientation, the output head, dtype names, the model's id."""

from __future__ import annotations

import functools

import torch
from torch import nn

from .errors import ConfigError

# dtype names as configs and scripts give them (LispE's "float" and "half" included)
DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "half": torch.float16, "float64": torch.float64}


@functools.cache  # asked at every adapted forward (weight_out_in)
def conv1d_type():
    """transformers' GPT-2 ``Conv1D`` (weight stored ``(in, out)``), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D``, whose weight is stored ``(in, out)`` (PEFT's ``fan_in_fan_out``)."""
    conv1d = conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_dense_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D``: the dense layers an adapter can wrap."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_out_in(layer: nn.Module) -> torch.Tensor:
    """The weight of a linear layer as ``(out, in)``: a transposed view for ``Conv1D`` (stored ``(in, out)``)."""
    return layer.weight.t() if is_conv1d(layer) else layer.weight


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output embedding (``get_output_embeddings()``, else ``lm_head``), or None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        head = getattr(model, "lm_head", None)
    return head


def parse_dtype(value, what: str = "dtype") -> torch.dtype | None:
    """A floating-point ``torch.dtype`` from a dtype or its name (``"bfloat16"``, ``"torch.float16"``); None stays None.

    Raises:
        ConfigError: not a floating-point dtype name (the message names ``what`` and the value).
    """
    if value is None or isinstance(value, torch.dtype):
        return value
    dt = DTYPES.get(str(value).removeprefix("torch."))
    if dt is None:
        raise ConfigError(f"unknown floating-point {what} {value!r}; {what} must be one of {', '.join(DTYPES)}")
    return dt


def dtype_name(dtype) -> str | None:
    """``"bfloat16"`` for ``torch.bfloat16`` (and for its name); None for None."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def model_id(model: nn.Module) -> str:
    """The model's ``config._name_or_path`` (else ``name_or_path``), or ``""``."""
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None) or "")


POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length")


def max_positions(model: nn.Module) -> tuple[str, int] | None:
    """The key of the model's config that bounds its sequence length, and its value (GPT-2's ``n_positions``,
    ``max_position_embeddings`` elsewhere); None when the config gives none."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in POSITION_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


def task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for the model: ``"CAUSAL_LM"`` for a ``…ForCausalLM``, else None."""
    return "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None
