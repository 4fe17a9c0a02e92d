"""The adapter module: a frozen linear layer plus named low-rank adapters, computed by the native operator.

Layout: the base weight is ``(out, in)`` (a transposed view of GPT-2's ``Conv1D``, stored ``(in, out)``), and
each adapter's factors are ``A (r, in)``, ``B (out, r)`` and optionally ``R (r, r)``, so that
``y = x Wᵀ + b + s · ((drop(x) Aᵀ) Rᵀ) Bᵀ``; a DoRA adapter adds a magnitude ``m (out,)`` and computes
``y = g ⊙ (x Wᵀ + s · ((drop(x) Aᵀ) Rᵀ) Bᵀ) + b`` with ``g = m / ‖W + s·B R A‖`` per output row.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import warnings
import weakref
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .errors import AdapterStateError, ConfigError, ShapeError, merged_error
from .hf import is_conv1d, is_dense_linear, weight_out_in
from .nf4 import NF4Linear, NF4Weight
from .peft_format import scaling
from .switch import AdapterSwitch, WrapsBaseLayer

FACTORS = ("A", "B", "R", "M")  # M: a DoRA adapter's magnitude


def init_factors(r: int, in_features: int, out_features: int, init: str = "kaiming", dtype=None,
                 device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA's starting factors: ``A (r, in)`` Kaiming-uniform with a=√5 (PEFT's default) or, for ``"gaussian"``,
    normal with std 1/r; ``B (out, r)`` zeros, so the adapter adds nothing at init."""
    A = torch.empty(r, in_features, dtype=dtype, device=device)  # (r, in)
    B = torch.zeros(out_features, r, dtype=dtype, device=device)  # (out, r)
    if init == "gaussian":
        nn.init.normal_(A, std=1.0 / r)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return A, B


def is_adaptable(module: nn.Module) -> bool:
    """True for the layers an adapter can wrap: ``nn.Linear``, transformers' ``Conv1D`` and ``NF4Linear``."""
    return is_dense_linear(module) or isinstance(module, NF4Linear)


def base_of(module: nn.Module) -> nn.Module:
    """The frozen layer itself: a :class:`LoraLinear`'s base layer, or ``module`` when it is not adapted."""
    return module.base_layer if isinstance(module, LoraLinear) else module


# --- what the adapter asks of its base layer, by storage ------------------------------------------------------
@functools.singledispatch
def compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the fused operator computes in over ``base``: its weight's."""
    return base.weight.dtype


@compute_dtype.register
def _(base: NF4Linear) -> torch.dtype:
    return base.weight_dtype


@functools.singledispatch
def fused_linear(base: nn.Module, x, A, B, R, scale: float, dropout: float, seed: int) -> torch.Tensor:
    """``x Wᵀ + b + scale · ((drop(x) Aᵀ) Rᵀ) Bᵀ`` over a dense base (``nn.Linear``, ``Conv1D``)."""
    return ops.lora_linear(x, weight_out_in(base), base.bias, A, B, R, scale, dropout, seed)


@fused_linear.register
def _(base: NF4Linear, x, A, B, R, scale: float, dropout: float, seed: int) -> torch.Tensor:
    return base.lora_linear(x, A, B, R, scale, dropout, seed)


@functools.singledispatch
def fused_dora_linear(base: nn.Module, x, A, B, R, m, scale: float, dropout: float, seed: int,
                      keep_output: bool = True) -> torch.Tensor:
    """DoRA's ``g ⊙ (x Wᵀ + scale · ((drop(x) Aᵀ) Rᵀ) Bᵀ) + b`` over a dense base (``nn.Linear``, ``Conv1D``)."""
    return ops.dora_linear(x, weight_out_in(base), base.bias, A, B, R, m, scale, dropout, seed, keep_output)


@fused_dora_linear.register
def _(base: NF4Linear, x, A, B, R, m, scale: float, dropout: float, seed: int,
      keep_output: bool = True) -> torch.Tensor:
    raise AdapterStateError(f"a DoRA adapter needs a dense base weight; this layer's is NF4 "
                            f"({base.out_features}×{base.in_features})")


def warm_dispatch(cls: type) -> None:
    """Fills the per-class dispatch caches of :func:`compute_dtype` and :func:`fused_linear` for ``cls`` before any
    forward: ``torch.compile`` guards on those caches, and one filled during the first compiled call would make
    the second recompile."""
    compute_dtype.dispatch(cls)
    fused_linear.dispatch(cls)
    fused_dora_linear.dispatch(cls)


warm_dispatch(NF4Linear)  # quantize_nf4 puts it under existing adapters


