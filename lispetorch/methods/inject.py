"""Injection of the SVD-family methods: every factor is computed and every input checked before the model changes.

Each method is a choice of the factors of ``y = x Wᵀ + b + s·((drop(x) Aᵀ) Rᵀ) Bᵀ`` on the same
:class:`~lispetorch.LoraLinear`, the same native operator and the same merge:

=================  ====================  =============================  ====================  ==================
method             A                     R                              B                     base W
=================  ====================  =============================  ====================  ==================
PiSSA              √(S_r/s)·V_rᵀ, train  none                           U_r·√(S_r/s), train   W − s·BA
LoRA-GA            V[:, :r]ᵀ·c, train    none                           U[:, r:2r]·c, train   W − s·BA
Rotational PiSSA   V_rᵀ, frozen          R_U diag(S_r/s) R_Vᵀ, trained  U_r, frozen           W − s·BR₀A
TinyLoRA           V_rᵀ, frozen          Σᵢ vᵢPᵢ, v trained             U_r diag(S_r), frozen W (unchanged)
=================  ====================  =============================  ====================  ==================

The base offset ``s·B₀R₀A₀`` is computed from the factors actually installed (after any dtype cast), so the
adapted model's output equals the base model's at init up to float rounding.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..config import LoraConfig, pissa_niter
from ..layer import LoraLinear, weight_out_in
from ..model import _dtype, _replace, select_for_new_adapter, set_adapter
from ..nf4 import NF4Weight, quantize_nf4
from .config import RotationalPiSSAConfig, TinyLoraConfig
from .cores import RotationalCore, TinyLoraCore

LORA_GA_GAMMA = 16.0  # LoRA-GA's "stable" output scale γ: both factors scaled by out^¼ / √γ


@dataclass
class _Plan:
    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    R_fn: nn.Module | None = None
    frozen: tuple[str, ...] = ()
    offset: bool = False  # the base becomes W − s·B R A (from the installed factors)


class BaseOffset(nn.Module):
    """The factors of the delta an SVD init took out of the base weight: ``W_original = W + s·B R A``."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, R: torch.Tensor | None, scale: float) -> None:
        super().__init__()
        self.register_buffer("A", A.detach().clone())
        self.register_buffer("B", B.detach().clone())
        self.register_buffer("R", None if R is None else R.detach().clone())
        self.scale = float(scale)


