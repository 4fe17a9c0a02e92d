"""Adapters in a whole model: install them (the one path every method and loader takes), find, switch, enable,
merge and delete them, count their memory."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import AdapterStateError, ConfigError, merged_error
from .experts import LoraExperts, adaptable_expert_weights, match_parameters
from .hf import weight_out_in
from .layer import LoraLinear, base_of
from .nf4 import NF4Linear
from .peft_format import pattern_value
from .saved_modules import ModulesToSave
from .targets import adopt_bitsandbytes, match_modules, match_saved_modules, replace_module


# --- installing ------------------------------------------------------------------------------------------------
@dataclass
class AdapterPlan:
    """The factors and settings of one adapter on one layer, computed before the model changes.

    ``offset``: the base becomes ``W − s·B R A`` (from the factors as installed), as SVD inits need.
    ``use_dora``: a DoRA magnitude, ``magnitude`` ``(out,)`` when given (a loaded adapter), else the row norms of
    the adapted weight as installed (so the layer starts as it was).
    """

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    R: torch.Tensor | None = None  # (r, r)
    R_fn: nn.Module | None = None  # returns R (r, r) at every forward
    frozen: tuple[str, ...] = ()
    offset: bool = False
    use_dora: bool = False
    magnitude: torch.Tensor | None = None  # (out,)


@dataclass
class ExpertsPlan:
    """The factors and settings of one adapter on one experts module: ``factors`` maps each adapted expert weight
    to ``(A (E, r, in), B (E, out, r))``."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    alphas: dict[str, float] | None = None  # by weight, where it differs from alpha


AdapterLayer = LoraLinear | LoraExperts  # what holds adapters: a linear layer, or an experts module's weights


def select_experts(model: nn.Module, target_parameters: list[str] | None,
                   adapter_name: str | None = None) -> dict[str, tuple[nn.Module, tuple[str, ...]]]:
    """The experts modules and weights ``target_parameters`` selects (``{}`` for None), as ``{module name:
    (module, weight names)}``.

    Raises:
        ConfigError: a target that matches no expert weight (the message lists the candidates), or weights other
            than those an earlier adapter adapts on the same experts (one set per module, as in PEFT).
        AdapterStateError: a selected module already holds an adapter named ``adapter_name`` (when given).
    """
    if not target_parameters:
        return {}
    chosen: dict[str, tuple[nn.Module, tuple[str, ...]]] = {}
    for name, params in match_parameters(model, target_parameters).items():
        module = model.get_submodule(name)
        if isinstance(module, LoraExperts):
            if module.parameter_names != params:
                raise ConfigError(f"target_parameters {target_parameters!r} selects {list(params)} on {name!r}, "
                                  f"whose adapters {list(module.lora_A)} adapt {list(module.parameter_names)}: every "
                                  "adapter of an experts module adapts the same weights")
            if adapter_name is not None and adapter_name in module.lora_A:
                raise AdapterStateError(f"adapter {adapter_name!r} is already injected into {name!r}; use another "
                                        "adapter name, or delete_adapter first")
        chosen[name] = (module, params)
    return chosen


