"""LoRA (Hu et al., 2021): ``A`` Kaiming-uniform (a=√5, PEFT's default) or Gaussian (std 1/r), ``B`` zeros, both
trained; the base weight is untouched, so outputs are unchanged at init."""

from __future__ import annotations

from torch import nn

from ..adapters import AdapterPlan, ExpertsPlan, base_weight, install, select_experts, select_for_new_adapter
from ..config import LoraConfig
from ..experts import LoraExperts, init_expert_factors
from ..hf import parse_dtype
from ..layer import LoraLinear, init_factors


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
           calibration_batches=None) -> dict[str, LoraLinear | LoraExperts]:
    """:func:`~lispetorch.inject` for a :class:`~lispetorch.LoraConfig` with init ``kaiming`` or ``gaussian``;
    its ``target_parameters`` get one adapter per expert, each expert's A drawn as a layer's."""
    dtype = parse_dtype(config.dtype)
    chosen = select_for_new_adapter(model, config, adapter_name)
    experts = select_experts(model, config.target_parameters, adapter_name)
    expert_plans = {}
    for name, (module, params) in experts.items():
        factors = {p: init_expert_factors(module, p, config.rank_of(f"{name}.{p}"), config.init, dtype)
                   for p in params}
        expert_plans[name] = ExpertsPlan(factors, config.alpha, config.dropout, config.use_rslora,
                                         alphas={p: config.alpha_of(f"{name}.{p}") for p in params})
    plans = {}
    for name, module in chosen.items():
        w = base_weight(module)
        A, B = init_factors(config.rank_of(name), w.shape[1], w.shape[0], config.init, dtype or w.dtype, w.device)
        plans[name] = AdapterPlan(A, B, config.alpha_of(name), config.dropout, config.use_rslora,
                                  use_dora=config.use_dora)
    return install(model, chosen, plans, adapter_name, experts=experts, expert_plans=expert_plans)