def weight_fingerprint(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-row fingerprint of a weight ``(out, in)``'s values: the XOR of each row's values (as 64-bit patterns,
    ``torch.hash_tensor``) and the sum of their bit patterns, two ``(out,)`` tensors. Any change of one value
    changes both; so do changes of several values in a row, but for changes built to cancel in both."""
    bits = w.detach().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[w.element_size()])
    return torch.hash_tensor(w.detach(), dim=1), bits.sum(dim=1, dtype=torch.int64)  # (out,), (out,)


def _sharded(w: torch.Tensor) -> bool:
    # torch.distributed.tensor takes a second or more to import: a model that holds none of its tensors never does
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(w, module.DTensor)


def local_part(w: torch.Tensor) -> torch.Tensor:
    """This process's part of ``w``: its shard of a sharded tensor (FSDP2's ``DTensor``), else ``w``."""
    return w.to_local() if _sharded(w) else w


@contextlib.contextmanager
def whole_weight(w: torch.Tensor):
    """``w`` to merge into: ``w`` itself, or a sharded ``w`` (FSDP2) gathered whole on every process at once, each
    process's shard written back from it when the block ends without an error (so a refused merge changes
    nothing). Every process must enter it, in the same order, as for any collective."""
    if not _sharded(w):
        yield w
        return
    module = sys.modules["torch.distributed.tensor"]
    whole = w.full_tensor()
    yield whole
    local_part(w).copy_(module.distribute_tensor(whole, w.device_mesh, w.placements).to_local())


# --- one adapter -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterSettings:
    """An adapter's hyperparameters: rank, alpha, the scaling they give, dropout, and which factors stay frozen."""

    r: int
    alpha: float
    use_rslora: bool = False
    dropout: float = 0.0
    frozen: frozenset[str] = frozenset()

    @property
    def scaling(self) -> float:
        return scaling(self.alpha, self.r, self.use_rslora)


class BaseOffset(nn.Module):
    """The factors of the delta an SVD init took out of the base weight: ``W_original = W + s·B R A``."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, R: torch.Tensor | None, scale: float) -> None:
        super().__init__()
        self.register_buffer("A", A.detach().clone())
        self.register_buffer("B", B.detach().clone())
        self.register_buffer("R", None if R is None else R.detach().clone())
        self.scale = float(scale)

    def delta(self) -> torch.Tensor:
        """``s·B R A`` ``(out, in)`` in float32."""
        return ops.lora_delta(self.A, self.B, self.R, self.scale, torch.float32)


class NF4Factors(nn.Module):
    """An adapter's frozen ``A`` and ``B`` stored in NF4 (about 4.5 bits a value), dequantised at each use."""

    def __init__(self, A: NF4Weight, B: NF4Weight, dtype: torch.dtype) -> None:
        super().__init__()
        self.A_nf4, self.B_nf4 = A, B
        self.dtype = dtype

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A_nf4.dequantize(self.dtype), self.B_nf4.dequantize(self.dtype)


class NF4BaseOffset(BaseOffset):
    """A :class:`BaseOffset` whose ``A`` and ``B`` are the adapter's own NF4-stored frozen factors (shared, not
    copied)."""

    def __init__(self, factors: NF4Factors, R: torch.Tensor | None, scale: float) -> None:
        nn.Module.__init__(self)
        self.factors = factors
        self.register_buffer("R", None if R is None else R.detach().clone())
        self.scale = float(scale)

    @property
    def A(self) -> torch.Tensor:  # noqa: N802  (the factor's name)
        return self.factors.dequantize()[0]

    @property
    def B(self) -> torch.Tensor:  # noqa: N802
        return self.factors.dequantize()[1]


def refresh_after_load(layer: LoraLinear, incompatible_keys) -> None:
    """After ``load_state_dict`` (whose ``assign=True`` puts new parameter objects in place): the compiled view."""
    layer.compiled_view()