def svd_factors(w: torch.Tensor, r: int, niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``r`` singular triplets of ``w`` ``(out, in)`` in float32: ``U (out, r)``, ``S (r,)``, ``Vᵀ (r, in)``.

    A full SVD, or with ``niter`` a randomised SVD with that many subspace iterations (Halko et al., 2011).
    """
    W = w.detach().float()
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r].contiguous(), S[:r].contiguous(), Vh[:r].contiguous()
    return ops.svd_lowrank(W, r, niter)


def _check_layers(chosen: dict[str, nn.Module], r: int, what: str, rank_factor: int = 1,
                  changes_base: bool = True) -> None:
    for name, module in chosen.items():
        layer = module.base_layer if isinstance(module, LoraLinear) else module
        if changes_base and getattr(layer, "quantized", False):
            raise ValueError(f"{what} changes the base weight, but {name!r} is quantised: inject it first, then "
                             "quantize_nf4 (the residual is what gets quantised)")
        w = weight_out_in(layer)
        if not w.is_floating_point():
            raise TypeError(f"{what} needs a floating-point weight, but {name!r} holds {w.dtype}")
        if isinstance(module, LoraLinear) and module.merged:
            raise ValueError(f"{what}: layer {name!r} has adapter {module.merged_adapter!r} merged: unmerge first")
        if rank_factor * r > min(w.shape):
            need = f"{rank_factor}·r = {rank_factor * r}" if rank_factor > 1 else f"r = {r}"
            raise ValueError(f"{what}: {need} exceeds min(out, in) = {min(w.shape)} of {name!r} "
                             f"(weight {tuple(w.shape)})")


def _chosen(model: nn.Module, config, adapter_name: str) -> dict[str, nn.Module]:
    return select_for_new_adapter(model, config, adapter_name)


def _base(module: nn.Module) -> torch.Tensor:
    return weight_out_in(module.base_layer if isinstance(module, LoraLinear) else module)


def _apply(model: nn.Module, chosen: dict[str, nn.Module], plans: dict[str, _Plan], adapter_name: str) -> dict:
    """Changes the model: wraps the layers, installs the factors, subtracts the base offsets, activates."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers: dict[str, LoraLinear] = {}
    for name, module in chosen.items():
        plan = plans[name]
        layer = module if isinstance(module, LoraLinear) else LoraLinear(module)
        layer.set_factors(adapter_name, plan.A, plan.B, alpha=plan.alpha, dropout=plan.dropout,
                          use_rslora=plan.use_rslora, R_fn=plan.R_fn, frozen=plan.frozen)
        if plan.offset:
            with torch.no_grad():
                A, B, R = layer.factors(adapter_name)
                scale = layer.scaling[adapter_name]
                w = layer.base_weight()
                delta = ops.lora_delta(A, B, R, scale, torch.float32)  # from the installed factors
                w.copy_((w.float() - delta).to(w.dtype))
                layer.base_offset[adapter_name] = BaseOffset(A, B, R, scale)
        if layer is not module:
            _replace(model, name, layer)
        layers[name] = layer
    set_adapter(model, adapter_name)
    return layers


# --- PiSSA ---------------------------------------------------------------------------------------------------
def _pissa_plans(chosen, config: LoraConfig, dtype) -> dict[str, _Plan]:
    niter = pissa_niter(config.init)
    s = config.scaling
    plans = {}
    for name, module in chosen.items():
        w = _base(module)
        U, S, Vh = svd_factors(w, config.r, niter)
        root = torch.sqrt(S / s)  # (r,)
        A = (root[:, None] * Vh).to(dtype or w.dtype)  # (r, in)  √(S/s) Vᵀ
        B = (U * root[None, :]).to(dtype or w.dtype)  # (out, r)  U √(S/s)
        plans[name] = _Plan(A, B, config.alpha, config.dropout, config.use_rslora, offset=True)
    return plans


# --- LoRA-GA -------------------------------------------------------------------------------------------------
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
        raise ValueError("the model returned no loss for a calibration batch")
    return loss


def average_gradients(model: nn.Module, chosen: dict[str, nn.Module], batches: Iterable) -> dict[str, torch.Tensor]:
    """The gradient of the loss with respect to each chosen base weight, ``(out, in)`` float32, averaged over
    ``batches``. The model's parameters, their ``requires_grad`` flags and ``.grad`` are left as they were."""
    weights = {name: (module.base_layer if isinstance(module, LoraLinear) else module).weight
               for name, module in chosen.items()}
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
                layer = module.base_layer if isinstance(module, LoraLinear) else module
                g = g if isinstance(layer, nn.Linear) else g.t()  # Conv1D stores (in, out)
                sums[name] = g if sums[name] is None else sums[name] + g
            count += 1
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for p, g in grads_before.items():
            p.grad = g
    if count == 0:
        raise ValueError("LoRA-GA needs at least one calibration batch")
    return {name: g / count for name, g in sums.items()}


def _lora_ga_plans(chosen, config: LoraConfig, dtype, grads) -> dict[str, _Plan]:
    r = config.r
    plans = {}
    for name, module in chosen.items():
        w = _base(module)
        U, S, Vh = torch.linalg.svd(grads[name], full_matrices=False)
        c = w.shape[0] ** 0.25 / math.sqrt(LORA_GA_GAMMA)  # the "stable" scale
        A = (Vh[:r] * c).to(dtype or w.dtype)  # (r, in)   V[:, :r]ᵀ
        B = (U[:, r:2 * r] * c).to(dtype or w.dtype)  # (out, r)  U[:, r:2r]
        plans[name] = _Plan(A.contiguous(), B.contiguous(), config.alpha, config.dropout, config.use_rslora,
                            offset=True)
    return plans


def inject_lora_init(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                     calibration_batches: Iterable | None = None) -> dict[str, LoraLinear]:
    """:func:`~lispetorch.inject` for ``LoraConfig.init`` ``"pissa"``, ``"pissa_niter_K"`` and ``"lora_ga"``."""
    dtype = _dtype(config.dtype)
    chosen = _chosen(model, config, adapter_name)
    if config.init == "lora_ga":
        _check_layers(chosen, config.r, "LoRA-GA", rank_factor=2)
        if calibration_batches is None:
            raise ValueError("LoraConfig(init='lora_ga') needs calibration batches: inject(model, config, "
                             "calibration_batches=[...])")
        plans = _lora_ga_plans(chosen, config, dtype, average_gradients(model, chosen, calibration_batches))
    else:
        _check_layers(chosen, config.r, "PiSSA")
        plans = _pissa_plans(chosen, config, dtype)
    return _apply(model, chosen, plans, adapter_name)


# --- Rotational PiSSA ----------------------------------------------------------------------------------------
def inject_rotational_pissa(model: nn.Module, config: RotationalPiSSAConfig,
                            adapter_name: str = "default") -> dict[str, LoraLinear]:
    """:func:`~lispetorch.inject` for :class:`RotationalPiSSAConfig`."""
    dtype = _dtype(config.dtype)
    chosen = _chosen(model, config, adapter_name)
    _check_layers(chosen, config.r, "Rotational PiSSA")
    s = config.scaling
    generator = torch.Generator().manual_seed(0)
    plans = {}
    for name, module in chosen.items():
        w = _base(module)
        U, S, Vh = svd_factors(w, config.r)
        if config.quantize_base_components:  # U_r and V_r through NF4 (the residual absorbs the rounding)
            U, Vh = NF4Weight(U).dequantize(), NF4Weight(Vh).dequantize()
        core = RotationalCore(S / s, config.method, config.skew_rank, config.init_identity,
                              config.freeze_singular_values, generator, config.orthogonality_reg_weight).to(w.device)
        plans[name] = _Plan(Vh.to(dtype or w.dtype), U.to(dtype or w.dtype), config.lora_alpha, config.dropout,
                            R_fn=core, frozen=("A", "B"), offset=True)
    layers = _apply(model, chosen, plans, adapter_name)
    if config.quantize_residual:
        quantize_nf4(model, "^(" + "|".join(re.escape(n) for n in layers) + ")$")
    return layers


def orthogonality_loss(model: nn.Module, adapter_name: str | None = None, weight: float | None = None) -> torch.Tensor:
    """Rotational PiSSA ``way0``'s penalty ``λ Σ_layers (‖R_UᵀR_U − I‖² + ‖R_VᵀR_V − I‖²)``, differentiable.

    Args:
        model (nn.Module): a model with a Rotational PiSSA adapter.
        adapter_name (str | None): the adapter; the active one when None.
        weight (float | None): λ; the one the adapter was injected with when None.

    Returns:
        Tensor: a scalar (zero for ``way1``–``way3``, whose rotations are exactly orthogonal).
    """
    from ..model import active_adapter, adapter_layers

    name = adapter_name or active_adapter(model)
    total, lam = None, weight
    for layer in adapter_layers(model).values():
        core = layer.lora_R_fn[name] if name in layer.lora_R_fn else None
        if isinstance(core, RotationalCore):
            pen = core.orthogonality_penalty()
            total = pen if total is None else total + pen
            lam = core.reg_weight if lam is None else lam
    if total is None:
        raise ValueError(f"adapter {name!r} is not a Rotational PiSSA adapter")
    return lam * total


# --- TinyLoRA ------------------------------------------------------------------------------------------------
def tinylora_projections(shapes: int, u: int, r: int, seed: int) -> list[torch.Tensor]:
    """The fixed ``P`` ``(u, r, r)`` of ``shapes`` modules, in order, from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(u, r, r, generator=g) for _ in range(shapes)]


def group_of(index: int, count: int, groups: int) -> int:
    """The group of module ``index`` of ``count`` when split into ``groups`` contiguous, nearly equal groups."""
    return index * groups // count


def inject_tinylora(model: nn.Module, config: TinyLoraConfig, adapter_name: str = "default",
                    v: torch.Tensor | None = None) -> dict[str, LoraLinear]:
    """:func:`~lispetorch.inject` for :class:`TinyLoraConfig`; ``v`` ``(u,)`` or ``(groups, u)`` sets the vector."""
    dtype = _dtype(config.dtype)
    chosen = _chosen(model, config, adapter_name)
    _check_layers(chosen, config.r, "TinyLoRA", changes_base=False)
    groups = min(config.groups, len(chosen))
    if groups != config.groups:
        raise ValueError(f"TinyLoraConfig.groups = {config.groups} but only {len(chosen)} modules are adapted")
    device = _base(next(iter(chosen.values()))).device
    values = torch.zeros(groups, config.u) if v is None else v.detach().float().reshape(groups, config.u)
    shared = [nn.Parameter(values[k].clone().to(device)) for k in range(groups)]
    projections = tinylora_projections(len(chosen), config.u, config.r, config.seed)
    plans = {}
    for index, (name, module) in enumerate(chosen.items()):
        w = _base(module)
        U, S, Vh = svd_factors(w, config.r)
        core = TinyLoraCore(shared[group_of(index, len(chosen), groups)], projections[index].to(w.device),
                            config.seed)
        plans[name] = _Plan(Vh.to(dtype or w.dtype), (U * S[None, :]).to(dtype or w.dtype), float(config.r),
                            R_fn=core, frozen=("A", "B"))
    return _apply(model, chosen, plans, adapter_name)