def select_for_new_adapter(model: nn.Module, config, adapter_name: str) -> dict[str, nn.Module]:
    """The modules ``config`` targets; an error if any of them already holds an adapter named ``adapter_name``.
    ``target_modules=[]`` (with ``target_parameters``, see :func:`select_experts`) selects none."""
    if isinstance(config.target_modules, list) and not config.target_modules:
        return {}
    if config.target_modules == "all-linear" and not getattr(config, "target_parameters", None):
        experts = {k: v for k, v in adaptable_expert_weights(model).items() if model.get_parameter(k).dim() == 3}
        if experts:
            names = sorted({k.rsplit(".", 1)[-1] for k in experts})
            warnings.warn(f"all-linear adapts linear layers; the model's {len(experts)} fused expert weights ({names}"
                          f", e.g. {sorted(experts)[0]!r}) are adapted when target_parameters names them "
                          f"(target_parameters={names})", stacklevel=3)
    chosen = match_modules(model, config.target_modules, config.exclude_modules,
                           getattr(config, "layers_to_transform", None), getattr(config, "layers_pattern", None))
    for field in ("rank_pattern", "alpha_pattern"):
        for key, value in (getattr(config, field, None) or {}).items():
            if not any(pattern_value({key: value}, n, None) is not None for n in chosen):
                leaves = sorted({n.rsplit(".", 1)[-1] for n in chosen})
                raise ConfigError(f"{field} key {key!r} matches none of the {len(chosen)} targeted modules (named "
                                  f"{leaves}, e.g. {sorted(chosen)[0]!r})")
    saved_names = getattr(config, "modules_to_save", None)
    if saved_names:
        saved = match_saved_modules(model, saved_names)
        inside = [n for n in chosen if any(n == s or n.startswith(s + ".") for s in saved)]
        if inside and config.target_modules == "all-linear":  # as PEFT: what is trained whole is not adapted
            chosen = {n: m for n, m in chosen.items() if n not in inside}
        elif inside:
            raise ConfigError(f"modules_to_save {saved_names!r} and target_modules {config.target_modules!r} both "
                              f"select {inside[0]!r}: a module is either adapted or trained whole")
        if not chosen:
            raise ConfigError(f"target_modules {config.target_modules!r} selects only modules in modules_to_save "
                              f"{saved_names!r}")
    twice = [n for n, m in chosen.items() if isinstance(m, LoraLinear) and adapter_name in m.lora_A]
    if twice:
        raise AdapterStateError(
            f"adapter {adapter_name!r} is already injected into {len(twice)} of the targeted layers (e.g. "
            f"{twice[0]!r}); use another adapter name, or delete_adapter first"
        )
    return adopt_bitsandbytes(model, chosen)  # last: every check above leaves the model as it was


def base_weight(module: nn.Module) -> torch.Tensor:
    """The frozen weight under ``module`` (adapted or not) as ``(out, in)``."""
    return weight_out_in(base_of(module))


def check_layers(chosen: dict[str, nn.Module], r: int, what: str, rank_factor: int = 1,
                 changes_base: bool = True) -> None:
    """Checks, before anything changes, that a method whose factors come from the weights (an SVD) fits the
    chosen layers: a floating-point, unmerged, unquantised (where the base changes) weight of at least
    ``rank_factor · r`` rows and columns.

    Raises:
        AdapterStateError: a merged layer, or a quantised base the method would change. TypeError: an integer
            weight. ValueError: a rank that does not fit (names the layer and its shape).
    """
    for name, module in chosen.items():
        layer = base_of(module)
        if changes_base and isinstance(layer, NF4Linear):
            raise AdapterStateError(f"{what} changes the base weight, but {name!r} is quantised: inject it first, "
                                    "then quantize_nf4 (the residual is what gets quantised)")
        w = weight_out_in(layer)
        if not w.is_floating_point():
            raise TypeError(f"{what} needs a floating-point weight, but {name!r} holds {w.dtype}")
        if isinstance(module, LoraLinear) and module.merged:
            raise merged_error(module.merged_adapter, name, f"unmerge before {what}")
        if rank_factor * r > min(w.shape):
            need = f"{rank_factor}·r = {rank_factor * r}" if rank_factor > 1 else f"r = {r}"
            raise ConfigError(f"{what}: {need} exceeds min(out, in) = {min(w.shape)} of {name!r} "
                              f"(weight {tuple(w.shape)})")


