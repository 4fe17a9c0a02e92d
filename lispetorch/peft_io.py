"""Adapters on disk in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's, with the adapter name stripped: ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and
``...lora_B.weight`` ``(out, r)``. A directory written here loads with ``peft.PeftModel.from_pretrained``, and
one written by PEFT loads with :func:`load_adapter`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from . import _atomic
from .layer import LoraLinear, is_adaptable, weight_out_in
from .model import _replace, adaptable_modules, adapter_layers, set_adapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


class AdapterFormatError(ValueError):
    """An adapter directory that cannot be read: the message names the file and what is wrong."""


# --- save --------------------------------------------------------------------------------------------------
def _targets_for(names: list[str], model: nn.Module) -> list[str] | str:
    """The leaf names of ``names`` if they select exactly those modules, else an exact regular expression."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n in adaptable_modules(model) if n.rsplit(".", 1)[-1] in leaves}
    if selected == set(names):
        return leaves
    return "^(" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def _most_common(values: dict[str, float]):
    counts: dict[float, int] = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: counts[v])


def adapter_state(model: nn.Module, adapter_name: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors (PEFT keys) and ``adapter_config.json`` content of one adapter, without writing anything."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapters to save")
    if adapter_name is None:
        adapter_name = next((layer.active_adapter for layer in layers.values() if layer.active_adapter), None)
    holding = {n: layer for n, layer in layers.items() if adapter_name in layer.lora_A}
    if not holding:
        raise ValueError(f"no adapter named {adapter_name!r} in the model")
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas, dropouts, rslora, fan = {}, {}, {}, set(), set()
    for name, layer in holding.items():
        if adapter_name in layer.lora_R or adapter_name in layer.lora_R_fn:
            raise ValueError(
                f"adapter {adapter_name!r} on {name!r} has an r×r core (lora_R), which PEFT's LoRA layout cannot "
                "hold; lispetorch.save_as_lora writes it as a plain LoRA on the original weights"
            )
        A, B, _ = layer.factors(adapter_name)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A.detach().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B.detach().contiguous()
        ranks[name] = layer.r[adapter_name]
        alphas[name] = layer.lora_alpha[adapter_name]
        dropouts[name] = layer.lora_dropout[adapter_name]
        rslora.add(layer.use_rslora[adapter_name])
        fan.add(layer.fan_in_fan_out)
    if len(rslora) > 1:
        raise ValueError(f"adapter {adapter_name!r} mixes rsLoRA and plain scaling across layers")
    if len(fan) > 1:
        raise ValueError(f"adapter {adapter_name!r} mixes Linear and Conv1D layers, which one PEFT config cannot hold")
    return tensors, peft_config(model, list(holding), ranks, alphas, dropouts, rslora.pop(), fan == {True})


