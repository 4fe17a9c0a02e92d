"""LoRA (Hu et al., 2021): ``A`` Kaiming-uniform (a=√5, PEFT's default) or Gaussian (std 1/r), ``B`` zeros, both
trained; the base weight is untouched, so outputs are unchanged at init."""

from __future__ import annotations

from torch import nn

from ..adapters import AdapterPlan, base_weight, install, select_for_new_adapter
from ..config import LoraConfig
from ..hf import parse_dtype
from ..layer import LoraLinear, init_factors


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
           calibration_batches=None) -> dict[str, LoraLinear]:
    """:func:`~lispetorch.inject` for a :class:`~lispetorch.LoraConfig` with init ``kaiming`` or ``gaussian``."""
    dtype = parse_dtype(config.dtype)
    chosen = select_for_new_adapter(model, config, adapter_name)
    plans = {}
    for name, module in chosen.items():
        w = base_weight(module)
        A, B = init_factors(config.rank_of(name), w.shape[1], w.shape[0], config.init, dtype or w.dtype, w.device)
        plans[name] = AdapterPlan(A, B, config.alpha_of(name), config.dropout, config.use_rslora,
                                  use_dora=config.use_dora)
    return install(model, chosen, plans, adapter_name)
