"""``inject``: from a config to the method's module. Adding a method is one file in ``methods/``, one config
class in :mod:`lispetorch.config`, and one line in :data:`INJECTORS`."""

from __future__ import annotations

from torch import nn

from .adapters import add_saved_modules, set_adapter
from .config import AdapterConfig, method_of, pissa_niter
from .layer import LoraLinear
from .methods import lora, lora_ga, pissa, rotational, tinylora
from .targets import match_saved_modules

# method name (lispetorch.config.METHODS) -> its inject(model, config, adapter_name, calibration_batches)
INJECTORS = {
    "lora": lora.inject,
    "pissa": pissa.inject,
    "lora_ga": lora_ga.inject,
    "rotational_pissa": rotational.inject,
    "tinylora": tinylora.inject,
}


def inject(model: nn.Module, config: AdapterConfig, adapter_name: str = "default",
           calibration_batches=None) -> dict[str, LoraLinear]:
    """Adapts the layers of ``model`` that ``config.target_modules`` selects, in place.

    Every parameter of the model is frozen except the new adapter's trained factors, and it becomes the active
    adapter. Every factor is computed and every input checked before the model changes.

    Args:
        model (nn.Module): any module; transformers models included.
        config (LoraConfig | RotationalPiSSAConfig | TinyLoraConfig): the method and its rank, alpha, dropout,
            targets, init (``LoraConfig.init`` ``"pissa"``, ``"pissa_niter_K"`` and ``"lora_ga"`` are SVD inits).
        adapter_name (str): name of the adapter. Default ``"default"``.
        calibration_batches (Iterable | None): for ``init="lora_ga"``: input_ids tensors or dicts of model inputs
            whose averaged loss gradient initialises the adapter.

    A :class:`~lispetorch.LoraConfig`'s ``layers_to_transform`` / ``layers_pattern`` narrow the targets to some
    layers and ``rank_pattern`` / ``alpha_pattern`` set per-module ranks and alphas, by PEFT's rules; its
    ``modules_to_save`` are wrapped in :class:`~lispetorch.ModulesToSave`, whose copy for this adapter trains.

    Returns:
        dict[str, LoraLinear]: the adapted layers by module name.

    Raises:
        ValueError: no module matches; a layer index, a pattern or a ``modules_to_save`` name that matches nothing;
            a module both targeted and in ``modules_to_save``. AdapterStateError: a matched layer already has an
            adapter of this name. TypeError: not an adapter config. On any of them the model is left unchanged.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a LoraConfig, RotationalPiSSAConfig or TinyLoraConfig, got "
                        f"{type(config).__name__}")
    method = method_of(config)
    injector = INJECTORS["pissa" if pissa_niter(method) is not None else method]
    saved_names = getattr(config, "modules_to_save", None)
    saved = match_saved_modules(model, saved_names) if saved_names else {}  # checked before the model changes
    layers = injector(model, config, adapter_name, calibration_batches)
    if saved:
        add_saved_modules(model, saved, adapter_name)
        set_adapter(model, adapter_name)  # the copies train with the adapter
    return layers
