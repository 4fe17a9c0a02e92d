"""The adapter module: a frozen linear layer plus named low-rank adapters, computed by the native operator."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from . import ops
from .config import scaling
from .nf4 import nf4_lora_linear


def conv1d_type():
    """transformers' GPT-2 ``Conv1D`` (weight stored ``(in, out)``), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def is_adaptable(module: nn.Module) -> bool:
    """True for the layers an adapter can wrap: ``nn.Linear``, transformers' ``Conv1D`` and ``NF4Linear``."""
    conv1d = conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)) or \
        getattr(module, "quantized", False)


def weight_out_in(layer: nn.Module) -> torch.Tensor:
    """The weight of an adaptable layer as ``(out, in)``: a transposed view for ``Conv1D`` (stored ``(in, out)``),
    the dequantised weight for ``NF4Linear``."""
    conv1d = conv1d_type()
    return layer.weight.t() if conv1d is not None and isinstance(layer, conv1d) else layer.weight


class LoraLinear(nn.Module):
    """A frozen linear layer with low-rank adapters: ``y = x Wᵀ + b + s · ((drop(x) Aᵀ) Rᵀ) Bᵀ``.

    Holds any number of named adapters, one active at a time. Each adapter owns its factors and its rank,
    alpha, scaling and dropout, so merging never needs a global hyperparameter. The base layer is an
    ``nn.Linear`` (weight ``(out, in)``) or a GPT-2 ``Conv1D`` (weight ``(in, out)``, ``fan_in_fan_out``).

    Args:
        base_layer (nn.Module): the layer to adapt; its parameters are frozen.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not is_adaptable(base_layer):
            raise TypeError(f"can only adapt nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, conv1d_type() or ())
        out_features, in_features = self.base_weight().shape
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_R = nn.ParameterDict()
        # Adapters whose r×r core is computed from parameters at every forward (rotations, TinyLoRA's Σ vᵢPᵢ):
        # a module whose forward() returns R (r, r); autograd flows through it into the operator's R input.
        self.lora_R_fn = nn.ModuleDict()
        # Which of "A", "B", "R" stay frozen when the adapter is active (empty: all train, as in LoRA).
        self.frozen_factors: dict[str, frozenset[str]] = {}
        # Adapters whose init took a delta out of the base weight (PiSSA, LoRA-GA, Rotational PiSSA): a module
        # holding that delta's factors (buffers A, B, R and its scale), so W_original = W + scale·B R A.
        self.base_offset = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.active_adapter: str | None = None
        self.enabled = True
        self.merged_adapter: str | None = None
        self._merge_versions: tuple[int, ...] | None = None
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.train(base_layer.training)  # an adapter injected into a model in eval mode is in eval mode too

    # --- factors -------------------------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The base weight as ``(out, in)`` (a transposed view for ``Conv1D``)."""
        return weight_out_in(self.base_layer)

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        dtype: torch.dtype | None = None,
    ) -> None:
        """Adds adapter ``name`` of rank ``r``: A Kaiming-uniform (a=√5) or Gaussian (std 1/r), B zeros."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        w = self.base_weight()
        dtype = dtype or w.dtype
        A = torch.empty(r, self.in_features, dtype=dtype, device=w.device)  # (r, in)
        B = torch.zeros(self.out_features, r, dtype=dtype, device=w.device)  # (out, r)
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.set_factors(name, A, B, alpha=alpha, dropout=dropout, use_rslora=use_rslora)

    def set_factors(
        self,
        name: str,
        A: torch.Tensor,
        B: torch.Tensor,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        R: torch.Tensor | None = None,
        R_fn: nn.Module | None = None,
        frozen: tuple[str, ...] | frozenset[str] = (),
    ) -> None:
        """Installs (or replaces) adapter ``name`` with the given factors ``A (r, in)``, ``B (out, r)``.

        Args:
            R (Tensor | None): a trained (or frozen) core ``(r, r)``.
            R_fn (nn.Module | None): instead of ``R``, a module whose ``forward()`` returns the core ``(r, r)``,
                called at every forward; its parameters are the core's trainable parameters.
            frozen (tuple[str, ...]): which of ``"A"``, ``"B"``, ``"R"`` do not train when the adapter is active.
        """
        if self.merged_adapter == name:
            raise RuntimeError(f"adapter {name!r} is merged into the weight: unmerge it first")
        r = A.shape[0]
        if A.shape != (r, self.in_features) or B.shape != (self.out_features, r):
            raise ValueError(
                f"adapter {name!r}: expected A ({r}, {self.in_features}) and B ({self.out_features}, {r}), "
                f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
            )
        if R is not None and R_fn is not None:
            raise ValueError(f"adapter {name!r}: give R or R_fn, not both")
        if R is not None and R.shape != (r, r):
            raise ValueError(f"adapter {name!r}: expected R ({r}, {r}), got {tuple(R.shape)}")
        unknown = set(frozen) - {"A", "B", "R"}
        if unknown:
            raise ValueError(f"adapter {name!r}: frozen names factors {sorted(unknown)}; factors are A, B, R")
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        if R is not None:
            self.lora_R[name] = nn.Parameter(R)
        elif name in self.lora_R:
            del self.lora_R[name]
        if R_fn is not None:
            self.lora_R_fn[name] = R_fn
        elif name in self.lora_R_fn:
            del self.lora_R_fn[name]
        self.frozen_factors[name] = frozenset(frozen)
        self.r[name] = r
        self.lora_alpha[name] = float(alpha)
        self.use_rslora[name] = bool(use_rslora)
        self.scaling[name] = scaling(alpha, r, use_rslora)
        self.lora_dropout[name] = float(dropout)
        if self.active_adapter is None:
            self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Removes adapter ``name`` (it must not be merged). An adapter whose init took a delta out of the base
        weight (PiSSA, LoRA-GA, Rotational PiSSA) puts it back (to float rounding; not into an NF4 base)."""
        if self.merged_adapter == name:
            raise RuntimeError(f"adapter {name!r} is merged into the weight: unmerge it first")
        if name in self.base_offset:
            if getattr(self.base_layer, "quantized", False):
                warnings.warn(f"adapter {name!r}: the base weight is quantised, its init offset is not put back",
                              stacklevel=2)
            else:
                off = self.base_offset[name]
                with torch.no_grad():
                    w = self.base_weight()
                    w.copy_((w.float() + ops.lora_delta(off.A, off.B, off.R, off.scale, torch.float32)).to(w.dtype))
        for d in (self.lora_A, self.lora_B, self.lora_R, self.lora_R_fn, self.base_offset):
            if name in d:
                del d[name]
        for d in (self.r, self.lora_alpha, self.scaling, self.lora_dropout, self.use_rslora, self.frozen_factors):
            d.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.lora_A.keys()), None)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(A, B, R)`` of adapter ``name``; R is None without a core, and computed when it is parametrised."""
        if name in self.lora_R_fn:
            R = self.lora_R_fn[name]()
            A = self.lora_A[name]
            if R.dtype != A.dtype:  # cores compute in float32; the factors may be kept in another dtype
                R = R.to(A.dtype)
        else:
            R = self.lora_R[name] if name in self.lora_R else None
        return self.lora_A[name], self.lora_B[name], R

    def adapter_parameters(self, name: str) -> dict[str, list[nn.Parameter]]:
        """The parameters of adapter ``name`` by factor: ``{"A": [...], "B": [...], "R": [...]}``."""
        params = {"A": [self.lora_A[name]], "B": [self.lora_B[name]], "R": []}
        if name in self.lora_R:
            params["R"].append(self.lora_R[name])
        if name in self.lora_R_fn:
            params["R"].extend(self.lora_R_fn[name].parameters())
        return params

    def set_trainable(self, name: str, trainable: bool) -> None:
        """Turns training of adapter ``name`` on (its factors that are not frozen) or off (all of them)."""
        frozen = self.frozen_factors.get(name, frozenset())
        for which, params in self.adapter_parameters(name).items():
            for p in params:
                p.requires_grad_(trainable and which not in frozen)

    # --- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if not self.enabled or name is None or self.merged_adapter is not None:
            return self.base_layer(x)
        quantized = getattr(self.base_layer, "quantized", False)
        w = None if quantized else self.base_weight()
        dtype = self.base_layer.qweight.dtype if quantized else w.dtype
        A, B, R = self.factors(name)
        if A.dtype != dtype or B.dtype != dtype or (R is not None and R.dtype != dtype):
            A, B, R = A.to(dtype), B.to(dtype), (R.to(dtype) if R is not None else None)  # compute in W's dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        p = self.lora_dropout[name] if self.training else 0.0
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        if quantized:  # the weight is dequantised in forward and again in backward, never kept
            return nf4_lora_linear(x, self.base_layer, A, B, R, self.scaling[name], p, seed)
        return ops.lora_linear(x, w, self.base_layer.bias, A, B, R, self.scaling[name], p, seed)

    # --- merge ---------------------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    def _versions(self, name: str) -> tuple[int, ...]:
        params = [p for ps in self.adapter_parameters(name).values() for p in ps]
        return tuple(t._version for t in (self.base_layer.weight, *params))

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """Folds the active adapter into the base weight. Merging twice is merging once.

        Keeps 1 byte per weight element (plus rare exceptions) so that :meth:`unmerge` is exact.
        """
        if self.merged_adapter is not None or self.active_adapter is None:
            return
        if getattr(self.base_layer, "quantized", False):
            raise RuntimeError("cannot merge into a quantised (NF4) base weight; use lispetorch.save_as_lora, or "
                               "dequantise the base first")
        name = self.active_adapter
        A, B, R = self.factors(name)
        distance, index, values = ops.lora_merge_(self.base_weight(), A, B, R, self.scaling[name], safe)
        self.register_buffer("merge_distance", distance, persistent=False)
        self.register_buffer("merge_index", index, persistent=False)
        self.register_buffer("merge_values", values, persistent=False)
        self.merged_adapter = name
        self._merge_versions = self._versions(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtracts the merged adapter; bit-exact if nothing changed the weight or the factors since."""
        name = self.merged_adapter
        if name is None:
            return
        A, B, R = self.factors(name)
        state = (self.merge_distance, self.merge_index, self.merge_values)
        if self._versions(name) != self._merge_versions:
            warnings.warn(
                f"the weight or adapter {name!r} changed while merged: unmerging by subtraction (not bit-exact)",
                stacklevel=2,
            )
            state = None
        ops.lora_unmerge_(self.base_weight(), A, B, R, self.scaling[name], state)
        for buf in ("merge_distance", "merge_index", "merge_values"):
            delattr(self, buf)
        self.merged_adapter = None
        self._merge_versions = None

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={r}" for n, r in self.r.items())
        return f"in={self.in_features}, out={self.out_features}, adapters=[{ranks}], active={self.active_adapter!r}"
