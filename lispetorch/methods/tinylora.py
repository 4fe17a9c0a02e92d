"""TinyLoRA: ``ΔW = U_r diag(S_r) (Σᵢ vᵢ Pᵢ) V_rᵀ`` with one trained vector ``v`` shared across layers.

On the one operator: ``A = V_rᵀ`` and ``B = U_r diag(S_r)`` are frozen SVD factors of each adapted W (which stays
unchanged), the core ``R = Σᵢ vᵢ Pᵢ`` is computed at every forward by a :class:`TinyLoraCore` from the shared
``v`` and its fixed, seeded ``P`` ``(u, r, r)``, and ``s = 1``.

Checkpoints in the ``tiny_lora_v.pt`` format: a dict with ``global_v`` (the trained vector, ``(u,)``;
``(groups, u)`` when tied by groups), ``u_value``, ``rank``, ``seed`` and, optionally, ``model_id`` and
``total_replaced_layers``. Everything else is rebuilt from the base model: the SVD factors are recomputed from its
weights and the fixed ``P`` redrawn from ``seed``, so the same base model, seed, u and rank give the same adapted
model. Beside the file, :func:`save_tinylora` writes ``tiny_lora_v.json`` (the modules adapted and the
convention), so that :func:`restore_tinylora` needs nothing but the model; the ``.pt`` itself keeps exactly the
trainer's fields, so the trainer's own code reads it too.

Two conventions (``TinyLoraConfig.convention``): ``"paper"`` (``P`` ``(u, r, r)``, ``R = Σᵢ vᵢ Pᵢ``) and
``"qwen-coder"``, the TinyLoRA-Qwen-Coder trainer's (``P`` ``(u, r)``, ``R = diag(S ⊙ (v P))``, bfloat16). A file
without ``tiny_lora_v.json`` whose ``global_v`` is bfloat16 is that trainer's: it is restored on the layers the
trainer replaces (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``).
"""

from __future__ import annotations

import io
import json
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
from ..config import TINYLORA_CONVENTIONS, TinyLoraConfig
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


