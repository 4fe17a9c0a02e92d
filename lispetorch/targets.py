"""Which modules to adapt (the one matcher), and replacing a module in a model (the one place that does it)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import AdapterStateError, ConfigError
from .hf import conv1d_type, is_conv1d, is_dense_linear, output_head, weight_out_in
from .layer import LoraLinear, base_of, is_adaptable
from .nf4 import BLOCKSIZE, NF4Linear, is_bitsandbytes_4bit
from .saved_modules import ModulesToSave
from .validate import compile_pattern, fullmatch


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
        elif isinstance(module, ModulesToSave):  # trained whole: neither it nor its copies take adapters
            skip.append(name)
        elif is_adaptable(module):
            found[name] = module
    return found


def own_forward(module: nn.Module) -> bool:
    """True for a subclass of ``nn.Linear`` or ``Conv1D`` whose class defines a forward of its own (a router that
    returns a tuple, a grouped projection, a hand-written ``x @ W.T + b``); not for the layers whose forward the
    adapter takes over knowingly (bitsandbytes 4-bit, ``NF4Linear``)."""
    if not is_dense_linear(module) or is_bitsandbytes_4bit(module):
        return False
    plain = conv1d_type() if is_conv1d(module) else nn.Linear
    return type(module).forward is not plain.forward


@torch.no_grad()
def computes_linear(module: nn.Module) -> bool:
    """Whether a layer with a forward of its own computes ``x Wᵀ + b`` all the same, tried on two random rows:
    an adapter then adds its term to what the layer computes, as for a plain linear layer."""
    w = weight_out_in(module)
    if w.device.type == "meta" or not w.is_floating_point():
        return False
    x = torch.randn(2, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)  # (2, in)
    try:
        y = module(x)
    except Exception:  # noqa: BLE001  (a forward that needs other inputs is not a plain linear one)
        return False
    want = torch.nn.functional.linear(x.float(), w.float(), None if module.bias is None else module.bias.float())
    return isinstance(y, torch.Tensor) and y.shape == want.shape and \
        torch.allclose(y.float(), want, rtol=1e-2, atol=1e-3 * float(want.abs().max()) + 1e-6)


def not_plain_linear(chosen: dict[str, nn.Module]) -> list[str]:
    """The names in ``chosen`` of the layers whose own forward does not compute ``x Wᵀ + b`` (:func:`own_forward`,
    :func:`computes_linear`): an adapter, which computes the linear map itself, would change what they return."""
    return [n for n, m in chosen.items() if own_forward(m) and not computes_linear(m)]


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


def layer_index(name: str, layers_pattern: list[str] | str | None = None) -> int | None:
    """The layer index in a module name, by PEFT's rule: the number after the first ``<layers_pattern>.`` segment
    (``model.layers.3.mlp.up_proj`` → 3 for ``"layers"``), or without a pattern the first number that follows a
    dotted segment; None when there is none."""
    if not layers_pattern:
        m = compile_pattern(r".*?\.[^.]*\.(?P<idx>\d+)\.", "layers_pattern").match(name)
        return None if m is None else int(m.group("idx"))
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        m = compile_pattern(pattern, "layers_pattern", form=r"(?:^|.*?\.){}\.(?P<idx>\d+)\.").match(name)
        if m is not None:
            return int(m.group("idx"))
    return None


def select_layers(chosen: dict[str, nn.Module], target_modules: list[str] | str, layers_to_transform,
                  layers_pattern=None) -> dict[str, nn.Module]:
    """The modules of ``chosen`` in the layers ``layers_to_transform`` (an index or a list of them), as PEFT selects
    them: a name given whole in ``target_modules`` is kept whatever its layer.

    Raises:
        ConfigError: an index no chosen module has, or a ``layers_pattern`` that finds no layer index (the message
            lists the indices that exist).
    """
    wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else list(layers_to_transform)
    exact = set(target_modules) if not isinstance(target_modules, str) else set()
    indices = {n: layer_index(n, layers_pattern) for n in chosen}
    found = sorted({i for i in indices.values() if i is not None})
    if not found:
        numbered = sorted({seg for n in chosen for seg, nxt in zip(n.split("."), n.split(".")[1:], strict=False)
                           if nxt.isdigit()})
        raise ConfigError(f"layers_pattern {layers_pattern!r} finds no layer index in the targeted modules; the "
                          f"numbered segments there are {numbered}")
    missing = [i for i in wanted if i not in found]
    if missing:
        raise ConfigError(f"layers_to_transform {layers_to_transform!r}: no targeted module is in layer(s) {missing}; "
                          f"the layers are {found}")
    return {n: m for n, m in chosen.items() if n in exact or indices[n] in wanted}


def match_modules(model: nn.Module, target_modules: list[str] | str, exclude_modules=None,
                  layers_to_transform=None, layers_pattern=None) -> dict[str, nn.Module]:
    """The one matcher: names or suffixes, a full-match regular expression, a preset (``"standard"``,
    ``"extended"``: :data:`PRESETS`, resolved for the model's architecture), or ``"all-linear"`` (every adaptable
    layer but the output head); then, with ``layers_to_transform``, only the modules in those layers
    (:func:`select_layers`).

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
    odd = not_plain_linear(chosen)
    if odd and target_modules == "all-linear":
        kinds = sorted({type(chosen[n]).__name__ for n in odd})
        warnings.warn(f"all-linear leaves out {len(odd)} layer(s) of class {', '.join(kinds)} (e.g. {odd[0]!r}): "
                      "a linear layer with a forward of its own that computes more than x Wᵀ + b, which an "
                      "adapter would replace", stacklevel=3)
        chosen = {n: m for n, m in chosen.items() if n not in odd}
    elif odd:
        raise ConfigError(f"target_modules {target_modules!r} selects {odd[0]!r} ({type(chosen[odd[0]]).__name__}), "
                          "a linear layer with a forward of its own that computes more than x Wᵀ + b (e.g. a "
                          "router returning a tuple): an adapter would replace that forward; exclude it")
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ConfigError(
            f"target_modules {target_modules!r} matches no adaptable module; the model's adaptable modules are "
            f"named {leaves} ({len(candidates)} in all)"
        )
    if layers_to_transform is not None and layers_to_transform != []:
        chosen = select_layers(chosen, target_modules, layers_to_transform, layers_pattern)
    return chosen


