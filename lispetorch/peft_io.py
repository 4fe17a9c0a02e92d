"""Adapters to and from PEFT's files: :func:`export` (the one way an adapter becomes PEFT tensors and config),
:func:`save_adapter`, :func:`save_as_lora` and :func:`load_adapter`.

A directory written here loads with ``peft.PeftModel.from_pretrained``, and one written by PEFT loads with
:func:`load_adapter`. Keys are PEFT's with the adapter name stripped (:mod:`lispetorch.peft_format`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from .adapters import AdapterPlan, install, layers_holding
from .errors import AdapterFormatError, AdapterStateError, ShapeError, merged_error
from .hf import model_id, task_type, weight_out_in
from .layer import LoraLinear, base_of
from .peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    exact_targets,
    lora_config,
    module_ranks,
    parse_key,
    peft_key,
    read_config,
    read_weights,
    write_directory,
)
from .targets import adaptable_modules
from .validate import show


def _base_module_names(model: nn.Module) -> list[str]:
    """The module names of ``model`` as its base model has them: an adapter's own submodules left out."""
    adapted = [n + "." for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    return [n for n, _ in model.named_modules() if not any(n.startswith(a) for a in adapted)]


def _targets_for(names: list[str], model: nn.Module) -> list[str] | str:
    """The leaf names of ``names`` if, by PEFT's rule (a name equal to one, or ending in ``.`` and one), they
    select exactly those modules among all the base model's modules, else an exact regular expression. (A leaf
    name such as ``"0"`` for the layers of an ``nn.Sequential`` also names whole decoder layers, which PEFT would
    then try to adapt.)"""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n in _base_module_names(model) if n.rsplit(".", 1)[-1] in leaves}
    return leaves if selected == set(names) else exact_targets(names)


def _with_core(B: torch.Tensor, R: torch.Tensor | None) -> torch.Tensor:
    if R is None:
        return B.detach()
    return (B.detach().float() @ R.detach().float()).to(B.dtype)  # (out, r)


# --- export ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def export(model: nn.Module, adapter_name: str | None = None,
           original_weights: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The PEFT tensors (PEFT keys) and ``adapter_config.json`` content of one adapter, without writing anything.

    Args:
        model (nn.Module): a model with adapters.
        adapter_name (str | None): the adapter; the active one when None.
        original_weights (bool): False: the factors as they are, applying to the model's base weights as they
            are now (for PiSSA or LoRA-GA, the residual, as PEFT saves them); an adapter with an r×r core is
            refused. True: the plain LoRA that gives this adapter's outputs on the original (pre-init) weights:
            a core R is folded into ``B R``, and an init offset ``s·B₀R₀A₀`` taken out of the base (PiSSA,
            LoRA-GA, Rotational PiSSA) makes it the rank-2r LoRA ``B' = [B R | −B₀R₀]``, ``A' = [A; A₀]`` with
            alpha doubled (× √2 with rsLoRA), so the scaling is unchanged (PEFT's
            ``path_initial_model_for_weight_conversion``). Default False.

    Returns:
        tuple[dict[str, Tensor], dict]: the tensors and the config.

    Raises:
        AdapterStateError: no such adapter, or it is merged, or (``original_weights`` False) it has a core.
        ValueError: it mixes layers that one PEFT config cannot describe (rsLoRA and plain, Linear and Conv1D).
    """
    name, holding = layers_holding(model, adapter_name)
    merged = [n for n, layer in holding.items() if layer.merged_adapter == name]
    if merged and original_weights:
        raise merged_error(name, merged[0], "unmerge before converting")
    tensors, ranks, alphas, dropouts, rslora, fan = {}, {}, {}, {}, set(), set()
    for mod, layer in holding.items():
        settings = layer.settings[name]
        A, B, R = layer.factors(name)
        if R is not None and not original_weights:
            raise AdapterStateError(
                f"adapter {name!r} on {mod!r} has an r×r core (lora_R), which PEFT's LoRA layout cannot hold; "
                "lispetorch.save_as_lora writes it as a plain LoRA on the original weights"
            )
        A, B = A.detach(), _with_core(B, R)
        alpha, r = settings.alpha, settings.r
        if original_weights and name in layer.base_offset:
            off = layer.base_offset[name]
            if not math.isclose(off.scale, settings.scaling):
                raise AdapterStateError(f"{mod!r}: the base offset's scale {off.scale} differs from the adapter's "
                                        f"{settings.scaling}")
            A = torch.cat([A, off.A.to(A.dtype)], dim=0)  # (2r, in)
            B = torch.cat([B, -_with_core(off.B, off.R).to(B.dtype)], dim=1)  # (out, 2r)
            r, alpha = 2 * r, alpha * (math.sqrt(2) if settings.use_rslora else 2)
        tensors[peft_key(mod, "lora_A")] = A.contiguous()
        tensors[peft_key(mod, "lora_B")] = B.contiguous()
        ranks[mod], alphas[mod], dropouts[mod] = r, alpha, settings.dropout
        rslora.add(settings.use_rslora)
        fan.add(layer.fan_in_fan_out)
    if len(rslora) > 1:
        raise AdapterStateError(f"adapter {name!r} mixes rsLoRA and plain scaling across layers, which one PEFT config "
                                "cannot hold")
    if len(fan) > 1:
        raise AdapterStateError(f"adapter {name!r} mixes Linear and Conv1D layers, which one PEFT config cannot hold")
    config = lora_config(ranks, alphas, dropouts, rslora.pop(), fan == {True}, _targets_for(list(holding), model),
                         base_model=model_id(model) or None, task_type=task_type(model))
    return tensors, config


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Writes one adapter (the active one by default) as a PEFT adapter directory, atomically.

    The directory is written next to its final place and swapped in at once: a crash leaves the previous
    directory (or none), never a half-written one.

    Returns:
        Path: the directory.
    """
    return write_directory(directory, *export(model, adapter_name))