class TinyLoraDiagCore(nn.Module):
    """The ``"qwen-coder"`` convention's core ``R = diag(S ⊙ (v P))`` ``(r, r)``, computed in bfloat16 as that
    trainer does: ``v`` ``(u,)`` shared, ``P`` ``(u, r)`` and the singular values ``S`` ``(r,)`` fixed, bfloat16.
    The product ``U R Vᵀ`` is then the trainer's ``U diag(S ⊙ (v P)) Vᵀ``."""

    def __init__(self, v: nn.Parameter, P: torch.Tensor, S: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        self.v = v
        self.register_buffer("P", P)
        self.register_buffer("S", S)
        self.seed = int(seed)

    def forward(self) -> torch.Tensor:
        c = self.S * (self.v.to(device=self.P.device, dtype=self.P.dtype) @ self.P)
        return torch.diag(c).float()


QWEN_CODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qwen_coder_factors(w: torch.Tensor, u: int, r: int, generator: torch.Generator) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U_r`` ``(out, r)``, ``S_r`` ``(r,)``, ``V_rᵀ`` ``(r, in)`` (float32 SVD on the CPU, rounded to bfloat16)
    and ``P = randn(u, r) / √r`` (bfloat16, from ``generator`` on the weight's device) of one layer, as the
    TinyLoRA-Qwen-Coder trainer computes them."""
    U, S, Vh = torch.linalg.svd(w.detach().float().cpu(), full_matrices=False)
    bf = torch.bfloat16
    P = torch.randn(u, r, generator=generator, device=w.device, dtype=bf) / (r ** 0.5)
    return U[:, :r].to(bf).to(w.device), S[:r].to(bf).to(w.device), Vh[:r].to(bf).to(w.device), P


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
    if config.convention == "qwen-coder":
        return install(model, chosen, _qwen_coder_plans(chosen, config, shared[0], dtype), adapter_name)
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


def _qwen_coder_plans(chosen: dict[str, nn.Module], config: TinyLoraConfig, v: nn.Parameter, dtype) \
        -> dict[str, AdapterPlan]:
    # one generator per device, each seeded as torch.manual_seed(seed) seeds the default ones: the same P, in
    # the same order, without touching the caller's random state
    generators: dict[torch.device, torch.Generator] = {}
    plans = {}
    for name, module in chosen.items():
        w = base_weight(module)
        if w.device not in generators:
            generators[w.device] = torch.Generator(device=w.device).manual_seed(config.seed)
        U, S, Vh, P = qwen_coder_factors(w, config.u, config.r, generators[w.device])
        core = TinyLoraDiagCore(v, P, S, config.seed)
        plans[name] = AdapterPlan(Vh.to(dtype or w.dtype), U.to(dtype or w.dtype), float(config.r), R_fn=core,
                                  frozen=("A", "B"))
    return plans


# --- the tiny_lora_v.pt format ------------------------------------------------------------------------------
FIELDS = ("global_v", "u_value", "rank", "seed", "model_id", "total_replaced_layers")
REQUIRED = ("global_v", "u_value", "rank", "seed")
# fields the TinyLoRA-Qwen-Coder trainer's best-checkpoint files add, with their types
EXTRA_FIELDS = {"is_quantized": (bool,), "validation_score": (int, float), "step": (int,)}
SIDECAR_FORMAT = "lispetorch-tinylora"


def sidecar_path(path: str | os.PathLike) -> Path:
    """``tiny_lora_v.json`` beside ``tiny_lora_v.pt``: the modules adapted and the convention."""
    return Path(path).with_suffix(".json")


def tinylora_cores(model: nn.Module, adapter_name: str | None = None) -> dict[str, TinyLoraCore]:
    """The TinyLoRA cores of ``adapter_name`` (the active adapter by default), by module name."""
    name = adapter_name or active_adapter(model)
    return {n: layer.lora_R_fn[name] for n, layer in adapter_layers(model).items()
            if name in layer.lora_R_fn and isinstance(layer.lora_R_fn[name], (TinyLoraCore, TinyLoraDiagCore))}


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
    convention = "qwen-coder" if isinstance(first, TinyLoraDiagCore) else "paper"
    vectors = _vectors(cores)
    v = vectors[0].detach() if len(vectors) == 1 else torch.stack([p.detach() for p in vectors])
    if convention == "qwen-coder":
        v = v.to(torch.bfloat16)  # what the core computes with, and the trainer's dtype: nothing is lost
    if not torch.isfinite(v).all():
        raise AdapterStateError("the TinyLoRA vector holds non-finite values; nothing was written")
    rank = int(first.P.shape[1])
    state = {
        "global_v": v.cpu().clone(),
        "u_value": int(first.P.shape[0]),
        "rank": rank,
        "seed": int(first.seed),
        "model_id": model_id if model_id is not None else model_id_of(model),
        "total_replaced_layers": len(cores),
    }
    path = Path(path)
    if path.suffix == ".json":
        raise ConfigError(f"{path}: the checkpoint's own name must not end in .json (tiny_lora_v.json is written "
                          "beside it)")
    layers = adapter_layers(model)
    sidecar = {"format": SIDECAR_FORMAT, "convention": convention, "target_modules": list(cores),
               "groups": len(vectors), "u_value": state["u_value"], "rank": rank, "seed": state["seed"],
               "total_replaced_layers": len(cores),
               "dtype": str(layers[next(iter(cores))].lora_A[adapter_name or active_adapter(model)].dtype)
               .replace("torch.", "")}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic.write_text(sidecar_path(path), json.dumps(sidecar, indent=2) + "\n")
    atomic.write_bytes(path, buffer.getvalue())
    return path


def _integer(path: Path, state: dict, key: str, minimum: int) -> None:
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TinyLoraFormatError(f"{path}: field {key!r} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise TinyLoraFormatError(f"{path}: field {key!r} must be >= {minimum}, got {value}")


def read_tinylora(path: str | os.PathLike) -> dict:
    """Reads and checks a ``tiny_lora_v.pt`` (``torch.load`` with ``weights_only=True``: no code in the file
    runs) and, when it is there, the ``tiny_lora_v.json`` beside it.

    Every field is checked: ``global_v`` a finite floating-point tensor ``(u_value,)`` or ``(groups, u_value)``;
    ``u_value`` and ``rank`` positive integers; ``seed`` an integer; the optional ``model_id`` a string (or None)
    and ``total_replaced_layers`` a positive integer; the trainer's optional ``is_quantized``, ``validation_score``
    and ``step`` of their types. Fields of neither kind are ignored with a warning.

    Returns:
        dict: the fields, ``model_id`` and ``total_replaced_layers`` set to None when absent, and ``"sidecar"``:
        the ``tiny_lora_v.json`` contents or None.

    Raises:
        FileNotFoundError: no such file. TinyLoraFormatError: a file that is not such a dict, or a field missing or
            malformed (the message names the file and the field).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TinyLoRA checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TinyLoraFormatError(f"{path}: not a readable TinyLoRA checkpoint ({e})") from None
    if not isinstance(state, dict):
        raise TinyLoraFormatError(f"{path}: expected a dict, got {type(state).__name__}")
    missing = [f for f in REQUIRED if f not in state]
    if missing:
        raise TinyLoraFormatError(f"{path}: missing field(s) {missing}; a tiny_lora_v.pt holds {list(REQUIRED)} "
                                  "and optionally model_id and total_replaced_layers")
    _integer(path, state, "u_value", 1)
    _integer(path, state, "rank", 1)
    _integer(path, state, "seed", -(1 << 63))
    state.setdefault("model_id", None)
    state.setdefault("total_replaced_layers", None)
    if state["model_id"] is not None and not isinstance(state["model_id"], str):
        raise TinyLoraFormatError(f"{path}: field 'model_id' must be a string, got "
                                  f"{type(state['model_id']).__name__} {state['model_id']!r}")
    if state["total_replaced_layers"] is not None:
        _integer(path, state, "total_replaced_layers", 1)
    for key, types in EXTRA_FIELDS.items():
        if key in state and (not isinstance(state[key], types) or (bool not in types and isinstance(state[key],
                                                                                                   bool))):
            raise TinyLoraFormatError(f"{path}: field {key!r} must be {' or '.join(t.__name__ for t in types)}, got "
                                      f"{state[key]!r}")
    unknown = sorted(set(state) - set(FIELDS) - set(EXTRA_FIELDS), key=str)
    if unknown:
        warnings.warn(f"{path}: ignoring unknown field(s) {unknown}", stacklevel=2)
    v, u = state["global_v"], state["u_value"]
    if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() not in (1, 2) or v.shape[-1] != u \
            or v.numel() == 0:
        what = f"{v.dtype} tensor of shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
        raise TinyLoraFormatError(f"{path}: field 'global_v' must be a floating-point tensor (u_value,) or (groups, "
                                  f"u_value) with u_value = {u}, got a {what}")
    if not torch.isfinite(v).all():
        raise TinyLoraFormatError(f"{path}: field 'global_v' holds {int((~torch.isfinite(v)).sum())} non-finite "
                                  "value(s)")
    state["sidecar"] = _read_sidecar(path, state)
    return state


def _read_sidecar(path: Path, state: dict) -> dict | None:
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TinyLoraFormatError(f"{side}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        return None  # some other JSON of the same name: not ours, not used
    if data.get("convention") not in TINYLORA_CONVENTIONS:
        raise TinyLoraFormatError(f"{side}: field 'convention' must be one of {TINYLORA_CONVENTIONS}, got "
                                  f"{data.get('convention')!r}")
    targets = data.get("target_modules")
    if not (targets == "all-linear" or (isinstance(targets, list) and targets
                                        and all(isinstance(t, str) for t in targets))):
        raise TinyLoraFormatError(f"{side}: field 'target_modules' must be a non-empty list of module names, got "
                                  f"{targets!r}")
    v = state["global_v"]
    for key, have in (("u_value", state["u_value"]), ("rank", state["rank"]), ("seed", state["seed"]),
                      ("groups", 1 if v.dim() == 1 else v.shape[0])):
        if data.get(key) != have:
            raise TinyLoraFormatError(f"{side} does not belong to {path}: its {key!r} is {data.get(key)!r}, the "
                                      f"checkpoint's is {have!r}")
    return data


def file_convention(state: dict) -> str:
    """The convention a read ``tiny_lora_v.pt`` was written in: its ``tiny_lora_v.json``'s, else ``"qwen-coder"``
    for a bfloat16 vector (the TinyLoRA-Qwen-Coder trainer keeps ``v`` in bfloat16), else ``"paper"``."""
    if state.get("sidecar"):
        return state["sidecar"]["convention"]
    v = state["global_v"]
    return "qwen-coder" if v.dtype == torch.bfloat16 and v.dim() == 1 else "paper"


def restore_tinylora(model: nn.Module, path: str | os.PathLike, target_modules: list[str] | str | None = None,
                     exclude_modules: list[str] | str | None = None, adapter_name: str = "default") -> dict:
    """Rebuilds a TinyLoRA adapter from ``tiny_lora_v.pt`` on ``model`` and activates it.

    On a model without that adapter, injects :class:`TinyLoraConfig` with the file's rank, u, seed and convention
    on the modules the file's ``tiny_lora_v.json`` lists (or ``target_modules``); on a model that has it, checks
    that it matches and sets ``v``. A file of the TinyLoRA-Qwen-Coder trainer (no ``tiny_lora_v.json``, a
    bfloat16 ``global_v``) is rebuilt in its convention on the layers it replaces. Everything is checked before
    the model changes.

    Args:
        target_modules (list[str] | str | None): the modules to adapt; default those the file's
            ``tiny_lora_v.json`` names, else the trainer's ``q/k/v/o/gate/up/down_proj`` for its files, else
            ``"all-linear"``.

    Raises:
        TinyLoraFormatError: a missing field or a malformed file.
        AdapterFormatError: the model's adapted layers differ from the file's (the message names what differs).
    """
    state = read_tinylora(path)
    u, rank, seed, count = state["u_value"], state["rank"], state["seed"], state["total_replaced_layers"]
    v = state["global_v"]
    groups = 1 if v.dim() == 1 else v.shape[0]
    convention = file_convention(state)
    if target_modules is None:
        if state["sidecar"]:
            target_modules = state["sidecar"]["target_modules"]
        else:
            target_modules = QWEN_CODER_TARGETS if convention == "qwen-coder" else "all-linear"
    if state["model_id"] and model_id_of(model) and state["model_id"] != model_id_of(model):
        warnings.warn(f"{path} was written for model_id {state['model_id']!r}, the model is "
                      f"{model_id_of(model)!r}", stacklevel=2)
    cores = tinylora_cores(model, adapter_name)
    if cores:
        first = next(iter(cores.values()))
        have = {"u_value": first.P.shape[0], "rank": first.P.shape[1], "seed": first.seed,
                "total_replaced_layers": len(cores), "groups": len(_vectors(cores)),
                "convention": "qwen-coder" if isinstance(first, TinyLoraDiagCore) else "paper"}
        want = {"u_value": u, "rank": rank, "seed": seed, "total_replaced_layers": count if count is not None
                else len(cores), "groups": groups, "convention": convention}
        diff = [f"{k}: file {want[k]}, model {have[k]}" for k in want if want[k] != have[k]]
        if diff:
            raise AdapterFormatError(f"{path} does not match the model's TinyLoRA adapter {adapter_name!r}: "
                             + "; ".join(diff))
        with torch.no_grad():
            for k, p in enumerate(_vectors(cores)):
                p.copy_(v.reshape(groups, u)[k].to(p.dtype))
        return adapter_layers(model)
    dtype = (state["sidecar"] or {}).get("dtype")
    config = TinyLoraConfig(r=rank, u=u, seed=seed, groups=groups, target_modules=target_modules,
                            exclude_modules=exclude_modules, convention=convention,
                            dtype=dtype if dtype in ("float32", "float64", "bfloat16", "float16") else None)
    chosen = match_modules(model, config.target_modules, config.exclude_modules)
    if count is not None and len(chosen) != count:
        raise AdapterFormatError(f"{path} was written for {count} replaced layers (model_id "
                                 f"{state['model_id']!r}), but target_modules {target_modules!r} selects "
                                 f"{len(chosen)} layers of this model ({model_id_of(model)!r}); pass the "
                                 "target_modules used in training")
    return inject(model, config, adapter_name, v=v)
