"""Merged export in memory: :func:`merge_and_unload` folds the active adapter into the base weights and gives
the model its original layers back, a plain transformers model that ``save_pretrained`` writes as such."""

from __future__ import annotations

from torch import nn

from .adapters import layers_or_raise, merge, saved_modules
from .errors import AdapterStateError
from .nf4 import NF4Linear
from .targets import replace_module


def merge_and_unload(model: nn.Module, safe: bool = True) -> nn.Module:
    """Folds the active adapter into the base weights and replaces every adapted layer by its base layer, in place.

    The result holds no adapter module: its outputs are the adapted model's (adapters on, whatever
    :func:`~lispetorch.set_enabled` said), and ``model.save_pretrained`` writes a Hugging Face model directory that
    ``AutoModelForCausalLM.from_pretrained`` loads. Adapters other than the active one are dropped; a module
    trained whole (``modules_to_save``) becomes the active adapter's copy. A layer whose
    base an SVD init turned into a residual (PiSSA, LoRA-GA, Rotational PiSSA) gets ``residual + s·B R A``.

    Args:
        model (nn.Module): a model with adapters.
        safe (bool): refuse a merge that would put NaN or Inf into a weight. Default True.

    Returns:
        nn.Module: ``model`` itself, without adapters.

    Raises:
        AdapterStateError: the model has no adapters, or an adapted layer's base is NF4-quantised (it has no dense
            weight to merge into: merge on the unquantised model, or write the adapter with
            :func:`~lispetorch.save_as_lora`). RuntimeError: with ``safe``, a non-finite merged weight. On any of
            them the model is left as it was.
    """
    layers = layers_or_raise(model)
    quantised = [n for n, layer in layers.items() if isinstance(layer.base_layer, NF4Linear) and
                 layer.active_adapter is not None and layer.merged_adapter is None]
    if quantised:
        raise AdapterStateError(f"merge_and_unload: the base of {quantised} is NF4-quantised, with no dense weight "
                                "to merge into; merge the adapter into the unquantised model, or write it with "
                                "lispetorch.save_as_lora")
    merge(model, safe=safe)  # all layers or none
    for name, layer in layers.items():
        replace_module(model, name, layer.base_layer)
    for name, wrapper in saved_modules(model).items():  # a module trained whole: the active adapter's copy
        active = wrapper.active_adapter
        replace_module(model, name, wrapper.modules_to_save[active] if active in wrapper.modules_to_save
                       else wrapper.original_module)
    return model
