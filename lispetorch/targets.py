"""Which modules to adapt (the one matcher), and replacing a module in a model (the one place that does it)."""

from __future__ import annotations

import torch
from torch import nn

from .errors import AdapterStateError, ConfigError
from .hf import output_head
from .layer import LoraLinear, base_of, is_adaptable
from .nf4 import BLOCKSIZE, NF4Linear, is_bitsandbytes_4bit
from .validate import fullmatch


def name_matches(name: str, targets: list[str] | str) -> bool:
    """``targets`` as a full-match regular expression (a string, matched with RE2 in linear time), or names and
    dotted name suffixes (a list)."""
    if isinstance(targets, str):
        return fullmatch(targets, name)
    return any(name == t or name.endswith("." + t) for t in targets)


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module an adapter can wrap (``nn.Linear``, ``Conv1D``, ``NF4Linear``, or an existing adapter), by name."""
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


def adopt_bitsandbytes(model: nn.Module, chosen: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Replaces the chosen bitsandbytes 4-bit NF4 layers (a model loaded by transformers with
    ``load_in_4bit=True``) by :class:`~lispetorch.NF4Linear` holding the very same codes and absmax, so that an
    adapter wraps them like any NF4 base; the model computes the same function. Returns ``chosen`` with the
    replacements.

    Raises:
        TypeError: a chosen 4-bit layer that holds FP4 (nothing is replaced then).
    """
    found = {n: m for n, m in chosen.items() if is_bitsandbytes_4bit(m)}
    if not found:
        return chosen
    # the activations' dtype (the model's own, as loaded): what the other layers compute in
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else None
    converted = {n: NF4Linear.from_bitsandbytes(m, dtype) for n, m in found.items()}  # all checked first
    for name, layer in converted.items():
        replace_module(model, name, layer)
    return {n: converted.get(n, m) for n, m in chosen.items()}


def match_modules(model: nn.Module, target_modules: list[str] | str, exclude_modules=None) -> dict[str, nn.Module]:
    """The one matcher: names or suffixes, a full-match regular expression, or ``"all-linear"`` (every adaptable
    layer but the output head).

    Raises:
        ValueError: nothing matches; the message lists the adaptable module names found.
    """
    candidates = adaptable_modules(model)
    if target_modules == "all-linear":
        head = output_head(model)
        chosen = {n: m for n, m in candidates.items() if base_of(m) is not head and m is not head}
    else:
        chosen = {n: m for n, m in candidates.items() if name_matches(n, target_modules)}
    if exclude_modules is not None:
        chosen = {n: m for n, m in chosen.items() if not name_matches(n, exclude_modules)}
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ConfigError(
            f"target_modules {target_modules!r} matches no adaptable module; the model's adaptable modules are "
            f"named {leaves} ({len(candidates)} in all)"
        )
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts ``new`` in ``model`` at the dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_nf4(model: nn.Module, target_modules: list[str] | str = "all-linear", exclude_modules=None,
                 blocksize: int = BLOCKSIZE, double_quant: bool = False) -> dict[str, NF4Linear]:
    """Replaces the selected linear layers' weights (the base layers under adapters included: after a PiSSA or
    Rotational PiSSA init, that is the residual) by NF4, in place.

    Returns:
        dict[str, NF4Linear]: the quantised layers by module name.

    Raises:
        AdapterStateError: a selected layer has a merged adapter. ValueError: nothing matches. TypeError: a
            weight that is not floating point. On any of them the model is left unchanged.
    """
    chosen = match_modules(model, target_modules, exclude_modules)
    for name, module in chosen.items():
        if isinstance(module, LoraLinear) and module.merged:
            raise AdapterStateError(f"layer {name!r} has adapter {module.merged_adapter!r} merged: unmerge before "
                                    "quantising")
        base = base_of(module)
        if not isinstance(base, NF4Linear) and not is_bitsandbytes_4bit(base) and not base.weight.is_floating_point():
            raise TypeError(f"NF4 quantises floating-point weights, but {name!r} holds {base.weight.dtype}")
    chosen = adopt_bitsandbytes(model, chosen)  # already NF4: taken as it is
    done: dict[str, NF4Linear] = {}
    for name, module in chosen.items():
        base = base_of(module)
        if isinstance(base, NF4Linear):
            done[name] = base
            continue
        q = NF4Linear.from_linear(base, blocksize, double_quant)
        if isinstance(module, LoraLinear):
            module.base_layer = q
        else:
            replace_module(model, name, q)
        done[name] = q
    return done
