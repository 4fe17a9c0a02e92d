"""Adapters to and from PEFT's files: :func:`export` (the one way an adapter becomes PEFT tensors and config),
:func:`save_adapter`, :func:`save_as_lora`, :func:`load_adapter` and :func:`hotswap_adapter`.

A directory written here loads with ``peft.PeftModel.from_pretrained``, and one written by PEFT loads with
:func:`load_adapter`. Keys are PEFT's with the adapter name stripped (:mod:`lispetorch.peft_format`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from .adapters import (
    AdapterPlan,
    ExpertsPlan,
    add_saved_modules,
    install,
    layers_holding,
    saved_modules,
    select_experts,
    set_adapter,
)
from .errors import AdapterFormatError, AdapterStateError, ConfigError, ShapeError, merged_error
from .experts import (
    LoraExperts,
    from_peft,
    parameter_targets,
    peft_module_names,
    peft_weight_names,
    to_peft,
    unnest,
    weight_shape,
)
from .hf import model_id, task_type, weight_out_in
from .layer import LoraLinear, base_of
from .peft_format import (
    CONFIG_NAME,
    MAGNITUDE,
    PREFIX,
    WEIGHTS_NAME,
    exact_targets,
    lora_config,
    module_ranks,
    parse_key,
    peft_key,
    read_config,
    read_weights,
    scaling,
    write_directory,
)
from .saved_modules import ModulesToSave
from .targets import adaptable_modules, layer_index, match_saved_modules, replace_module
from .validate import show


def _base_module_names(model: nn.Module) -> list[str]:
    """The module names of ``model`` as its base model has them: an adapter's own submodules left out."""
    adapted = [n + "." for n, m in model.named_modules() if isinstance(m, (LoraLinear, LoraExperts))]
    return [n for n, _ in model.named_modules() if not any(n.startswith(a) for a in adapted)]


def _targets_for(names: list[str], model: nn.Module) -> tuple[list[str] | str, list[int] | None]:
    """``(target_modules, layers_to_transform)`` for PEFT that select exactly the modules ``names`` among all the
    base model's modules, by PEFT's rule (a name equal to a leaf, or ending in ``.`` and one): their leaf names,
    with the layer indices where those leaves select more modules than these; else an exact regular expression and
    no layers. (A leaf name such as ``"0"`` for the layers of an ``nn.Sequential`` also names whole decoder layers,
    which PEFT would then try to adapt.)"""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n in _base_module_names(model) if n.rsplit(".", 1)[-1] in leaves}
    if selected == set(names):
        return leaves, None
    layers = {layer_index(n) for n in names}
    if None not in layers and {n for n in selected if layer_index(n) in layers} == set(names):
        return leaves, sorted(layers)
    return exact_targets(names), None


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
    tensors, ranks, alphas, dropouts, rslora, fan, dora = {}, {}, {}, {}, set(), set(), set()
    expert_weights = []
    for mod, layer in holding.items():
        settings = layer.settings[name]
        if isinstance(layer, LoraExperts):  # one wrapper per weight in PEFT, nested: see peft_module_names
            for p, key_mod in peft_module_names(mod, layer, layer.parameter_names).items():
                A, B = to_peft(layer.lora_A[name][p].detach(), layer.lora_B[name][p].detach())
                tensors[peft_key(key_mod, "lora_A")] = A.contiguous()
                tensors[peft_key(key_mod, "lora_B")] = B.contiguous()
                own = layer.weight_settings[name][p]
                ranks[f"{mod}.{p}"], alphas[f"{mod}.{p}"] = own.r, own.alpha
                expert_weights.append(f"{mod}.{p}")
            rslora.add(settings.use_rslora)
            continue
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
        dora.add(name in layer.lora_magnitude_vector)
        if name in layer.lora_magnitude_vector:  # the norm of W + s·B A is the same on the original weights
            tensors[peft_key(mod, MAGNITUDE)] = layer.lora_magnitude_vector[name].detach().contiguous()
        ranks[mod], alphas[mod], dropouts[mod] = r, alpha, settings.dropout
        rslora.add(settings.use_rslora)
        fan.add(layer.fan_in_fan_out)
    if len(rslora) > 1:
        raise AdapterStateError(f"adapter {name!r} mixes rsLoRA and plain scaling across layers, which one PEFT config "
                                "cannot hold")
    if len(fan) > 1:
        raise AdapterStateError(f"adapter {name!r} mixes Linear and Conv1D layers, which one PEFT config cannot hold")
    if len(dora) > 1:
        raise AdapterStateError(f"adapter {name!r} is DoRA on some layers and not on others, which one PEFT config "
                                "cannot hold")
    linear = [m for m, layer in holding.items() if not isinstance(layer, LoraExperts)]
    targets, layers = _targets_for(linear, model) if linear else ([], None)
    if expert_weights:
        # PEFT refuses a dropout on expert weights (it cannot factor it out of its merged delta); dropout shapes
        # training only, so the file says 0 and loads there.
        dropouts = dict.fromkeys(ranks, 0.0)  # every module and expert weight of the file
    config = lora_config(ranks, alphas, dropouts, rslora.pop(), fan == {True}, targets,
                         base_model=model_id(model) or None, task_type=task_type(model), use_dora=dora == {True})
    config["layers_to_transform"] = layers
    if expert_weights:
        config["target_parameters"] = parameter_targets(expert_weights, model)
    saved = saved_module_tensors(model, name)
    tensors.update({key: t.detach().contiguous() for key, t in saved.items()})
    config["modules_to_save"] = sorted(m for m, w in saved_modules(model).items() if name in w.modules_to_save) or None
    return tensors, config