def install(model: nn.Module, chosen: dict[str, nn.Module], plans: dict[str, AdapterPlan], adapter_name: str,
            replace: bool = False, experts: dict[str, tuple[nn.Module, tuple[str, ...]]] | None = None,
            expert_plans: dict[str, ExpertsPlan] | None = None) -> dict[str, AdapterLayer]:
    """Changes the model: wraps the chosen layers, installs each plan's factors as adapter ``adapter_name``,
    takes the base offsets out, freezes everything else and activates the adapter. Every method and every
    loader ends here; call it only once every plan is computed and checked.

    Args:
        chosen (dict[str, nn.Module]): the layers by module name (plain or already adapted).
        plans (dict[str, AdapterPlan]): a plan for each of them.
        replace (bool): an adapter of that name already in the model is replaced, and removed from the layers
            not chosen. Default False.
        experts (dict | None): experts modules and the weights to adapt on them (:func:`select_experts`), with a
            plan for each in ``expert_plans``.

    Returns:
        dict[str, LoraLinear | LoraExperts]: the layers holding the adapter, by module name.
    """
    experts, expert_plans = experts or {}, expert_plans or {}
    for name, module in chosen.items():
        if plans[name].use_dora and isinstance(base_of(module), NF4Linear):
            raise AdapterStateError(f"{name!r}: a DoRA adapter needs a dense base weight, and this layer's is NF4 "
                                    f"({base_of(module).out_features}×{base_of(module).in_features}); the model "
                                    "is unchanged")
    if replace:
        for name, layer in adapter_layers(model).items():
            if adapter_name in layer.lora_A and name not in chosen and name not in experts:
                layer.delete_adapter(adapter_name)
                if not layer.lora_A and isinstance(layer, LoraExperts):
                    replace_module(model, name, layer.base_layer)
    freeze_all_but_adapters(model)
    layers: dict[str, AdapterLayer] = {}
    for name, (module, params) in experts.items():
        plan = expert_plans[name]
        wrapper = module if isinstance(module, LoraExperts) else LoraExperts(module, params)
        if replace and adapter_name in wrapper.lora_A:
            wrapper.delete_adapter(adapter_name)
        wrapper.set_factors(adapter_name, plan.factors, plan.alpha, plan.dropout, plan.use_rslora, plan.alphas)
        if wrapper is not module:
            replace_module(model, name, wrapper)
        layers[name] = wrapper
    for name, module in chosen.items():
        plan = plans[name]
        layer = module if isinstance(module, LoraLinear) else LoraLinear(module)
        if replace and adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)
        layer.set_factors(adapter_name, plan.A, plan.B, alpha=plan.alpha, dropout=plan.dropout,
                          use_rslora=plan.use_rslora, R=plan.R, R_fn=plan.R_fn, frozen=plan.frozen)
        if plan.offset:
            layer.set_base_offset(adapter_name)
        if plan.use_dora:
            layer.set_magnitude(adapter_name, plan.magnitude)
        if layer is not module:
            replace_module(model, name, layer)
        layers[name] = layer
    set_adapter(model, adapter_name)
    accept_adapter_names(model)
    return layers


def freeze_all_but_adapters(model: nn.Module) -> None:
    """Freezes every parameter of ``model`` outside the adapters' factor containers (which :func:`set_adapter`
    sets), so that the cost does not grow with the number of adapters loaded."""
    factors = {id(d) for layer in adapter_layers(model).values() for d in layer.factor_containers()}
    for module in model.modules():
        if id(module) not in factors:
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)


def add_saved_modules(model: nn.Module, chosen: dict[str, nn.Module], adapter_name: str,
                      states: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, ModulesToSave]:
    """Gives each module of ``chosen`` (from :func:`~lispetorch.targets.match_saved_modules`) a trainable copy for
    adapter ``adapter_name``, wrapping it in a :class:`~lispetorch.saved_modules.ModulesToSave` first if needed;
    ``states``: the copies' tensors by module name (checked by the caller), else copies of the originals.
    Call :func:`set_adapter` after, to activate and train them."""
    wrappers = {}
    for name, module in chosen.items():
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        wrapper.add_copy(adapter_name, None if states is None else states[name])
        if wrapper is not module:
            replace_module(model, name, wrapper)
        wrappers[name] = wrapper
    return wrappers


# --- finding ---------------------------------------------------------------------------------------------------
def saved_modules(model: nn.Module) -> dict[str, ModulesToSave]:
    """The modules trained whole (``modules_to_save``) by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSave)}


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """The adapted layers of ``model`` by module name: :class:`~lispetorch.LoraLinear` layers and
    :class:`~lispetorch.experts.LoraExperts` experts modules."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoraLinear, LoraExperts))}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present in ``model``, in order of first appearance."""
    names: dict[str, None] = {}
    for layer in adapter_layers(model).values():
        names.update(dict.fromkeys(layer.lora_A.keys()))
    return list(names)


