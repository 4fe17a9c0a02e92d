"""TinyLoRA: ``ΔW = U_r diag(S_r) (Σᵢ vᵢ Pᵢ) V_rᵀ`` with one trained vector ``v`` shared across layers.

On the one operator: ``A = V_rᵀ`` and ``B = U_r diag(S_r)`` are frozen SVD factors of each adapted W (which stays
unchanged), the core ``R = Σᵢ vᵢ Pᵢ`` is computed at every forward by a :class:`TinyLoraCore` from the shared
``v`` and its fixed, seeded ``P`` ``(u, r, r)``, and ``s = 1``.

Checkpoints in the ``tiny_lora_v.pt`` format: a dict with ``global_v`` (the trained vector, ``(u,)``;
``(groups, u)`` when tied by groups), ``u_value``, ``rank``, ``seed``, ``model_id`` and ``total_replaced_layers``.
Everything else is rebuilt from the base model: the SVD factors are recomputed from its weights and the fixed
``P`` redrawn from ``seed``, so the same base model, seed, u and rank give the same adapted model.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import atomic, ops
from ..adapters import (
    AdapterPlan,
    active_adapter,
    adapter_layers,
    base_weight,
    check_layers,
    install,
    select_for_new_adapter,
)
from ..config import TinyLoraConfig
from ..errors import AdapterFormatError, AdapterStateError, ConfigError, TinyLoraFormatError
from ..hf import model_id as model_id_of
from ..hf import parse_dtype
from ..layer import LoraLinear
from ..targets import match_modules


# --- the core and the injection ------------------------------------------------------------------------------
class TinyLoraCore(nn.Module):
    """TinyLoRA's core ``R = Σᵢ vᵢ Pᵢ`` ``(r, r)``: ``v`` ``(u,)`` is shared (the same Parameter in many layers),
    ``P`` ``(u, r, r)`` is fixed."""

    def __init__(self, v: nn.Parameter, P: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        self.v = v
        self.register_buffer("P", P)
        self.seed = int(seed)  # the seed P was drawn with, recorded in tiny_lora_v.pt

    def forward(self) -> torch.Tensor:
        return torch.einsum("u,uij->ij", self.v, self.P)


def tinylora_projections(shapes: int, u: int, r: int, seed: int) -> list[torch.Tensor]:
    """The fixed ``P`` ``(u, r, r)`` of ``shapes`` modules, in order, from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(u, r, r, generator=g) for _ in range(shapes)]


def group_of(index: int, count: int, groups: int) -> int:
    """The group of module ``index`` of ``count`` when split into ``groups`` contiguous, nearly equal groups."""
    return index * groups // count


def inject(model: nn.Module, config: TinyLoraConfig, adapter_name: str = "default", calibration_batches=None,
           v: torch.Tensor | None = None) -> dict[str, LoraLinear]:
    """:func:`~lispetorch.inject` for :class:`~lispetorch.TinyLoraConfig`; ``v`` ``(u,)`` or ``(groups, u)`` sets
    the vector."""
    dtype = parse_dtype(config.dtype)
    chosen = select_for_new_adapter(model, config, adapter_name)
    check_layers(chosen, config.r, "TinyLoRA", changes_base=False)
    groups = min(config.groups, len(chosen))
    if groups != config.groups:
        raise ConfigError(f"TinyLoraConfig.groups = {config.groups} but only {len(chosen)} modules are adapted")
    device = base_weight(next(iter(chosen.values()))).device
    values = torch.zeros(groups, config.u) if v is None else v.detach().float().reshape(groups, config.u)
    shared = [nn.Parameter(values[k].clone().to(device)) for k in range(groups)]
    projections = tinylora_projections(len(chosen), config.u, config.r, config.seed)
    plans = {}
    for index, (name, module) in enumerate(chosen.items()):
        w = base_weight(module)
        U, S, Vh = ops.svd_factors(w, config.r)
        core = TinyLoraCore(shared[group_of(index, len(chosen), groups)], projections[index].to(w.device),
                            config.seed)
        plans[name] = AdapterPlan(Vh.to(dtype or w.dtype), (U * S[None, :]).to(dtype or w.dtype), float(config.r),
                            R_fn=core, frozen=("A", "B"))
    return install(model, chosen, plans, adapter_name)


# --- the tiny_lora_v.pt format ------------------------------------------------------------------------------
FIELDS = ("global_v", "u_value", "rank", "seed", "model_id", "total_replaced_layers")


def tinylora_cores(model: nn.Module, adapter_name: str | None = None) -> dict[str, TinyLoraCore]:
    """The TinyLoRA cores of ``adapter_name`` (the active adapter by default), by module name."""
    name = adapter_name or active_adapter(model)
    return {n: layer.lora_R_fn[name] for n, layer in adapter_layers(model).items()
            if name in layer.lora_R_fn and isinstance(layer.lora_R_fn[name], TinyLoraCore)}