def saved_module_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``adapter_name``'s copies of the modules trained whole, under PEFT's file keys
    (``base_model.model.<module>.<tensor>``, e.g. ``base_model.model.lm_head.weight``): the live parameters."""
    out = {}
    for mod, wrapper in saved_modules(model).items():
        if adapter_name in wrapper.modules_to_save:
            for key, t in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{mod}.{key}"] = t
    return out


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
    saved, states = _saved_states(model, directory, config, weights)
    experts, expert_plans = _expert_plans(model, directory, config, weights)
    chosen, plans = _plans(model, directory, config, weights) if weights or not experts else ({}, {})
    layers = install(model, chosen, plans, adapter_name, replace=True, experts=experts, expert_plans=expert_plans)
    for name, wrapper in saved_modules(model).items():  # copies of this name the new adapter does not have
        if adapter_name in wrapper.modules_to_save and name not in saved:
            wrapper.delete_copy(adapter_name)
            if not wrapper.modules_to_save:
                replace_module(model, name, wrapper.original_module)
    if saved:
        add_saved_modules(model, saved, adapter_name, states)
        set_adapter(model, adapter_name)
    if not trainable:
        for layer in layers.values():
            layer.set_trainable(adapter_name, False)
        for wrapper in saved_modules(model).values():
            if adapter_name in wrapper.modules_to_save:
                wrapper.set_trainable(adapter_name, False)
    return layers


def _saved_states(model: nn.Module, directory: Path, config: dict, weights: dict[str, torch.Tensor]):
    """The modules the adapter trains whole (``modules_to_save``) and their tensors, each checked against the
    model; their keys are taken out of ``weights``."""
    names = config.get("modules_to_save")
    if not names:
        return {}, {}
    path = directory / CONFIG_NAME
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise AdapterFormatError(f"{path}: modules_to_save must be a list of module names, got {names!r}")
    try:
        saved = match_saved_modules(model, names, strict=False)  # the tensors say which are there
    except ConfigError as e:
        raise AdapterFormatError(f"{path}: {e}") from None
    wpath = directory / WEIGHTS_NAME
    states = {}
    for name, module in saved.items():
        original = module.original_module if isinstance(module, ModulesToSave) else module
        expected = original.state_dict()
        prefix = f"{PREFIX}{name}."
        state = {key[len(prefix):]: weights.pop(key) for key in [k for k in weights if k.startswith(prefix)]}
        if set(state) != set(expected):
            missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise AdapterFormatError(f"{wpath}: module {name!r} (modules_to_save) needs tensors {sorted(expected)}"
                                     f"; missing {missing}, unexpected {extra}")
        for key, t in state.items():
            if t.shape != expected[key].shape:
                raise ShapeError(f"{wpath}: {prefix}{key} has shape {tuple(t.shape)} but the model needs "
                                 f"{tuple(expected[key].shape)}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise AdapterFormatError(f"{wpath}: key {prefix}{key} holds non-finite values")
        states[name] = state
    return saved, states


def _expert_plans(model: nn.Module, directory: Path, config: dict, weights: dict[str, torch.Tensor]):
    """The experts modules and plans of the expert weights a PEFT adapter adapts (its ``target_parameters``), each
    tensor checked against the model (expert count, shapes); their keys are taken out of ``weights``."""
    targets = config.get("target_parameters")
    if not targets:
        return {}, {}
    cpath, wpath = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise AdapterFormatError(f"{cpath}: target_parameters must be a list of parameter names, got {targets!r}")
    try:
        selected = select_experts(model, targets)  # an adapter of the same name is replaced
    except ConfigError as e:
        raise AdapterFormatError(f"{cpath}: {e}") from None
    matched = {mod: params for mod, (_, params) in selected.items()}
    keyed = peft_weight_names(model, matched)  # PEFT module name -> (experts module, weight)
    found: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key in list(weights):
        parsed = parse_key(key)
        if parsed is None or parsed[0] not in keyed and unnest(parsed[0])[0] not in matched:
            continue
        if parsed[0] not in keyed:
            raise AdapterFormatError(f"{wpath}: key {show(key)} names {show(parsed[0])}, but {CONFIG_NAME}'s "
                                     f"target_parameters {targets!r} adapt {len(matched[unnest(parsed[0])[0]])} "
                                     f"weight(s) of {unnest(parsed[0])[0]!r}")
        mod, p = keyed[parsed[0]]
        if parsed[1] == MAGNITUDE:
            raise AdapterFormatError(f"{wpath}: key {show(key)} is a DoRA magnitude on expert weights, which DoRA "
                                     "does not cover")
        found.setdefault(mod, {}).setdefault(p, {})[parsed[1]] = weights.pop(key)
    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    key_of = {where: key_mod for key_mod, where in keyed.items()}  # (experts module, weight) -> PEFT module name
    experts, plans = {}, {}
    for mod, per_weight in found.items():
        module, params = selected[mod]
        if isinstance(module, LoraExperts) and module.merged_adapter is not None:
            raise merged_error(module.merged_adapter, mod, "unmerge before loading")
        owner = module.base_layer if isinstance(module, LoraExperts) else module
        factors, alphas = {}, {}
        for p in params:
            pair = per_weight.get(p, {})
            key_mod = key_of[(mod, p)]
            if set(pair) != {"lora_A", "lora_B"}:
                missing = sorted({"lora_A", "lora_B"} - set(pair))
                raise AdapterFormatError(f"{wpath}: expert weight {mod}.{p} lacks {peft_key(key_mod, missing[0])}")
            A, B = pair["lora_A"], pair["lora_B"]
            w = getattr(owner, p)
            E, out_f, in_f = weight_shape(owner, p)
            for k, t in (("lora_A", A), ("lora_B", B)):
                if not torch.is_floating_point(t) or not torch.isfinite(t).all():
                    raise AdapterFormatError(f"{wpath}: key {peft_key(key_mod, k)} holds non-finite or non-float "
                                             "values")
            rank_cfg, alpha = module_ranks(config, f"{mod}.{p}", -1)
            if rank_cfg < 1 or A.shape != (rank_cfg * E, in_f):
                raise ShapeError(f"{wpath}: {peft_key(key_mod, 'lora_A')} has shape {tuple(A.shape)} but {mod}.{p} "
                                 f"({E} experts of {out_f}×{in_f}, rank {rank_cfg} from {CONFIG_NAME}) needs "
                                 f"({rank_cfg}·{E}, {in_f}) = ({rank_cfg * E}, {in_f})")
            if B.shape != (out_f, rank_cfg * E):
                raise ShapeError(f"{wpath}: {peft_key(key_mod, 'lora_B')} has shape {tuple(B.shape)} but {mod}.{p} "
                                 f"({E} experts of {out_f}×{in_f}, rank {rank_cfg}) needs ({out_f}, {rank_cfg * E})")
            A3, B3 = from_peft(A.to(w.dtype).to(w.device), B.to(w.dtype).to(w.device), E)
            factors[p] = (A3.contiguous(), B3.contiguous())
            alphas[p] = alpha
        experts[mod] = (module, params)
        plans[mod] = ExpertsPlan(factors, alphas[params[0]], dropout, use_rslora, alphas=alphas)
    return experts, plans


def _plans(model: nn.Module, directory: Path, config: dict, weights: dict[str, torch.Tensor]):
    """The modules and the plans a PEFT adapter's tensors make, every tensor checked against the model."""
    wpath = directory / WEIGHTS_NAME
    adaptable = adaptable_modules(model)  # by name: plain layers, or the adapters already wrapping them
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        parsed = parse_key(key)
        if parsed is None:
            raise AdapterFormatError(f"{wpath}: unsupported key {show(key)} (only lora_A / lora_B weights and DoRA "
                                     "magnitudes are read)")
        name, which = parsed
        if name not in adaptable:
            raise AdapterFormatError(f"{wpath}: key {show(key)} names module {show(name)}, which the model has no "
                                     "adaptable layer for")
        if not torch.is_floating_point(tensor) or not torch.isfinite(tensor).all():
            raise AdapterFormatError(f"{wpath}: key {show(key)} holds non-finite or non-float values")
        pair = found.setdefault(name, {})
        if which in pair:
            raise AdapterFormatError(f"{wpath}: two keys hold the {which} of module {show(name)} (with and without an "
                                     f"adapter name or prefix); {show(key)} is one of them")
        pair[which] = tensor
    if not found:
        raise AdapterFormatError(f"{wpath}: holds no LoRA weights")
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    use_rslora = bool(config.get("use_rslora", False))
    use_dora = bool(config.get("use_dora", False))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    chosen, plans = {}, {}
    for name, pair in found.items():
        magnitude = pair.pop(MAGNITUDE, None)
        if set(pair) != {"lora_A", "lora_B"}:
            missing = {"lora_A", "lora_B"} - set(pair)
            raise AdapterFormatError(f"{wpath}: module {show(name)} lacks {missing.pop()}")
        if use_dora and magnitude is None:
            raise AdapterFormatError(f"{wpath}: {CONFIG_NAME} says use_dora but module {show(name)} has no "
                                     f"{peft_key(name, MAGNITUDE)}")
        if magnitude is not None and not use_dora:
            raise AdapterFormatError(f"{wpath}: {peft_key(name, MAGNITUDE)} is a DoRA magnitude but {CONFIG_NAME} "
                                     "does not say use_dora")
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
        if magnitude is not None and tuple(magnitude.shape) != (out_f,):
            raise ShapeError(f"{wpath}: {peft_key(name, MAGNITUDE)} has shape {tuple(magnitude.shape)} but module "
                             f"{show(name)} (weight {out_f}×{in_f}) needs ({out_f},)")
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
                                  use_rslora, use_dora=use_dora,
                                  magnitude=None if magnitude is None else magnitude.to(w.dtype).to(w.device))
    return chosen, plans


