"""Model-level API: inject adapters, find them, merge, enable, switch, count memory."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from .config import LoraConfig
from .layer import LoraLinear, is_adaptable


# --- which modules -----------------------------------------------------------------------------------------
def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        head = getattr(model, "lm_head", None)
    return head


def _name_matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module an adapter can wrap (``nn.Linear``, ``Conv1D``, or an existing adapter), by name."""
    found: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, LoraLinear):
            found[name] = module
            skip.append(name)
        elif is_adaptable(module):
            found[name] = module
    return found


def match_modules(model: nn.Module, target_modules: list[str] | str, exclude_modules=None) -> dict[str, nn.Module]:
    """The one matcher: names or suffixes, a full-match regular expression, or ``"all-linear"``.

    Raises:
        ValueError: nothing matches; the message lists the adaptable module names found.
    """
    candidates = adaptable_modules(model)
    if target_modules == "all-linear":
        head = _output_head(model)
        chosen = {
            n: m for n, m in candidates.items()
            if m is not head and not (isinstance(m, LoraLinear) and m.base_layer is head)
        }
    else:
        chosen = {n: m for n, m in candidates.items() if _name_matches(n, target_modules)}
    if exclude_modules is not None:
        chosen = {n: m for n, m in chosen.items() if not _name_matches(n, exclude_modules)}
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ValueError(
            f"target_modules {target_modules!r} matches no adaptable module; the model's adaptable modules are "
            f"named {leaves} ({len(candidates)} in all)"
        )
    return chosen


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _dtype(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    dt = getattr(torch, str(value), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"unknown floating-point dtype {value!r}")
    return dt


# --- public API --------------------------------------------------------------------------------------------
def select_for_new_adapter(model: nn.Module, config, adapter_name: str) -> dict[str, nn.Module]:
    """The modules ``config`` targets; an error if any of them already holds an adapter named ``adapter_name``."""
    chosen = match_modules(model, config.target_modules, config.exclude_modules)
    twice = [n for n, m in chosen.items() if isinstance(m, LoraLinear) and adapter_name in m.lora_A]
    if twice:
        raise ValueError(
            f"adapter {adapter_name!r} is already injected into {len(twice)} of the targeted layers (e.g. "
            f"{twice[0]!r}); use another adapter name, or delete_adapter first"
        )
    return chosen


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
           calibration_batches=None) -> dict[str, LoraLinear]:
    """Adapts the layers of ``model`` that ``config.target_modules`` selects, in place.

    Every parameter of the model is frozen except the new adapter's factors, which become the active adapter.

    Args:
        model (nn.Module): any module; transformers models included.
        config (LoraConfig | RotationalPiSSAConfig | TinyLoraConfig): the method and its rank, alpha, dropout,
            targets, init (``LoraConfig.init`` ``"pissa"``, ``"pissa_niter_K"`` and ``"lora_ga"`` are SVD inits).
        adapter_name (str): name of the adapter. Default ``"default"``.
        calibration_batches (Iterable | None): for ``init="lora_ga"``: input_ids tensors or dicts of model inputs
            whose averaged loss gradient initialises the adapter.

    Returns:
        dict[str, LoraLinear]: the adapted layers by module name.

    Raises:
        ValueError: no module matches, or a matched layer already has an adapter of this name (the model is
            left unchanged).
    """
    from . import methods

    if isinstance(config, methods.RotationalPiSSAConfig):
        return methods.inject_rotational_pissa(model, config, adapter_name)
    if isinstance(config, methods.TinyLoraConfig):
        return methods.inject_tinylora(model, config, adapter_name)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, RotationalPiSSAConfig or TinyLoraConfig, got "
                        f"{type(config).__name__}")
    if config.init not in ("kaiming", "gaussian"):
        return methods.inject_lora_init(model, config, adapter_name, calibration_batches)
    dtype = _dtype(config.dtype)
    chosen = select_for_new_adapter(model, config, adapter_name)
    for p in model.parameters():
        p.requires_grad_(False)
    layers: dict[str, LoraLinear] = {}
    for name, module in chosen.items():
        layer = module if isinstance(module, LoraLinear) else LoraLinear(module)
        layer.add_adapter(adapter_name, config.r, config.alpha, config.dropout, config.use_rslora, config.init,
                          dtype)
        if layer is not module:
            _replace(model, name, layer)
        layers[name] = layer
    set_adapter(model, adapter_name)
    return layers


def adapter_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The adapted layers of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present in ``model``, in order of first appearance."""
    names: dict[str, None] = {}
    for layer in adapter_layers(model).values():
        names.update(dict.fromkeys(layer.lora_A.keys()))
    return list(names)


def _layers_or_raise(model: nn.Module) -> dict[str, LoraLinear]:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapters: call lispetorch.inject or load_adapter first")
    return layers


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Makes ``adapter_name`` the active adapter; only its factors train.

    Raises:
        ValueError: no layer holds that adapter (the message lists the adapters present), or another adapter
            is merged.
    """
    layers = _layers_or_raise(model)
    if not any(adapter_name in layer.lora_A for layer in layers.values()):
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {adapter_names(model)}")
    merged = {layer.merged_adapter for layer in layers.values()} - {None, adapter_name}
    if merged:
        raise ValueError(f"adapter {sorted(merged)[0]!r} is merged: unmerge before switching adapters")
    for layer in layers.values():
        if adapter_name in layer.lora_A:
            layer.active_adapter = adapter_name
        else:
            layer.active_adapter = None
        for name in layer.lora_A:
            layer.set_trainable(name, name == adapter_name)


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name (None without adapters)."""
    for layer in adapter_layers(model).values():
        if layer.active_adapter is not None:
            return layer.active_adapter
    return None


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Removes ``adapter_name`` from every layer; layers left without adapters get their base layer back."""
    layers = _layers_or_raise(model)
    if not any(adapter_name in layer.lora_A for layer in layers.values()):
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {adapter_names(model)}")
    for name, layer in layers.items():
        if adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)
            if not layer.lora_A:
                _replace(model, name, layer.base_layer)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train: after :func:`inject`, the active adapter's factors and nothing else."""
    return [p for p in model.parameters() if p.requires_grad]


def merge(model: nn.Module, safe: bool = True) -> None:
    """Folds the active adapter into the base weights (idempotent). ``safe`` refuses NaN/Inf results.

    Unmerge is exact: each merged layer keeps 1 byte per weight element (plus rare exceptions) until then.
    If a layer's merge fails, the layers merged before it are unmerged again, so the model is unchanged.
    """
    done = []
    try:
        for layer in _layers_or_raise(model).values():
            if not layer.merged:
                layer.merge(safe=safe)
                done.append(layer)
    except BaseException:
        for layer in reversed(done):
            layer.unmerge()
        raise


def unmerge(model: nn.Module) -> None:
    """Gives back the pre-merge base weights bit for bit (idempotent)."""
    for layer in _layers_or_raise(model).values():
        layer.unmerge()


def is_merged(model: nn.Module) -> bool:
    return any(layer.merged for layer in adapter_layers(model).values())


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Turns the adapters on or off without touching any weight (off: the base model's outputs)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    for layer in _layers_or_raise(model).values():
        layer.enabled = enabled


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: adapters off inside, each layer's previous state restored on exit (even on error)."""
    layers = _layers_or_raise(model)
    before = {name: layer.enabled for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.enabled = False
        yield model
    finally:
        for name, layer in layers.items():
            layer.enabled = before[name]


def memory_usage(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (adapters and merge state included), each storage once."""
    seen: set[tuple] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total