def _vectors(cores: dict[str, TinyLoraCore]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for core in cores.values():
        seen.setdefault(id(core.v), core.v)
    return list(seen.values())


def save_tinylora(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None,
                  model_id: str | None = None) -> Path:
    """Writes the TinyLoRA adapter's trained vector and metadata as ``tiny_lora_v.pt``, atomically.

    Args:
        model (nn.Module): a model with a TinyLoRA adapter.
        path (str | PathLike): the file to write.
        adapter_name (str | None): the adapter; the active one when None.
        model_id (str | None): recorded base model id; the model's ``config._name_or_path`` when None.

    Returns:
        Path: the file.
    """
    cores = tinylora_cores(model, adapter_name)
    if not cores:
        raise AdapterStateError(f"the model has no TinyLoRA adapter {adapter_name or active_adapter(model)!r}")
    first = next(iter(cores.values()))
    vectors = _vectors(cores)
    v = vectors[0].detach() if len(vectors) == 1 else torch.stack([p.detach() for p in vectors])
    state = {
        "global_v": v.cpu().clone(),
        "u_value": int(first.P.shape[0]),
        "rank": int(first.P.shape[1]),
        "seed": int(first.seed),
        "model_id": model_id if model_id is not None else model_id_of(model),
        "total_replaced_layers": len(cores),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = Path(path)
    atomic.write_bytes(path, buffer.getvalue())
    return path


def read_tinylora(path: str | os.PathLike) -> dict:
    """Reads and checks a ``tiny_lora_v.pt`` (``torch.load`` with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TinyLoRA checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TinyLoraFormatError(f"{path}: not a readable TinyLoRA checkpoint ({e})") from None
    if not isinstance(state, dict):
        raise TinyLoraFormatError(f"{path}: expected a dict, got {type(state).__name__}")
    missing = [f for f in FIELDS if f not in state]
    if missing:
        raise TinyLoraFormatError(f"{path}: missing field(s) {missing}; a tiny_lora_v.pt holds {list(FIELDS)}")
    for key in ("u_value", "rank", "seed", "total_replaced_layers"):
        if isinstance(state[key], bool) or not isinstance(state[key], int):
            raise TinyLoraFormatError(f"{path}: {key} must be an integer, got {state[key]!r}")
    v, u = state["global_v"], state["u_value"]
    if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() not in (1, 2) or v.shape[-1] != u:
        raise TinyLoraFormatError(f"{path}: global_v must be a float tensor (u_value,) or (groups, u_value) with "
                                  f"u_value = {u}, got {getattr(v, 'shape', type(v).__name__)}")
    if not torch.isfinite(v).all():
        raise TinyLoraFormatError(f"{path}: global_v holds non-finite values")
    return state


def restore_tinylora(model: nn.Module, path: str | os.PathLike, target_modules: list[str] | str = "all-linear",
                     exclude_modules: list[str] | str | None = None, adapter_name: str = "default") -> dict:
    """Rebuilds a TinyLoRA adapter from ``tiny_lora_v.pt`` on ``model`` and activates it.

    On a model without that adapter, injects :class:`TinyLoraConfig` with the file's rank, u and seed on the
    modules ``target_modules`` selects; on a model that has it, checks that it matches and sets ``v``. Everything
    is checked before the model changes.

    Raises:
        TinyLoraFormatError: a missing field or a malformed file.
        AdapterFormatError: the model's adapted layers differ from the file's (the message names what differs).
    """
    state = read_tinylora(path)
    u, rank, seed, count = state["u_value"], state["rank"], state["seed"], state["total_replaced_layers"]
    v = state["global_v"]
    groups = 1 if v.dim() == 1 else v.shape[0]
    if state["model_id"] and model_id_of(model) and state["model_id"] != model_id_of(model):
        warnings.warn(f"{path} was written for model_id {state['model_id']!r}, the model is "
                      f"{model_id_of(model)!r}", stacklevel=2)
    cores = tinylora_cores(model, adapter_name)
    if cores:
        first = next(iter(cores.values()))
        have = {"u_value": first.P.shape[0], "rank": first.P.shape[1], "seed": first.seed,
                "total_replaced_layers": len(cores), "groups": len(_vectors(cores))}
        want = {"u_value": u, "rank": rank, "seed": seed, "total_replaced_layers": count, "groups": groups}
        diff = [f"{k}: file {want[k]}, model {have[k]}" for k in want if want[k] != have[k]]
        if diff:
            raise AdapterFormatError(f"{path} does not match the model's TinyLoRA adapter {adapter_name!r}: "
                             + "; ".join(diff))
        with torch.no_grad():
            for k, p in enumerate(_vectors(cores)):
                p.copy_(v.reshape(groups, u)[k].to(p.dtype))
        return adapter_layers(model)
    config = TinyLoraConfig(r=rank, u=u, seed=seed, groups=groups, target_modules=target_modules,
                            exclude_modules=exclude_modules)
    chosen = match_modules(model, config.target_modules, config.exclude_modules)
    if len(chosen) != count:
        raise AdapterFormatError(f"{path} was written for {count} replaced layers (model_id "
                                 f"{state['model_id']!r}), but target_modules {target_modules!r} selects "
                                 f"{len(chosen)} layers of this model ({model_id_of(model)!r}); pass the "
                                 "target_modules used in training")
    return inject(model, config, adapter_name, v=v)