# --- hotswap -------------------------------------------------------------------------------------------------------
def _hotswap_experts(model: nn.Module, directory: Path, config: dict, weights: dict[str, torch.Tensor], name: str,
                     layers: dict[str, LoraExperts]) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """The new factors of adapter ``name``'s expert weights from a PEFT directory, ``{(module, weight): (A, B)}``,
    padded to the adapter's ranks with the file's scaling folded into B; their keys are taken out of
    ``weights``. Everything is checked (the same modules and weights, the expert counts, ranks no larger)."""
    _, plans = _expert_plans(model, directory, config, weights)
    if set(plans) != set(layers):
        raise AdapterFormatError(f"{directory / WEIGHTS_NAME}: adapts the expert weights of {sorted(plans)[:3]}, "
                                 f"adapter {name!r} those of {sorted(layers)[:3]}")
    use_rslora = bool(config.get("use_rslora", False))
    out = {}
    for mod, layer in layers.items():
        plan = plans[mod]
        for p in layer.parameter_names:
            A_new, B_new = plan.factors[p]
            A, B = layer.lora_A[name][p], layer.lora_B[name][p]
            r, r_new = A.shape[1], A_new.shape[1]
            if r_new > r:
                raise AdapterFormatError(f"{directory / WEIGHTS_NAME}: {mod}.{p} has rank {r_new}, more than the "
                                         f"adapter's {r} (hotswap needs a rank no larger than the one compiled)")
            own = layer.weight_settings[name][p]
            factor = scaling(plan.alphas[p], r_new, use_rslora) / own.scaling
            A_pad, B_pad = torch.zeros_like(A), torch.zeros_like(B)
            A_pad[:, :r_new] = A_new.to(A.dtype)
            B_pad[:, :, :r_new] = (B_new.double() * factor).to(B.dtype)
            out[(mod, p)] = (A_pad, B_pad)
    return out