def match_saved_modules(model: nn.Module, modules_to_save: list[str], strict: bool = True) -> dict[str, nn.Module]:
    """The modules ``modules_to_save`` names (names or dotted name suffixes; a module already trained whole is
    found by its own name), outermost first: a module inside one already chosen is not chosen again.

    Args:
        strict (bool): a name that matches no module is an error (else it is passed over, as PEFT does when it
            reads a file: its task types add ``classifier`` and ``score`` whichever the model has). Default True.

    Raises:
        ConfigError: a name that matches no module (with ``strict``), or one that names a module holding adapters
            (the message lists the model's module names).
    """
    chosen: dict[str, nn.Module] = {}
    skip: list[str] = []
    matched: set[str] = set()
    for name, module in model.named_modules():
        if not name or any(name.startswith(s + ".") for s in skip):
            continue
        hits = [t for t in modules_to_save if name == t or name.endswith("." + t)]
        if isinstance(module, (ModulesToSave, LoraLinear)):
            skip.append(name)
        if hits:
            inner = [n for n, m in module.named_modules() if isinstance(m, LoraLinear)]
            if inner:
                where = repr(name) if inner[0] == "" else f"{name + '.' + inner[0]!r}, inside {name!r},"
                raise ConfigError(f"modules_to_save {hits[0]!r}: {where} holds adapters: a module is either "
                                  "adapted or trained whole")
            matched.update(hits)
            chosen[name] = module
            skip.append(name)
    missing = [t for t in modules_to_save if t not in matched]
    if missing and strict:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n} - {""},
                        key=lambda x: (x.isdigit(), x))
        raise ConfigError(f"modules_to_save {missing[0]!r} matches no module; the model's modules are named "
                          f"{[x for x in leaves if not x.isdigit()]}")
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
        AdapterStateError: a selected layer has a merged adapter, or a DoRA adapter. ValueError: nothing matches.
            TypeError: a weight that is not floating point. On any of them the model is left unchanged.
    """
    chosen = match_modules(model, target_modules, exclude_modules)
    for name, module in chosen.items():
        if isinstance(module, LoraLinear) and module.merged:
            raise AdapterStateError(f"layer {name!r} has adapter {module.merged_adapter!r} merged: unmerge before "
                                    "quantising")
        if isinstance(module, LoraLinear) and len(module.lora_magnitude_vector):
            raise AdapterStateError(f"layer {name!r} holds DoRA adapter(s) {sorted(module.lora_magnitude_vector)}, "
                                    "which need a dense base weight: it is not quantised")
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