class LoraLinear(AdapterSwitch, WrapsBaseLayer, nn.Module):
    """A frozen linear layer with low-rank adapters: ``y = x Wᵀ + b + s · ((drop(x) Aᵀ) Rᵀ) Bᵀ``.

    Holds any number of named adapters, one active at a time. Each adapter owns its factors (in ``lora_A``,
    ``lora_B``, ``lora_R``, or a module computing R in ``lora_R_fn``; these containers give the ``state_dict`` its
    PEFT-like keys) and its :class:`AdapterSettings` (rank, alpha, scaling, dropout), so merging never needs a
    global hyperparameter. The base layer is an ``nn.Linear`` (weight ``(out, in)``), a GPT-2 ``Conv1D`` (weight
    ``(in, out)``, ``fan_in_fan_out``) or an :class:`~lispetorch.NF4Linear`.

    Args:
        base_layer (nn.Module): the layer to adapt; its parameters are frozen.
    """

    # One dropout seed per sample of the next batches (set by a data-parallel trainer, which keys each on the
    # sample, so that every process count draws the same masks); None: one seed drawn per call from torch's RNG.
    dropout_seeds: list[int] | None = None
    # DoRA adapters: True, backward computes the base product again for the magnitude's gradient instead of keeping
    # the layer's output (see ops.dora_linear's keep_output); set by set_dora_recompute.
    dora_recompute: bool = False
    # DoRA adapters: True, a forward that trains nothing keeps g = m / ‖W + s·B R A‖ for the next one, while the
    # tensors it came from are unchanged (see dora_scale_cached); set by lispetorch.dora_caching.
    dora_caching: bool = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not is_adaptable(base_layer):
            raise TypeError(f"can only adapt nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.out_features, self.in_features = (base_layer.out_features, base_layer.in_features) \
            if isinstance(base_layer, NF4Linear) else self.base_weight().shape
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.lora_R = nn.ParameterDict()  # name -> (r, r), for adapters with a core given as a tensor
        # Adapters whose r×r core is computed from parameters at every forward (rotations, TinyLoRA's Σ vᵢPᵢ):
        # a module whose forward() returns R (r, r); autograd flows through it into the operator's R input.
        self.lora_R_fn = nn.ModuleDict()
        # Adapters whose frozen A and B are stored in NF4 (lora_A / lora_B then hold empty placeholders).
        self.lora_nf4 = nn.ModuleDict()
        # Adapters whose init took a delta out of the base weight (PiSSA, LoRA-GA, Rotational PiSSA).
        self.base_offset = nn.ModuleDict()
        # DoRA adapters' magnitudes m (out,), PEFT's name for them.
        self.lora_magnitude_vector = nn.ParameterDict()
        self.settings: dict[str, AdapterSettings] = {}
        # What a compiled forward reads (see compiled_view): the factors of the adapter that gives the layer its
        # shapes, and a 0-d gate, its scaling when it runs and 0 when the base alone does. Switching adapters or
        # turning them off changes which tensors are held and the gate's value, never the traced code.
        # (A plain attribute, not a buffer: it is state, not a weight; _apply moves it with the module.)
        self.compiled_gate = torch.zeros((), device=next(t.device for t in (*base_layer.parameters(),
                                                                              *base_layer.buffers())))
        self.compiled_factors: tuple | None = None
        self._active_adapter: str | None = None
        self._enabled = True
        self.merged_adapter: str | None = None
        self._merge_versions: tuple[int, ...] | None = None
        self.register_load_state_dict_post_hook(refresh_after_load)
        self._merge_fingerprint: tuple[torch.Tensor, torch.Tensor] | None = None
        # A mixed-adapter batch: the adapter of each sample (None: the base alone), set for one forward of the
        # model (see lispetorch.adapters.accept_adapter_names).
        self.batch_adapters: tuple[str | None, ...] | None = None
        # DoRA's g by adapter name, with what it was computed from (dora_scale_cached).
        self.dora_cache: dict[str, tuple[tuple, tuple, torch.Tensor]] = {}
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.train(base_layer.training)  # an adapter injected into a model in eval mode is in eval mode too
        warm_dispatch(type(base_layer))

    def state_changed(self) -> None:
        """A switch of adapter, or on/off: what the compiled forward reads (:meth:`compiled_view`)."""
        self.compiled_view()

    def __getstate__(self) -> dict:
        # the DoRA cache holds weak references (not picklable) to this layer's own tensors: copies start without it
        state = self.__dict__.copy()
        state["dora_cache"] = {}
        return state

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.compiled_gate = fn(self.compiled_gate)  # to the module's device (and dtype)
        self.compiled_view()  # a conversion may have made new parameter objects
        return out

    @torch.no_grad()
    def compiled_view(self) -> None:
        """Sets what a compiled forward reads from the adapters' state: the factors of the active adapter (or, when
        none runs here, of the first one, for their shapes) and the gate (the scaling when the active adapter runs,
        else 0). Called at every change of that state, so the compiled code never reads it and recompiles. Code
        that puts new parameter objects into the adapter's containers behind the layer's back (FSDP's sharding)
        calls it after, or :func:`~lispetorch.set_adapter`, which does."""
        names = list(self.lora_A.keys())
        if not names:
            self.compiled_factors = None
            return
        name = self._active_adapter if self._active_adapter in self.lora_A else names[0]
        runs = self._enabled and self._active_adapter in self.lora_A and self.merged_adapter is None
        # A DoRA magnitude only while its adapter runs: a layer whose adapter is off computes the base alone
        # (switching a DoRA adapter on or off recompiles once for each state).
        magnitude = self.lora_magnitude_vector[name] if runs and name in self.lora_magnitude_vector else None
        self.compiled_factors = (self.lora_A[name], self.lora_B[name], self.lora_R[name] if name in self.lora_R
                                 else None, self.lora_R_fn[name] if name in self.lora_R_fn else None,
                                 self.settings[name].dropout, magnitude)
        if self.compiled_gate.is_inference() and not torch.is_inference_mode_enabled():
            self.compiled_gate = self.compiled_gate.clone()  # made under inference_mode: not writable outside it
        self.compiled_gate.fill_(self.settings[name].scaling if runs else 0.0)

    # --- a stand-in for the wrapped layer ---------------------------------------------------------------------
    # Model code reads attributes of the layers it built (``self.dt_proj.weight @ x``, ``self.gate.weight.dtype``,
    # ``self.c_attn.nf``); an adapted layer answers with its base layer's, as PEFT's adapter layers do: its weight
    # and bias here, anything else through WrapsBaseLayer.
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, as the base layer stores it (``(in, out)`` for ``Conv1D``; for an
        ``NF4Linear``, its dequantised ``(out, in)`` copy). The adapter's delta is not in it unless merged."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (None without one)."""
        return self.base_layer.bias

    # PEFT's LoraLayer attribute names, as read-only views of the settings.
    def _view(self, field: str) -> MappingProxyType:
        return MappingProxyType({n: getattr(s, field) for n, s in self.settings.items()})

    @property
    def r(self) -> MappingProxyType:
        """Rank by adapter name."""
        return self._view("r")

    @property
    def lora_alpha(self) -> MappingProxyType:
        """Alpha by adapter name."""
        return self._view("alpha")

    @property
    def scaling(self) -> MappingProxyType:
        """Scaling ``s`` by adapter name."""
        return self._view("scaling")

    @property
    def lora_dropout(self) -> MappingProxyType:
        """Dropout probability by adapter name."""
        return self._view("dropout")

    @property
    def use_rslora(self) -> MappingProxyType:
        """Whether the scaling is rsLoRA's, by adapter name."""
        return self._view("use_rslora")

    @property
    def use_dora(self) -> MappingProxyType:
        """Whether the adapter is a DoRA adapter (has a magnitude), by adapter name."""
        return MappingProxyType({n: n in self.lora_magnitude_vector for n in self.settings})

    # --- factors -------------------------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The base weight as ``(out, in)`` (a transposed view for ``Conv1D``, dequantised for ``NF4Linear``)."""
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
            raise AdapterStateError(f"adapter {name!r} already exists on this layer")
        w = self.base_weight()
        A, B = init_factors(r, self.in_features, self.out_features, init, dtype or w.dtype, w.device)
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

        Raises:
            AdapterStateError: the adapter is merged. ValueError: factors whose shapes do not fit the layer.
        """
        if self.merged_adapter == name:
            raise merged_error(name)
        r = A.shape[0]
        if A.shape != (r, self.in_features) or B.shape != (self.out_features, r):
            raise ShapeError(
                f"adapter {name!r}: expected A ({r}, {self.in_features}) and B ({self.out_features}, {r}), "
                f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
            )
        if R is not None and R_fn is not None:
            raise ConfigError(f"adapter {name!r}: give R or R_fn, not both")
        if R is not None and R.shape != (r, r):
            raise ShapeError(f"adapter {name!r}: expected R ({r}, {r}), got {tuple(R.shape)}")
        unknown = set(frozen) - set(FACTORS)
        if unknown:
            raise ConfigError(f"adapter {name!r}: frozen names factors {sorted(unknown)}; factors are A, B, R, M")
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        for container in (self.lora_nf4, self.lora_magnitude_vector):  # new factors: a magnitude is set again
            if name in container:
                del container[name]
        for container, value in ((self.lora_R, None if R is None else nn.Parameter(R)), (self.lora_R_fn, R_fn)):
            if value is not None:
                container[name] = value
            elif name in container:
                del container[name]
        self.settings[name] = AdapterSettings(r, float(alpha), bool(use_rslora), float(dropout), frozenset(frozen))
        if self.active_adapter is None:
            self.active_adapter = name
        self.compiled_view()

    @torch.no_grad()
    def set_magnitude(self, name: str, magnitude: torch.Tensor | None = None) -> None:
        """Makes adapter ``name`` a DoRA adapter with magnitude ``magnitude`` ``(out,)``, or, when None, the row
        norms ``‖W + s·B R A‖`` of the weight as installed now (so the layer's output does not change).

        Raises:
            AdapterStateError: the adapter is merged, or the base is NF4. ShapeError: a magnitude that is not
                ``(out,)`` (both shapes named).
        """
        if self.merged_adapter == name:
            raise merged_error(name)
        if isinstance(self.base_layer, NF4Linear):
            raise AdapterStateError(f"adapter {name!r}: DoRA needs a dense base weight; this layer's is NF4 "
                                    f"({self.out_features}×{self.in_features})")
        A, B, R = self.factors(name)
        w = self.base_weight()
        if magnitude is None:
            magnitude = ops.dora_norm(w, A.to(w.dtype), B.to(w.dtype), None if R is None else R.to(w.dtype),
                                      self.settings[name].scaling)
        elif tuple(magnitude.shape) != (self.out_features,):
            raise ShapeError(f"adapter {name!r}: the DoRA magnitude has shape {tuple(magnitude.shape)} but the layer "
                             f"needs ({self.out_features},) (weight {self.out_features}×{self.in_features})")
        trains = self.lora_A[name].requires_grad or self.lora_B[name].requires_grad
        self.lora_magnitude_vector[name] = nn.Parameter(magnitude.detach().to(A.dtype).clone(),
                                                        requires_grad=trains and "M" not in self.settings[name].frozen)
        self.compiled_view()

    def set_base_offset(self, name: str) -> None:
        """Takes ``s·B R A`` of adapter ``name``'s installed factors out of the base weight and records it, so that
        the adapted layer's output is the base layer's at init (PiSSA, LoRA-GA, Rotational PiSSA)."""
        A, B, R = self.factors(name)
        offset = BaseOffset(A, B, R, self.settings[name].scaling)
        with torch.no_grad():
            w = self.base_weight()
            w.copy_((w.float() - offset.delta()).to(w.dtype))
        self.base_offset[name] = offset

    def delete_adapter(self, name: str) -> None:
        """Removes adapter ``name`` (it must not be merged). An adapter whose init took a delta out of the base
        weight (PiSSA, LoRA-GA, Rotational PiSSA) puts it back (to float rounding; not into an NF4 base)."""
        if self.merged_adapter == name:
            raise merged_error(name)
        if name in self.base_offset:
            if isinstance(self.base_layer, NF4Linear):
                warnings.warn(f"adapter {name!r}: the base weight is quantised, its init offset is not put back",
                              stacklevel=2)
            else:
                with torch.no_grad():
                    w = self.base_weight()
                    w.copy_((w.float() + self.base_offset[name].delta()).to(w.dtype))
        for d in (self.lora_A, self.lora_B, self.lora_R, self.lora_R_fn, self.base_offset, self.lora_nf4,
                  self.lora_magnitude_vector):
            if name in d:
                del d[name]
        self.settings.pop(name, None)
        self.dora_cache.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.lora_A.keys()), None)
        self.compiled_view()

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(A, B, R)`` of adapter ``name``; R is None without a core, and computed when it is parametrised;
        A and B dequantised when they are stored in NF4."""
        # The containers' own dicts, read directly (nn.Module's attribute lookup, at every forward of every adapted
        # layer, is most of the cost of a forward that decodes one token).
        mods = self._modules
        nf4 = mods["lora_nf4"]._modules
        if name in nf4:
            A, B = nf4[name].dequantize()
        else:
            A, B = mods["lora_A"]._parameters[name], mods["lora_B"]._parameters[name]
        cores = mods["lora_R_fn"]._modules
        if name in cores:
            R = cores[name]()
            if R.dtype != A.dtype:  # cores compute in float32; the factors may be kept in another dtype
                R = R.to(A.dtype)
        else:
            R = mods["lora_R"]._parameters.get(name)
        return A, B, R

    @torch.no_grad()
    def store_factors_nf4(self, name: str, A: NF4Weight, B: NF4Weight) -> None:
        """Stores adapter ``name``'s frozen ``A`` and ``B`` as the NF4 tensors ``A`` and ``B``, which must
        dequantise to them exactly (quantise the factors before installing them); the dense copies are freed, and
        the base offset, when it holds the same factors, shares the NF4 ones.

        Raises:
            AdapterStateError: A or B trains, or the adapter is merged. ValueError: NF4 tensors that are not the
                installed factors.
        """
        if self.merged_adapter == name:
            raise merged_error(name)
        if not {"A", "B"} <= self.settings[name].frozen:
            raise AdapterStateError(f"adapter {name!r}: only frozen A and B can be stored in NF4")
        A0, B0 = self.lora_A[name], self.lora_B[name]
        nf4 = NF4Factors(A, B, A0.dtype)
        qa, qb = nf4.dequantize()
        if qa.shape != A0.shape or qb.shape != B0.shape or not torch.equal(qa, A0) or not torch.equal(qb, B0):
            raise ShapeError(f"adapter {name!r}: the NF4 factors are not the installed A and B")
        offset = self.base_offset[name] if name in self.base_offset else None
        same = offset is not None and torch.equal(offset.A, A0) and torch.equal(offset.B, B0)
        self.lora_nf4[name] = nf4
        r = A0.shape[0]
        self.lora_A[name] = nn.Parameter(A0.new_empty((r, 0)), requires_grad=False)
        self.lora_B[name] = nn.Parameter(B0.new_empty((0, r)), requires_grad=False)
        if same:
            self.base_offset[name] = NF4BaseOffset(nf4, offset.R, offset.scale)

    def adapter_parameters(self, name: str) -> dict[str, list[nn.Parameter]]:
        """The parameters of adapter ``name`` by factor: ``{"A": [...], "B": [...], "R": [...], "M": [...]}`` (M: a
        DoRA adapter's magnitude)."""
        params = {"A": [self.lora_A[name]], "B": [self.lora_B[name]], "R": [],
                  "M": [self.lora_magnitude_vector[name]] if name in self.lora_magnitude_vector else []}
        if name in self.lora_R:
            params["R"].append(self.lora_R[name])
        if name in self.lora_R_fn:
            params["R"].extend(self.lora_R_fn[name].parameters())
        return params

    def factor_containers(self) -> list[nn.Module]:
        """The containers holding the trainable factors (which freezing the rest of a model leaves alone)."""
        return [self.lora_A, self.lora_B, self.lora_R, self.lora_magnitude_vector]

    def training_adapters(self) -> list[str]:
        """The adapters any of whose parameters require grad (every one with an ``R_fn`` core, to be sure); read
        straight from the containers, so that switching adapters costs no more with many of them loaded."""
        names = {n for d in (self.lora_A, self.lora_B, self.lora_R, self.lora_magnitude_vector)
                 for n, p in d._parameters.items() if p is not None and p.requires_grad}
        with_fn = self.lora_R_fn
        return [n for n in self.lora_A.keys() if n in names or n in with_fn]

    def set_trainable(self, name: str, trainable: bool) -> None:
        """Turns training of adapter ``name`` on (its factors that are not frozen) or off (all of them)."""
        frozen = self.settings[name].frozen
        for which, params in self.adapter_parameters(name).items():
            for p in params:
                p.requires_grad_(trainable and which not in frozen)

    # --- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_adapters is not None and self.enabled:  # compiled too: traced per pattern of names
            return self._mixed_forward(x, self.batch_adapters)
        if torch.compiler.is_compiling():
            return self._compiled_forward(x)
        name = self.active_adapter
        base = self._modules["base_layer"]
        if not self.enabled or name is None or self.merged_adapter is not None:
            return base(x)
        dtype = compute_dtype(base)
        A, B, R = self.factors(name)
        if A.dtype != dtype or B.dtype != dtype or (R is not None and R.dtype != dtype):
            A, B, R = A.to(dtype), B.to(dtype), (R.to(dtype) if R is not None else None)  # compute in W's dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        settings = self.settings[name]
        p = settings.dropout if self.training else 0.0
        m = self._modules["lora_magnitude_vector"]._parameters.get(name)
        if m is not None and m.dtype != dtype:
            m = m.to(dtype)
        if p > 0 and self.dropout_seeds is not None:
            return self._per_sample_forward(x, A, B, R, m, settings.scaling, p)
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        if m is not None:
            g = self.dora_scale_cached(name, A, B, R, m) if self.dora_caching and not self.training else None
            if g is not None:  # g ⊙ (x Wᵀ + s·hr Bᵀ) + b, the norms not computed again (a dense base: DoRA's)
                y = ops.lora_linear(x, weight_out_in(base), None, A, B, R, settings.scaling, 0.0, 0)
                return torch.addcmul(base.bias, y, g) if base.bias is not None else y * g
            return fused_dora_linear(base, x, A, B, R, m, settings.scaling, p, seed, not self.dora_recompute)
        return fused_linear(base, x, A, B, R, settings.scaling, p, seed)

    def dora_scale_cached(self, name: str, A, B, R, m) -> torch.Tensor | None:
        """DoRA's ``g = m / ‖W + s·B R A‖`` (0 where the norm is 0) of adapter ``name``, kept from the last forward
        while the tensors it came from are the same objects over the same memory at the same versions; None where
        it cannot be kept: a forward that trains the adapter (the magnitude's gradient flows through g), an R
        computed at every forward, a tensor without a version counter (made under ``inference_mode``). In-place
        changes (an optimizer's step, ``load_state_dict``, merging) move a tensor's version; writes through
        ``.data`` do not, and need ``dora_caching(model, False)`` after them."""
        mods = self._modules  # read directly, as in factors()
        if name in mods["lora_R_fn"]._modules or name in mods["lora_nf4"]._modules:
            return None
        params = (mods["base_layer"].weight, mods["lora_A"]._parameters[name], mods["lora_B"]._parameters[name],
                  mods["lora_magnitude_vector"]._parameters[name], mods["lora_R"]._parameters.get(name))
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params[1:]):
            return None
        try:
            stamps = tuple(None if t is None else (t.data_ptr(), t._version, t.dtype) for t in params)
        except RuntimeError:  # an inference tensor: no version counter
            return None
        scale = self.settings[name].scaling
        hit = self.dora_cache.get(name)
        if (hit is not None and hit[1] == (stamps, scale)
                and all(ref is None if t is None else ref() is t for ref, t in zip(hit[0], params, strict=True))):
            return hit[2]
        with torch.no_grad():
            w = self.base_weight()
            n = ops.dora_norm(w, A, B, R, scale)
            g = torch.where(n > 0, m.to(n.dtype) / torch.where(n > 0, n, 1.0), 0.0).to(w.dtype)
        refs = tuple(None if t is None else weakref.ref(t) for t in params)
        self.dora_cache[name] = (refs, (stamps, scale), g)
        return g

    def _mixed_forward(self, x: torch.Tensor, names: tuple[str | None, ...]) -> torch.Tensor:
        """Each sample (first dimension of ``x``) through its own adapter, in one call of the grouped operator;
        a sample whose adapter this layer does not hold gets the base layer's output, as in PEFT."""
        if x.shape[0] != len(names):
            raise ShapeError(f"a mixed-adapter batch names {len(names)} adapters but this layer's input has "
                             f"{x.shape[0]} samples (shape {tuple(x.shape)})")
        present = [n for n in dict.fromkeys(names) if n is not None and n in self.lora_A]
        if not present:
            return self.base_layer(x)
        if self.merged_adapter is not None:
            raise merged_error(self.merged_adapter, then="unmerge before running a mixed-adapter batch")
        if isinstance(self.base_layer, NF4Linear):
            raise AdapterStateError("a mixed-adapter batch needs a dense base weight; this layer's is NF4")
        for n in present:
            if (n in self.lora_R or n in self.lora_R_fn or n in self.base_offset or n in self.lora_nf4
                    or n in self.lora_magnitude_vector):
                raise AdapterStateError(f"adapter {n!r} is not a plain LoRA (it has an r×r core, an SVD init's "
                                        "residual base, NF4 factors or a DoRA magnitude): mixed-adapter batches "
                                        "take plain LoRA adapters")
        dropouts = {self.settings[n].dropout for n in present} if self.training else {0.0}
        if len(dropouts) > 1:
            raise ConfigError(f"adapters {present} have different dropouts {sorted(dropouts)}: a mixed-adapter batch "
                              "trains with one")
        dtype = compute_dtype(self.base_layer)
        rank = max(self.settings[n].r for n in present)
        As, Bs = [], []
        for n in present:
            A, B = self.lora_A[n].to(dtype), self.lora_B[n].to(dtype)
            As.append(F.pad(A, (0, 0, 0, rank - A.shape[0])))  # (rank, in): zero rows add nothing
            Bs.append(F.pad(B, (0, rank - B.shape[1])))  # (out, rank)
        index = {n: i for i, n in enumerate(present)}
        per_sample = torch.tensor([index.get(n, -1) for n in names], dtype=torch.long, device=x.device)
        group = per_sample.repeat_interleave(x[0].numel() // x.shape[-1] if x.dim() > 1 else 1)
        p = dropouts.pop()
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        return ops.lora_linear_grouped(x.to(dtype), weight_out_in(self.base_layer), self.base_layer.bias,
                                       torch.stack(As), torch.stack(Bs), group,
                                       [self.settings[n].scaling for n in present], p, seed)

    def _per_sample_forward(self, x, A, B, R, m, scale: float, p: float) -> torch.Tensor:
        """The forward with one dropout seed per sample (:attr:`dropout_seeds`): sample j's mask is that of its
        own seed over its own rows, whatever batch it is in and however long the batch is padded. The input's first
        dimension is the batch, or the batch's tokens flattened sample after sample."""
        seeds = self.dropout_seeds
        if x.dim() < 2 or x.shape[0] % len(seeds):
            raise ShapeError(f"per-sample dropout: {len(seeds)} seeds for an input of shape {tuple(x.shape)}")
        rows = x.shape[0] // len(seeds)
        def run(part: torch.Tensor, seed: int) -> torch.Tensor:
            if m is not None:  # DoRA: the same, with the magnitude
                return fused_dora_linear(self.base_layer, part, A, B, R, m, scale, p, seed, not self.dora_recompute)
            return fused_linear(self.base_layer, part, A, B, R, scale, p, seed)

        return torch.cat([run(part, s) for part, s in zip(x.split(rows), seeds, strict=True)])

    def _compiled_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward ``torch.compile`` traces: one code for every adapter state, reading only
        :attr:`compiled_factors` and the gate (see :meth:`compiled_view`); ``s·B`` is formed as ``B · gate``."""
        if self.compiled_factors is None:
            return self.base_layer(x)
        A, B, R, R_fn, dropout, m = self.compiled_factors
        if R_fn is not None:
            R = R_fn()
        dtype = compute_dtype(self.base_layer)
        A, B = A.to(dtype), B.to(dtype)
        R = None if R is None else R.to(dtype)
        x = x.to(dtype)
        B = B * self.compiled_gate.to(dtype)  # (out, r): s·B, or zeros when the base alone runs
        p = dropout if self.training else 0.0
        if m is not None:
            m = m.to(dtype)
            if p > 0:  # as below: torch's dropout where the operator's seed cannot be drawn
                w = weight_out_in(self.base_layer)
                g = m / ops.dora_norm(w, A, B, R, 1.0).to(dtype).detach()  # (out,)
                h = F.linear(F.dropout(x, p, training=True), A)  # (..., r)
                if R is not None:
                    h = F.linear(h, R)
                y = g * (F.linear(x, w) + F.linear(h, B))
                return y if self.base_layer.bias is None else y + self.base_layer.bias
            return fused_dora_linear(self.base_layer, x, A, B, R, m, 1.0, 0.0, 0, not self.dora_recompute)
        if p > 0:
            # The operator takes its dropout seed as a Python int, which a compiled graph cannot draw afresh at
            # each call: compiled, the same sum is written out with torch's own dropout.
            h = F.linear(F.dropout(x, p, training=True), A)  # (..., r)
            if R is not None:
                h = F.linear(h, R)
            return self.base_layer(x) + F.linear(h, B)
        return fused_linear(self.base_layer, x, A, B, R, 1.0, 0.0, 0)

    # --- merge ---------------------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    def _versions(self, name: str) -> tuple[int, ...]:
        params = [p for ps in self.adapter_parameters(name).values() for p in ps]
        return tuple(t._version for t in (self.base_layer.weight, *params))

    def _weight_unchanged(self, name: str) -> bool:
        """Whether the base weight and adapter ``name``'s factors are as :meth:`merge` left them.

        The factors' version counters decide for them. The weight's counter is shared with every view of its
        storage: transformers loads fused weights as views of one tensor, so merging a sibling layer bumps it.
        When it moved, the weight's values decide: their per-row fingerprint (:func:`weight_fingerprint`) against
        the one taken at merge time."""
        now, then = self._versions(name), self._merge_versions
        if now == then:
            return True
        if now[1:] != then[1:] or self._merge_fingerprint is None:
            return False
        return all(torch.equal(a, b) for a, b in zip(weight_fingerprint(local_part(self.base_weight())),
                                                     self._merge_fingerprint, strict=True))

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """Folds the active adapter into the base weight. Merging twice is merging once.

        Keeps 1 byte per weight element (plus rare exceptions) so that :meth:`unmerge` is exact.

        Raises:
            AdapterStateError: the base is NF4 (not stored densely).
            RuntimeError: with ``safe``, a merge that would put NaN or Inf into W (W is left as it was).
        """
        if self.merged_adapter is not None or self.active_adapter is None:
            return
        if isinstance(self.base_layer, NF4Linear):
            raise AdapterStateError("cannot merge into a quantised (NF4) base weight; use lispetorch.save_as_lora, "
                                    "or dequantise the base first")
        name = self.active_adapter
        A, B, R = self.factors(name)
        with whole_weight(self.base_weight()) as w:  # under FSDP2: gathered, and each shard written back
            if name in self.lora_magnitude_vector:
                distance, index, values, norm = ops.dora_merge_(w, A, B, R, self.lora_magnitude_vector[name],
                                                                self.settings[name].scaling, safe)
                self.register_buffer("merge_norm", norm, persistent=False)
            else:
                distance, index, values = ops.lora_merge_(w, A, B, R, self.settings[name].scaling, safe)
        self.register_buffer("merge_distance", distance, persistent=False)
        self.register_buffer("merge_index", index, persistent=False)
        self.register_buffer("merge_values", values, persistent=False)
        self.merged_adapter = name
        self._merge_versions = self._versions(name)
        self.compiled_view()
        self._merge_fingerprint = weight_fingerprint(local_part(self.base_weight()))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtracts the merged adapter; bit-exact if nothing changed the weight or the factors since."""
        name = self.merged_adapter
        if name is None:
            return
        A, B, R = self.factors(name)
        state = (self.merge_distance, self.merge_index, self.merge_values)
        if not self._weight_unchanged(name):
            warnings.warn(
                f"the weight or adapter {name!r} changed while merged: unmerging by subtraction (not bit-exact)",
                stacklevel=2,
            )
            state = None
        with whole_weight(self.base_weight()) as w:
            if name in self.lora_magnitude_vector:
                ops.dora_unmerge_(w, A, B, R, self.lora_magnitude_vector[name], self.merge_norm,
                                  self.settings[name].scaling, state)
                delattr(self, "merge_norm")
            else:
                ops.lora_unmerge_(w, A, B, R, self.settings[name].scaling, state)
        for buf in ("merge_distance", "merge_index", "merge_values"):
            delattr(self, buf)
        self.merged_adapter = None
        self._merge_versions = None
        self.compiled_view()
        self._merge_fingerprint = None

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={s.r}" for n, s in self.settings.items())
        return f"in={self.in_features}, out={self.out_features}, adapters=[{ranks}], active={self.active_adapter!r}"
