"""Any adapter here as a plain PEFT LoRA on the original (pre-init) base weights.

An adapter with a core R is folded into ``B R``. An adapter whose init took ``s·B₀R₀A₀`` out of the base weight
(PiSSA, LoRA-GA, Rotational PiSSA) becomes the rank-2r LoRA ``B' = [B R | −B₀R₀]``, ``A' = [A; A₀]`` with alpha
doubled (× √2 with rsLoRA) so the scaling is unchanged: on the original W it adds ``s·(BRA − B₀R₀A₀)``, which is
exactly what the adapted model adds to the original weight (PEFT's ``path_initial_model_for_weight_conversion``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from .. import _atomic
from ..model import adapter_layers
from ..peft_io import PREFIX, peft_config, write_peft_files


def _with_core(B: torch.Tensor, R: torch.Tensor | None) -> torch.Tensor:
    if R is None:
        return B.detach()
    return (B.detach().float() @ R.detach().float()).to(B.dtype)  # (out, r)


@torch.no_grad()
def lora_equivalent(model: nn.Module, adapter_name: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The PEFT tensors and ``adapter_config.json`` of the plain LoRA equivalent to ``adapter_name``.

    Raises:
        ValueError: no such adapter, it is merged, or it mixes layers that one PEFT config cannot describe.
    """
    from ..model import active_adapter

    layers = adapter_layers(model)
    name = adapter_name or active_adapter(model)
    holding = {n: layer for n, layer in layers.items() if name in layer.lora_A}
    if not holding:
        raise ValueError(f"no adapter named {name!r} in the model")
    merged = [n for n, layer in holding.items() if layer.merged_adapter == name]
    if merged:
        raise ValueError(f"adapter {name!r} is merged into {merged[0]!r}: unmerge before converting")
    tensors, ranks, alphas, dropouts, rslora, fan = {}, {}, {}, {}, set(), set()
    for mod, layer in holding.items():
        A, B, R = layer.factors(name)
        B = _with_core(B, R)
        alpha, r = layer.lora_alpha[name], layer.r[name]
        if name in layer.base_offset:
            off = layer.base_offset[name]
            if not math.isclose(off.scale, layer.scaling[name]):
                raise ValueError(f"{mod!r}: the base offset's scale {off.scale} differs from the adapter's "
                                 f"{layer.scaling[name]}")
            A = torch.cat([A.detach(), off.A.to(A.dtype)], dim=0)  # (2r, in)
            B = torch.cat([B, -_with_core(off.B, off.R).to(B.dtype)], dim=1)  # (out, 2r)
            r = 2 * r
            alpha = alpha * (math.sqrt(2) if layer.use_rslora[name] else 2)
        tensors[f"{PREFIX}{mod}.lora_A.weight"] = A.detach().contiguous()
        tensors[f"{PREFIX}{mod}.lora_B.weight"] = B.contiguous()
        ranks[mod], alphas[mod] = r, alpha
        dropouts[mod] = layer.lora_dropout[name]
        rslora.add(layer.use_rslora[name])
        fan.add(layer.fan_in_fan_out)
    if len(rslora) > 1 or len(fan) > 1:
        raise ValueError(f"adapter {name!r} mixes rsLoRA and plain scaling, or Linear and Conv1D layers, which one "
                         "PEFT config cannot hold")
    return tensors, peft_config(model, list(ranks), ranks, alphas, dropouts, rslora.pop(), fan == {True})


def save_as_lora(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Writes ``adapter_name`` (the active one by default) as a plain PEFT LoRA directory that applies to the
    original base weights, atomically. PEFT's ``PeftModel.from_pretrained`` on the original model then gives
    this model's outputs (up to the rounding of an NF4-quantised residual, which the original weights do not
    have).

    Returns:
        Path: the directory.
    """
    tensors, config = lora_equivalent(model, adapter_name)
    directory = Path(directory)
    with _atomic.directory(directory) as tmp:
        write_peft_files(tmp, tensors, config)
    return directory