@torch.no_grad()
def hotswap_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Replaces the weights of adapter ``adapter_name`` (the active one when None) by those of a PEFT adapter
    directory, in place: the same parameter objects take the new values, so a compiled model
    (``torch.compile``) runs the new adapter without recompiling.

    The directory must adapt the same modules (and expert weights), each with a rank no larger than the adapter's
    (a smaller one is padded with zeros, which adds nothing); its scaling (alpha / r, or rsLoRA's) is folded into
    B, since the compiled graph holds the adapter's own; the dropout stays the adapter's. Modules trained whole
    (``modules_to_save``) must be the same too.

    Raises:
        AdapterFormatError: a missing or malformed file, other modules than the adapter's, a rank larger than the
            compiled one (each named). AdapterStateError: no such adapter, or it is merged. ShapeError: a tensor
            that does not fit. On any of them no weight has changed.
    """
    name, holding = layers_holding(model, adapter_name)
    merged = [n for n, layer in holding.items() if layer.merged_adapter == name]
    if merged:
        raise merged_error(name, merged[0], "unmerge before hotswapping")
    expert_layers = {n: layer for n, layer in holding.items() if isinstance(layer, LoraExperts)}
    holding = {n: layer for n, layer in holding.items() if n not in expert_layers}
    directory = Path(directory)
    config = read_config(directory)
    weights = read_weights(directory)
    wpath = directory / WEIGHTS_NAME
    saved, states = _saved_states(model, directory, config, weights)
    new_experts = _hotswap_experts(model, directory, config, weights, name, expert_layers)
    have = {n for n, w in saved_modules(model).items() if name in w.modules_to_save}
    if set(saved) != have:
        raise AdapterFormatError(f"{directory / CONFIG_NAME}: modules_to_save {sorted(saved)} differ from the "
                                 f"adapter's {sorted(have)}")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        parsed = parse_key(key)
        if parsed is None:
            raise AdapterFormatError(f"{wpath}: unsupported key {key!r} (only lora_A / lora_B weights and DoRA "
                                     "magnitudes are read)")
        found.setdefault(parsed[0], {})[parsed[1]] = tensor
    if set(found) != set(holding):
        raise AdapterFormatError(f"{wpath}: adapts {len(found)} modules, adapter {name!r} {len(holding)}; only in "
                                 f"the file: {sorted(set(found) - set(holding))[:5]}, only in the model: "
                                 f"{sorted(set(holding) - set(found))[:5]}")
    use_rslora = bool(config.get("use_rslora", False))
    new: dict[str, tuple[torch.Tensor, ...]] = {}
    for mod, layer in holding.items():
        pair = dict(found[mod])
        magnitude = pair.pop(MAGNITUDE, None)
        if (magnitude is not None) != (name in layer.lora_magnitude_vector):
            raise AdapterFormatError(f"{wpath}: {mod!r} is {'' if magnitude is not None else 'not '}DoRA in the file "
                                     f"and {'' if name in layer.lora_magnitude_vector else 'not '}in adapter {name!r}")
        if magnitude is not None and (tuple(magnitude.shape) != (layer.out_features,)
                                      or not torch.isfinite(magnitude).all()):
            raise ShapeError(f"{wpath}: {peft_key(mod, MAGNITUDE)} has shape {tuple(magnitude.shape)} (or non-finite "
                             f"values); the layer needs ({layer.out_features},), finite")
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterFormatError(f"{wpath}: module {mod!r} lacks {({'lora_A', 'lora_B'} - set(pair)).pop()}")
        A_new, B_new = pair["lora_A"], pair["lora_B"]
        A, B, R = layer.factors(name)
        if R is not None or name in layer.lora_R_fn or name in layer.base_offset:
            raise AdapterStateError(f"adapter {name!r} on {mod!r} has an r×r core or an SVD init's residual base: "
                                    "only a plain LoRA is hotswapped")
        r, r_new = A.shape[0], A_new.shape[0] if A_new.dim() == 2 else -1
        if A_new.dim() != 2 or A_new.shape[1] != layer.in_features or B_new.shape != (layer.out_features, r_new):
            raise ShapeError(f"{wpath}: {mod!r} has lora_A {tuple(A_new.shape)} and lora_B {tuple(B_new.shape)}; "
                             f"the layer needs (r, {layer.in_features}) and ({layer.out_features}, r)")
        if r_new > r:
            raise AdapterFormatError(f"{wpath}: {mod!r} has rank {r_new}, more than the adapter's {r} (hotswap "
                                     "needs a rank no larger than the one compiled)")
        if not torch.isfinite(A_new).all() or not torch.isfinite(B_new).all():
            raise AdapterFormatError(f"{wpath}: {mod!r} holds non-finite values")
        rank_cfg, alpha = module_ranks(config, mod, r_new)
        if rank_cfg != r_new:
            raise AdapterFormatError(f"{wpath}: {mod!r} has rank {r_new} but {CONFIG_NAME} says {rank_cfg}")
        factor = scaling(alpha, r_new, use_rslora) / layer.settings[name].scaling
        A_pad = torch.zeros_like(A)
        B_pad = torch.zeros_like(B)
        A_pad[:r_new] = A_new.to(A.dtype)
        B_pad[:, :r_new] = (B_new.double() * factor).to(B.dtype)
        new[mod] = (A_pad, B_pad) if magnitude is None else (A_pad, B_pad, magnitude)
    for (mod, p), (A_new, B_new) in new_experts.items():  # everything checked: now the weights change
        expert_layers[mod].lora_A[name][p].copy_(A_new)
        expert_layers[mod].lora_B[name][p].copy_(B_new)
    for mod, (A_new, B_new, *m_new) in new.items():
        A, B, _ = holding[mod].factors(name)
        A.copy_(A_new)
        B.copy_(B_new)
        if m_new:  # the norm of W + s·B A is unchanged by the padding and the folded scaling
            holding[mod].lora_magnitude_vector[name].copy_(m_new[0])
    for mod, state in states.items():
        copy = saved_modules(model)[mod].modules_to_save[name]
        for key, t in copy.state_dict(keep_vars=True).items():
            t.copy_(state[key])
