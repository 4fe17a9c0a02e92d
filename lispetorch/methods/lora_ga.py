"""LoRA-GA (Wang et al., 2024): LoRA started from the SVD of the averaged gradient of W.

With ``G = U S Vᵀ`` the loss gradient of W averaged over calibration batches, ``A = V[:, :r]ᵀ·c`` and
``B = U[:, r:2r]·c`` train, with LoRA-GA's "stable" scale ``c = out^¼ / √γ``; the base becomes ``W − s·B A``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..adapters import AdapterPlan, base_weight, check_layers, install, select_for_new_adapter
from ..config import LoraConfig
from ..errors import ConfigError, DataError
from ..hf import is_conv1d, parse_dtype
from ..layer import LoraLinear, base_of

GAMMA = 16.0  # LoRA-GA's "stable" output scale γ: both factors scaled by out^¼ / √γ


def _batch_loss(model: nn.Module, batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise TypeError("calibration batches must be input_ids tensors or dicts with input_ids (and optional "
                        f"attention_mask, labels), got {type(batch).__name__}")
    kwargs = dict(batch)
    kwargs.setdefault("labels", kwargs["input_ids"])
    out = model(**kwargs)
    loss = out.loss if hasattr(out, "loss") else out["loss"]
    if loss is None:
        raise DataError("the model returned no loss for a calibration batch")
    return loss


def average_gradients(model: nn.Module, chosen: dict[str, nn.Module], batches: Iterable) -> dict[str, torch.Tensor]:
    """The gradient of the loss with respect to each chosen base weight, ``(out, in)`` float32, averaged over
    ``batches``. The model's parameters, their ``requires_grad`` flags and ``.grad`` are left as they were."""
    weights = {name: base_of(module).weight for name, module in chosen.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    grads_before = {p: p.grad for p in weights.values()}
    sums = {name: None for name in weights}
    count = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        for batch in batches:
            loss = _batch_loss(model, batch)
            grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for (name, module), g in zip(chosen.items(), grads, strict=True):
                if g is None:
                    g = torch.zeros_like(weights[name])
                g = g.detach().float()
                g = g.t() if is_conv1d(base_of(module)) else g  # Conv1D stores (in, out)
                sums[name] = g if sums[name] is None else sums[name] + g
            count += 1
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for p, g in grads_before.items():
            p.grad = g
    if count == 0:
        raise DataError("LoRA-GA needs at least one calibration batch")
    return {name: g / count for name, g in sums.items()}


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
           calibration_batches: Iterable | None = None) -> dict[str, LoraLinear]:
    """:func:`~lispetorch.inject` for ``LoraConfig.init`` ``"lora_ga"``, calibrated on ``calibration_batches``
    (input_ids tensors or dicts of model inputs)."""
    dtype = parse_dtype(config.dtype)
    chosen = select_for_new_adapter(model, config, adapter_name)
    for name, module in chosen.items():
        check_layers({name: module}, config.rank_of(name), "LoRA-GA", rank_factor=2)
    if calibration_batches is None:
        raise ConfigError("LoraConfig(init='lora_ga') needs calibration batches: inject(model, config, "
                          "calibration_batches=[...])")
    grads = average_gradients(model, chosen, calibration_batches)
    plans = {}
    for name, module in chosen.items():
        r = config.rank_of(name)
        w = base_weight(module)
        U, S, Vh = torch.linalg.svd(grads[name], full_matrices=False)
        c = w.shape[0] ** 0.25 / math.sqrt(GAMMA)  # the "stable" scale
        A = (Vh[:r] * c).to(dtype or w.dtype)  # (r, in)   V[:, :r]ᵀ
        B = (U[:, r:2 * r] * c).to(dtype or w.dtype)  # (out, r)  U[:, r:2r]
        plans[name] = AdapterPlan(A.contiguous(), B.contiguous(), config.alpha_of(name), config.dropout,
                                  config.use_rslora, offset=True, use_dora=config.use_dora)
    return install(model, chosen, plans, adapter_name)
