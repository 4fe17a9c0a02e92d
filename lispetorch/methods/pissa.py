"""PiSSA (Meng et al., 2024): LoRA started from the principal singular triplets of W.

``A = √(S_r/s)·V_rᵀ`` and ``B = U_r·√(S_r/s)`` train; the base becomes the residual ``W − s·B A`` (computed from
the factors as installed, after any dtype cast), so the adapted model's output is the base model's at init.
``init="pissa"`` takes a full SVD, ``"pissa_niter_K"`` a randomised one with K subspace iterations.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..adapters import AdapterPlan, base_weight, check_layers, install, select_for_new_adapter
from ..config import LoraConfig, pissa_niter
from ..hf import parse_dtype
from ..layer import LoraLinear


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
           calibration_batches=None) -> dict[str, LoraLinear]:
    """:func:`~lispetorch.inject` for ``LoraConfig.init`` ``"pissa"`` and ``"pissa_niter_K"``."""
    dtype = parse_dtype(config.dtype)
    chosen = select_for_new_adapter(model, config, adapter_name)
    for name, module in chosen.items():
        check_layers({name: module}, config.rank_of(name), "PiSSA")
    niter = pissa_niter(config.init)
    plans = {}
    for name, module in chosen.items():
        s = config.scaling_of(name)
        w = base_weight(module)
        U, S, Vh = ops.svd_factors(w, config.rank_of(name), niter)
        root = torch.sqrt(S / s)  # (r,)
        A = (root[:, None] * Vh).to(dtype or w.dtype)  # (r, in)  √(S/s) Vᵀ
        B = (U * root[None, :]).to(dtype or w.dtype)  # (out, r)  U √(S/s)
        plans[name] = AdapterPlan(A, B, config.alpha_of(name), config.dropout, config.use_rslora, offset=True,
                                  use_dora=config.use_dora)
    return install(model, chosen, plans, adapter_name)