def layers_or_raise(model: nn.Module) -> dict[str, AdapterLayer]:
    """:func:`adapter_layers`, or an :class:`~lispetorch.AdapterStateError` when there are none."""
    layers = adapter_layers(model)
    if not layers:
        raise AdapterStateError("the model has no adapters: call lispetorch.inject or load_adapter first")
    return layers


def layers_holding(model: nn.Module, adapter_name: str | None = None) -> tuple[str, dict[str, AdapterLayer]]:
    """``(name, layers)``: the adapter ``adapter_name`` (the active one when None) and the layers holding it.

    Raises:
        AdapterStateError: no such adapter (the message lists those present).
    """
    layers = layers_or_raise(model)
    name = adapter_name if adapter_name is not None else active_adapter(model)
    holding = {n: layer for n, layer in layers.items() if name in layer.lora_A}
    if not holding:
        raise AdapterStateError(f"no adapter named {name!r} in the model; it has {adapter_names(model)}")
    return name, holding


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name (None without adapters)."""
    for layer in adapter_layers(model).values():
        if layer.active_adapter is not None:
            return layer.active_adapter
    return None


# --- switching, deleting -----------------------------------------------------------------------------------------
def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Makes ``adapter_name`` the active adapter; only its factors train.

    Raises:
        AdapterStateError: no layer holds that adapter (the message lists the adapters present), or another
            adapter is merged.
    """
    layers = layers_or_raise(model)
    if not any(adapter_name in layer.lora_A for layer in layers.values()):
        raise AdapterStateError(f"no adapter named {adapter_name!r}; the model has {adapter_names(model)}")
    merged = {layer.merged_adapter for layer in layers.values()} - {None, adapter_name}
    if merged:
        raise merged_error(sorted(merged)[0], then="unmerge before switching adapters")
    for layer in layers.values():
        layer.active_adapter = adapter_name if adapter_name in layer.lora_A else None
        for name in layer.training_adapters():  # only those that train need turning off
            if name != adapter_name:
                layer.set_trainable(name, False)
        if adapter_name in layer.lora_A:
            layer.set_trainable(adapter_name, True)
    for wrapper in saved_modules(model).values():
        wrapper.active_adapter = adapter_name if adapter_name in wrapper.modules_to_save else None
        for name in wrapper.modules_to_save:
            wrapper.set_trainable(name, name == adapter_name)


def set_trainable_adapters(model: nn.Module, adapter_names: list[str]) -> None:
    """Makes the adapters ``adapter_names`` train together (their factors that are not frozen), and every other
    adapter frozen: for a mixed-adapter batch that trains several adapters at once, each from its own samples.

    Raises:
        AdapterStateError: a name no layer holds (the message lists the adapters present).
    """
    layers = layers_or_raise(model)
    known = adapter_names_of(layers)
    unknown = [n for n in adapter_names if n not in known]
    if unknown:
        raise AdapterStateError(f"no adapter named {unknown[0]!r}; the model has {sorted(known)}")
    for layer in layers.values():
        for name in layer.lora_A:
            layer.set_trainable(name, name in adapter_names)


def adapter_names_of(layers: dict[str, AdapterLayer]) -> set[str]:
    return {n for layer in layers.values() for n in layer.lora_A}


# --- mixed-adapter batches ---------------------------------------------------------------------------------------
BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
_BATCH_LAYERS = "_lispetorch_batch_layers"  # on the model: the layers a mixed batch named, for its forward hook


def _take_adapter_names(model: nn.Module, args, kwargs):
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return args, kwargs
    layers = adapter_layers(model)
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or \
            not all(isinstance(n, str) for n in names):
        raise ConfigError(f"adapter_names must be a list of adapter names (one per sample, {BASE!r} for none), got "
                          f"{names!r}")
    known = adapter_names_of(layers)
    for n in names:
        if n != BASE and n not in known:
            raise ConfigError(f"adapter_names names {n!r}, which is not loaded; the model has {sorted(known)}")
    first = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
    if isinstance(first, torch.Tensor) and first.dim() >= 1 and first.shape[0] != len(names):
        raise ConfigError(f"adapter_names has {len(names)} names for a batch of {first.shape[0]} samples")
    per_sample = tuple(None if n == BASE else n for n in names)
    for layer in layers.values():
        layer.batch_adapters = per_sample
    model.__dict__[_BATCH_LAYERS] = list(layers.values())  # what the forward hook resets, without a walk
    return args, kwargs