def peft_config(model: nn.Module, modules: list[str], ranks: dict[str, int], alphas: dict[str, float],
                dropouts: dict[str, float], use_rslora: bool, fan_in_fan_out: bool) -> dict:
    """The ``adapter_config.json`` PEFT writes for a LoRA on ``modules``: the most common rank, alpha and dropout
    become ``r``, ``lora_alpha`` and ``lora_dropout``, the other ranks and alphas ``rank_pattern``/``alpha_pattern``."""
    r, alpha = _most_common(ranks), _most_common(alphas)
    cfg_obj = getattr(model, "config", None)
    base = getattr(cfg_obj, "_name_or_path", None) or getattr(model, "name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": str(base) if base else None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common(dropouts),
        "target_modules": _targets_for(modules, model),
        "exclude_modules": None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Writes one adapter (the active one by default) as a PEFT adapter directory, atomically.

    The directory is written next to its final place and swapped in at once: a crash leaves the previous
    directory (or none), never a half-written one.

    Returns:
        Path: the directory.
    """
    directory = Path(directory)
    adapter_state(model, adapter_name)  # fail before touching the file system
    with _atomic.directory(directory) as tmp:
        write_adapter_files(model, tmp, adapter_name)
    return directory


def write_adapter_files(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None,
                        base_model: str | None = None) -> None:
    """Writes ``adapter_model.safetensors`` and ``adapter_config.json`` into an existing directory (one that
    is itself being written atomically, such as a checkpoint). ``base_model`` overrides the recorded
    ``base_model_name_or_path``."""
    tensors, config = adapter_state(model, adapter_name)
    if base_model is not None:
        config["base_model_name_or_path"] = str(base_model)
    write_peft_files(directory, tensors, config)


def write_peft_files(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """``adapter_model.safetensors`` (``tensors`` under PEFT keys) and ``adapter_config.json`` (``config``) in
    ``directory``, which the caller writes atomically as a whole."""
    from safetensors.torch import save_file

    directory = Path(directory)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --- load --------------------------------------------------------------------------------------------------
def read_config(directory: str | os.PathLike) -> dict:
    """Reads ``adapter_config.json``; errors name the file (and the line, for JSON syntax)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterFormatError(f"{path}: missing (an adapter directory needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise AdapterFormatError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterFormatError(f"{path}: peft_type is {peft_type!r}; only LORA adapters can be loaded")
    if config.get("use_dora"):
        raise AdapterFormatError(f"{path}: DoRA adapters (use_dora) are not supported")
    for key in ("r", "lora_alpha"):
        if key in config and (not isinstance(config[key], (int, float)) or config[key] <= 0):
            raise AdapterFormatError(f"{path}: {key} must be a positive number, got {config[key]!r}")
    return config


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads the adapter tensors (safetensors; a legacy ``.bin`` with ``weights_only``); errors name the file."""
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if path.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
            raise AdapterFormatError(f"{path}: not a readable safetensors file ({e})") from None
    legacy = directory / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterFormatError(f"{legacy}: not a readable weights file ({e})") from None
    raise AdapterFormatError(f"{path}: missing (an adapter directory needs {CONFIG_NAME} and {WEIGHTS_NAME})")


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name or a dotted suffix of it."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    trainable: bool = True,
) -> dict[str, LoraLinear]:
    """Loads a PEFT LoRA adapter directory into ``model`` (injecting layers as needed) and activates it.

    Everything is read and checked before the model changes: on any error the model is left as it was.
    An adapter of the same name already in the model is replaced.

    Args:
        model (nn.Module): the base model (or one already adapted).
        directory (str | PathLike): a PEFT adapter directory.
        adapter_name (str): the name to load it under. Default ``"default"``.
        trainable (bool): whether its factors train. Default True.

    Returns:
        dict[str, LoraLinear]: the layers holding the adapter.

    Raises:
        AdapterFormatError: a missing, truncated or malformed file, or a key the model has no module for.
        ValueError: a tensor whose shape does not fit the model (names the key and both shapes).
    """
    directory = Path(directory)
    config = read_config(directory)
    weights = read_weights(directory)
    wpath = directory / WEIGHTS_NAME
    modules = dict(model.named_modules())
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise AdapterFormatError(f"{wpath}: unsupported key {key!r} (only lora_A / lora_B weights are read)")
        name, which = m.group(1), m.group(2)
        module = modules.get(name)
        if module is None or not (isinstance(module, LoraLinear) or is_adaptable(module)):
            raise AdapterFormatError(f"{wpath}: key {key!r} names module {name!r}, which the model has no "
                                     "adaptable layer for")
        if not torch.is_floating_point(tensor) or not torch.isfinite(tensor).all():
            raise AdapterFormatError(f"{wpath}: key {key!r} holds non-finite or non-float values")
        found.setdefault(name, {})[which] = tensor
    if not found:
        raise AdapterFormatError(f"{wpath}: holds no LoRA weights")
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    use_rslora = bool(config.get("use_rslora", False))
    plan = []
    for name, pair in found.items():
        if set(pair) != {"lora_A", "lora_B"}:
            missing = {"lora_A", "lora_B"} - set(pair)
            raise AdapterFormatError(f"{wpath}: module {name!r} lacks {missing.pop()}")
        module = modules[name]
        layer = module if isinstance(module, LoraLinear) else None
        base = layer.base_layer if layer else module
        w = weight_out_in(base)
        out_f, in_f = w.shape
        A, B = pair["lora_A"], pair["lora_B"]
        r = A.shape[0] if A.dim() == 2 else -1
        if A.dim() != 2 or A.shape[1] != in_f:
            raise ValueError(f"{wpath}: {PREFIX}{name}.lora_A.weight has shape {tuple(A.shape)} but the model "
                             f"needs ({r if r > 0 else 'r'}, {in_f})")
        if B.shape != (out_f, r):
            raise ValueError(f"{wpath}: {PREFIX}{name}.lora_B.weight has shape {tuple(B.shape)} but the model "
                             f"needs ({out_f}, {r})")
        if isinstance(base, nn.Linear) and fan_in_fan_out:
            raise AdapterFormatError(f"{directory / CONFIG_NAME}: fan_in_fan_out is true but {name!r} is nn.Linear")
        if layer is not None and layer.merged_adapter is not None:
            raise ValueError(f"layer {name!r} has adapter {layer.merged_adapter!r} merged: unmerge before loading")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        rank_cfg = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r", r))
        if rank_cfg != r:
            raise ValueError(f"{wpath}: {PREFIX}{name}.lora_A.weight has rank {r} but {CONFIG_NAME} says {rank_cfg}")
        plan.append((name, module, A.to(w.dtype).to(w.device), B.to(w.dtype).to(w.device), float(alpha)))
    # Everything checked: now change the model.
    for name, layer in adapter_layers(model).items():
        if adapter_name in layer.lora_A and name not in found:
            layer.delete_adapter(adapter_name)
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    layers: dict[str, LoraLinear] = {}
    for name, module, A, B, alpha in plan:
        layer = module if isinstance(module, LoraLinear) else LoraLinear(module)
        if adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)
        layer.set_factors(adapter_name, A, B, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        if layer is not module:
            _replace(model, name, layer)
        layers[name] = layer
    for p in model.parameters():
        p.requires_grad_(False)
    set_adapter(model, adapter_name)
    if not trainable:
        for layer in layers.values():
            for p in layer.factors(adapter_name):
                if p is not None:
                    p.requires_grad_(False)
    return layers