def save_as_lora(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Writes ``adapter_name`` (the active one by default) as a plain PEFT LoRA directory that applies to the
    original base weights (:func:`export` with ``original_weights=True``), atomically. PEFT's
    ``PeftModel.from_pretrained`` on the original model then gives this model's outputs (up to the rounding of an
    NF4-quantised residual, which the original weights do not have).

    Returns:
        Path: the directory.
    """
    return write_directory(directory, *export(model, adapter_name, original_weights=True))


# --- load --------------------------------------------------------------------------------------------------------
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
        AdapterStateError: a layer it loads into has an adapter merged.
    """
    directory = Path(directory)
    config = read_config(directory)
    weights = read_weights(directory)
    chosen, plans = _plans(model, directory, config, weights)
    layers = install(model, chosen, plans, adapter_name, replace=True)
    if not trainable:
        for layer in layers.values():
            layer.set_trainable(adapter_name, False)
    return layers


def _plans(model: nn.Module, directory: Path, config: dict, weights: dict[str, torch.Tensor]):
    """The modules and the plans a PEFT adapter's tensors make, every tensor checked against the model."""
    wpath = directory / WEIGHTS_NAME
    adaptable = adaptable_modules(model)  # by name: plain layers, or the adapters already wrapping them
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        parsed = parse_key(key)
        if parsed is None:
            raise AdapterFormatError(f"{wpath}: unsupported key {show(key)} (only lora_A / lora_B weights are read)")
        name, which = parsed
        if name not in adaptable:
            raise AdapterFormatError(f"{wpath}: key {show(key)} names module {show(name)}, which the model has no "
                                     "adaptable layer for")
        if not torch.is_floating_point(tensor) or not torch.isfinite(tensor).all():
            raise AdapterFormatError(f"{wpath}: key {show(key)} holds non-finite or non-float values")
        found.setdefault(name, {})[which] = tensor
    if not found:
        raise AdapterFormatError(f"{wpath}: holds no LoRA weights")
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    chosen, plans = {}, {}
    for name, pair in found.items():
        if set(pair) != {"lora_A", "lora_B"}:
            missing = {"lora_A", "lora_B"} - set(pair)
            raise AdapterFormatError(f"{wpath}: module {show(name)} lacks {missing.pop()}")
        module = adaptable[name]
        base = base_of(module)
        w = weight_out_in(base)
        out_f, in_f = w.shape
        A, B = pair["lora_A"], pair["lora_B"]
        r = A.shape[0] if A.dim() == 2 else -1
        if A.dim() != 2 or A.shape[1] != in_f:
            raise ShapeError(f"{wpath}: {peft_key(name, 'lora_A')} has shape {tuple(A.shape)} but the model "
                             f"needs ({r if r > 0 else 'r'}, {in_f})")
        if B.shape != (out_f, r):
            raise ShapeError(f"{wpath}: {peft_key(name, 'lora_B')} has shape {tuple(B.shape)} but the model "
                             f"needs ({out_f}, {r})")
        if isinstance(base, nn.Linear) and fan_in_fan_out:
            raise AdapterFormatError(f"{directory / CONFIG_NAME}: fan_in_fan_out is true but {name!r} is nn.Linear")
        if isinstance(module, LoraLinear) and module.merged_adapter is not None:
            raise merged_error(module.merged_adapter, name, "unmerge before loading")
        rank_cfg, alpha = module_ranks(config, name, r)
        if rank_cfg != r:
            raise AdapterFormatError(f"{wpath}: {peft_key(name, 'lora_A')} has rank {r} but {CONFIG_NAME} says "
                                     f"{rank_cfg}")
        chosen[name] = module
        plans[name] = AdapterPlan(A.to(w.dtype).to(w.device), B.to(w.dtype).to(w.device), alpha, dropout,
                                  use_rslora)
    return chosen, plans