def _forget_adapter_names(model: nn.Module, args, kwargs, output):
    for layer in model.__dict__.pop(_BATCH_LAYERS, ()):
        layer.batch_adapters = None


def accept_adapter_names(model: nn.Module) -> None:
    """Lets ``model(..., adapter_names=[...])`` (PEFT's keyword) run each sample through its own adapter
    (``"__base__"``: none) in one forward, which trains too: the names are checked before any compute (length,
    loaded adapters) and hold for that one forward. Called by every injection and load; idempotent."""
    if getattr(model, "_lispetorch_adapter_names", False):
        return
    model.register_forward_pre_hook(_take_adapter_names, with_kwargs=True)
    model.register_forward_hook(_forget_adapter_names, with_kwargs=True, always_call=True)
    model._lispetorch_adapter_names = True


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Removes ``adapter_name`` from every layer; layers left without adapters get their base layer back."""
    layers = layers_or_raise(model)
    if not any(adapter_name in layer.lora_A for layer in layers.values()):
        raise AdapterStateError(f"no adapter named {adapter_name!r}; the model has {adapter_names(model)}")
    for name, layer in layers.items():
        if adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)
            if not layer.lora_A:
                replace_module(model, name, layer.base_layer)
    for name, wrapper in saved_modules(model).items():
        if adapter_name in wrapper.modules_to_save:
            wrapper.delete_copy(adapter_name)
            if not wrapper.modules_to_save:
                replace_module(model, name, wrapper.original_module)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train: after :func:`~lispetorch.inject`, the active adapter's factors and nothing else."""
    return [p for p in model.parameters() if p.requires_grad]


# --- merging, enabling -----------------------------------------------------------------------------------------
def merge(model: nn.Module, safe: bool = True) -> None:
    """Folds the active adapter into the base weights (idempotent). ``safe`` refuses NaN/Inf results.

    Unmerge is exact: each merged layer keeps 1 byte per weight element (plus rare exceptions) until then.
    If a layer's merge fails, the layers merged before it are unmerged again, so the model is unchanged.
    """
    done = []
    try:
        for layer in layers_or_raise(model).values():
            if not layer.merged:
                layer.merge(safe=safe)
                done.append(layer)
    except BaseException:
        for layer in reversed(done):
            layer.unmerge()
        raise


def unmerge(model: nn.Module) -> None:
    """Gives back the pre-merge base weights bit for bit (idempotent)."""
    for layer in layers_or_raise(model).values():
        layer.unmerge()
        layer.merged_when_disabled = None  # unmerged on purpose: enabling does not merge it back


