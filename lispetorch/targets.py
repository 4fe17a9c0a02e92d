"""Which modules to adapt (the one matcher), and replacing a module in a model (the one place that does it)."""

from __future__ import annotations

import re

import torch
from torch import nn

from .errors import AdapterStateError, ConfigError
from .hf import output_head
from .layer import LoraLinear, base_of, is_adaptable
from .nf4 import BLOCKSIZE, NF4Linear, is_bitsandbytes_4bit


def name_matches(name: str, targets: list[str] | str) -> bool:
    """``targets`` as a full-match regular expression (a string), or names and dotted name suffixes (a list)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
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


# Named target presets, resolved per architecture: the first candidate list whose every name (or dotted suffix)
# the model has. "standard": the attention's query and value projections (LoRA's paper); "extended": query, key,
# value and output; "all-linear": every adaptable layer but the output head.
PRESETS: dict[str, tuple[tuple[str, ...], ...]] = {
    "standard": (("q_proj", "v_proj"), ("attn.c_attn",), ("query_key_value",), ("query", "value"), ("q", "v"),
                 ("Wqkv",)),
    "extended": (("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"),
                 ("q_proj", "k_proj", "v_proj", "dense"), ("attn.c_attn", "attn.c_proj"),
                 ("query_key_value", "attention.dense"), ("query_key_value", "self_attention.dense"),
                 ("query", "key", "value", "attention.output.dense"), ("q", "k", "v", "o"), ("Wqkv", "out_proj")),
}


def resolve_preset(model: nn.Module, target_modules: list[str] | str) -> list[str] | str:
    """``target_modules`` with a preset name (``standard``, ``extended``) replaced by the model's module names for
    it; anything else (``all-linear`` included) as it is.

    Raises:
        ConfigError: the model has none of the preset's names (the message lists the model's module names).
    """
    if not isinstance(target_modules, str) or target_modules not in PRESETS:
        return target_modules
    names = list(adaptable_modules(model))
    for candidate in PRESETS[target_modules]:
        if all(any(name_matches(n, [c]) for n in names) for c in candidate):
            return list(candidate)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    raise ConfigError(f"target_modules preset {target_modules!r}: this model ({type(model).__name__}) has none of "
                      f"its module names {[list(c) for c in PRESETS[target_modules]]}; its adaptable modules are "
                      f"named {leaves}")


def match_modules(model: nn.Module, target_modules: list[str] | str, exclude_modules=None) -> dict[str, nn.Module]:
    """The one matcher: names or suffixes, a full-match regular expression, a preset (``"standard"``,
    ``"extended"``: :data:`PRESETS`, resolved for the model's architecture), or ``"all-linear"`` (every adaptable
    layer but the output head).

    Raises:
        ValueError: nothing matches; the message lists the adaptable module names found.
    """
    target_modules = resolve_preset(model, target_modules)
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