def is_merged(model: nn.Module) -> bool:
    """True when an adapter is merged into any layer."""
    return any(layer.merged for layer in adapter_layers(model).values())


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Turns the adapters on or off (off: the base model's outputs), as PEFT's ``enable_adapter_layers`` /
    ``disable_adapter_layers`` do.

    On a merged model, disabling unmerges each merged layer exactly (the base weights come back bit for bit) and
    enabling merges it back (the same merged weights, bit for bit); on an unmerged model no weight changes.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    layers = layers_or_raise(model)
    done = []
    try:
        for layer in layers.values():
            before = (layer.enabled, getattr(layer, "merged_when_disabled", None))
            set_layer_enabled(layer, enabled)
            done.append((layer, before))
    except BaseException:
        for layer, (was_enabled, _) in reversed(done):
            set_layer_enabled(layer, was_enabled)
        raise
    for wrapper in saved_modules(model).values():
        wrapper.enabled = enabled


def set_dora_recompute(model: nn.Module, recompute: bool = True) -> None:
    """DoRA's memory against its time, for every adapted layer of ``model``: the magnitude's gradient needs each
    layer's pre-scaling output ``z = x Wᵀ + s·hr Bᵀ``. By default (``recompute=False``) it is read off the layer's
    output, which autograd keeps; with ``recompute=True`` nothing is kept beyond what LoRA keeps and backward
    computes ``x Wᵀ`` again, a product as large as the base layer's forward (see
    :func:`lispetorch.ops.dora_linear`'s ``keep_output``). The gradients are the same up to rounding; plain LoRA
    adapters are unaffected.

    Raises:
        TypeError: ``recompute`` not a bool. AdapterStateError: a model without adapters.
    """
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool, got {recompute!r}")
    for layer in layers_or_raise(model).values():
        if isinstance(layer, LoraLinear):
            layer.dora_recompute = recompute


class DoraCaching:
    """What :func:`dora_caching` returns: the change is made already; used as a context manager, leaving it puts
    back each layer's setting as it was before and drops what was kept."""

    def __init__(self, layers: list[LoraLinear], enabled: bool) -> None:
        self.previous = [(layer, layer.dora_caching) for layer in layers]
        for layer in layers:
            layer.dora_caching = enabled
            layer.dora_cache.clear()

    def __enter__(self) -> DoraCaching:
        return self

    def __exit__(self, *exc) -> None:
        for layer, before in self.previous:
            layer.dora_caching = before
            layer.dora_cache.clear()


def dora_caching(model: nn.Module, enabled: bool = True) -> DoraCaching:
    """Keeps each DoRA layer's row scaling ``g = m / ‖W + s·B R A‖`` from one forward to the next where nothing
    trains (evaluation, generation), so that a forward costs LoRA's: the norms are a pass over the weight, several
    times the frozen product itself when decoding a token. Like PEFT's ``DoraCaching``, but safe against the
    changes that go through torch (an optimizer's step, ``load_state_dict``, merging, a new factor): what is kept is
    used only while W, A, B, R and m are the same tensors at the same versions. Writes through ``.data`` bypass
    the versions: call ``dora_caching(model, False)`` after them. A forward that trains the adapter (the magnitude's
    gradient flows through g), or in training mode, always computes the norms. One ``(out,)`` vector is kept per
    layer and adapter.

    Use as ``lt.dora_caching(model)`` (on until turned off) or ``with lt.dora_caching(model): ...`` (the settings
    before it back on leaving).

    Raises:
        TypeError: ``enabled`` not a bool. AdapterStateError: a model without adapters.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    return DoraCaching([layer for layer in layers_or_raise(model).values() if isinstance(layer, LoraLinear)], enabled)


def caching_while_generating(model: nn.Module) -> contextlib.AbstractContextManager:
    """What generation runs under: :func:`dora_caching` where the model has adapters (nothing changes between the
    tokens), else nothing."""
    return dora_caching(model) if adapter_layers(model) else contextlib.nullcontext()


def set_layer_enabled(layer: LoraLinear, enabled: bool) -> None:
    """One layer's part of :func:`set_enabled`: a merged adapter is unmerged when disabled and recorded in
    ``layer.merged_when_disabled``, then merged back when enabled (if it is still the layer's active adapter). A
    module trained whole (:class:`~lispetorch.saved_modules.ModulesToSave`) just switches copies."""
    if not isinstance(layer, (LoraLinear, LoraExperts)):
        layer.enabled = enabled
        return
    if not enabled and layer.merged:
        name = layer.merged_adapter
        layer.unmerge()
        layer.merged_when_disabled = name
    elif enabled and getattr(layer, "merged_when_disabled", None) is not None:
        name = layer.merged_when_disabled
        layer.merged_when_disabled = None
        if name == layer.active_adapter and not layer.merged:
            layer.merge()
    layer.enabled = enabled


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: adapters off inside (merged ones unmerged exactly, see :func:`set_enabled`), each layer's
    previous state restored on exit (even on error), merged layers merged back."""
    layers = {**layers_or_raise(model), **saved_modules(model)}
    before = {name: layer.enabled for name, layer in layers.items()}
    try:
        for layer in layers.values():
            set_layer_enabled(layer, False)
        yield model
    finally:
        for name, layer in layers.items():
            set_layer_enabled(layer, before[name])


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
