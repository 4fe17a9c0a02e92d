"""Adapter configurations: one base, one class per method, one set of validators, and the one vocabulary of
method names (:data:`METHODS`, :func:`method_of`, :func:`method_config`).

A method is a choice of the factors of ``y = x Wᵀ + b + s · ((drop(x) Aᵀ) Rᵀ) Bᵀ``: which train, how they
start, how the r×r core R is parametrised. PiSSA and LoRA-GA are LoRA with an SVD init (``LoraConfig.init``),
as in PEFT; Rotational PiSSA and TinyLoRA have configs of their own.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import asdict, dataclass, field

from .errors import ConfigError
from .hf import dtype_name
from .peft_format import pattern_value, scaling
from .validate import compile_pattern, show

# The method names, one vocabulary for every surface (Python, training configs, the Lisp primitives): a method
# with a config class of its own (CONFIGS, below), or LoRA with an SVD init.
METHODS = ("lora", "pissa", "pissa_niter_K", "lora_ga", "rotational_pissa", "tinylora")
INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_K", "lora_ga")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")  # K, the number of subspace iterations

# Rotational PiSSA's parametrisations of R_U and R_V, with the names the Rotational PiSSA papers use as aliases.
ROTATIONS = ("penalty", "givens", "cayley", "exp")
ROTATION_ALIASES = {"way0": "penalty", "way1": "givens", "way2": "cayley", "way3": "exp"}
ROTATION_METHODS = (*ROTATION_ALIASES, *ROTATIONS)


def pissa_niter(init: str) -> int | None:
    """K of ``"pissa_niter_K"``; None for a full SVD (``"pissa"``) or any other init."""
    m = _PISSA_NITER.fullmatch(init) if isinstance(init, str) else None
    return int(m.group(1)) if m else None


def is_init(value) -> bool:
    """True for a valid ``LoraConfig.init``: one of :data:`INITS`, with ``pissa_niter_K`` given a number K."""
    return isinstance(value, str) and (value in INITS and value != "pissa_niter_K" or pissa_niter(value) is not None)


# --- validators: each raises ConfigError naming the field and the value ----------------------------------------
def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {show(value)}")
    return value


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        return False


def positive_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not _finite(value):
        raise ConfigError(f"{name} must be a positive number, got {show(value)}")
    return value


def non_negative_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not _finite(value):
        raise ConfigError(f"{name} must be ≥ 0, got {show(value)}")
    return value


def probability(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {show(value)}")
    return value


def layer_indices(value, name: str):
    """None, a layer index, or a list of them (PEFT's ``layers_to_transform``)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                for i in value):
        return list(value)
    raise ConfigError(f"{name} must be a layer index ≥ 0 or a list of them, got {value!r}")


def name_patterns(value, name: str):
    """None, a name pattern, or a non-empty list of them (PEFT's ``layers_pattern``)."""
    if value is None or (isinstance(value, str) and value):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(t, str) and t for t in value):
        return list(value)
    raise ConfigError(f"{name} must be a name (e.g. 'layers') or a non-empty list of names, got {value!r}")


def per_module(value, name: str, check) -> dict:
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: ``{pattern: value}``, each pattern a regular expression matched
    against a module name or a dotted suffix of it (:func:`~lispetorch.peft_format.pattern_value`)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise ConfigError(f"{name} must be a mapping of module name patterns to values, got {value!r}")
    for key, v in value.items():
        check(v, f"{name}[{key!r}]")
        try:
            pattern_value({key: v}, "", None)
        except Exception as e:  # the pattern engine's own error type
            raise ConfigError(f"{name}: {key!r} is not a valid regular expression ({e})") from None
    return dict(value)


def module_names(value, name: str) -> list[str]:
    """A non-empty list of module names (a single name is a list of one)."""
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(t, str) and t for t in value):
        return list(value)
    raise ConfigError(f"{name} must be a non-empty list of module names, got {value!r}")


def module_selection(value, name: str):
    """Module names (a non-empty list), a regular expression, or ``"all-linear"``."""
    if isinstance(value, str):
        if value != "all-linear":
            compile_pattern(value, name)  # RE2, as every pattern is matched: linear time, no backtracking
        return value
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(t, str) and t for t in value):
        return list(value)
    raise ConfigError(f"{name} must be a non-empty list of module names, a regular expression or 'all-linear', "
                      f"got {show(value)}")


@dataclass
class AdapterConfig:
    """What every method's config has: the modules it adapts and the dtype of its factors.

    Subclasses give ``r``, their scaling numerator as :attr:`alpha`, and :attr:`dropout`.
    """

    def __post_init__(self) -> None:
        prefix = type(self).__name__
        positive_int(self.r, f"{prefix}.r")
        experts_only = getattr(self, "target_parameters", None) and isinstance(self.target_modules,
                                                                               (list, tuple, set))
        if experts_only and not self.target_modules:  # PEFT's target_modules=[] with target_parameters
            self.target_modules = []
        else:
            self.target_modules = module_selection(self.target_modules, f"{prefix}.target_modules")
        if self.exclude_modules is not None:
            self.exclude_modules = module_selection(self.exclude_modules, f"{prefix}.exclude_modules")

    @property
    def scaling(self) -> float:
        """The factor ``s`` applied to ``B R A``."""
        return scaling(self.alpha, self.r, getattr(self, "use_rslora", False))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dtype"] = dtype_name(self.dtype)
        return d


@dataclass
class LoraConfig(AdapterConfig):
    """Configuration of a LoRA adapter (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    The adapted layer computes ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` with ``s = alpha / r`` (or
    ``alpha / √r`` with ``use_rslora``, Kalajdzievski 2023).

    Args:
        r (int): rank. Default 8.
        alpha (float): scaling numerator (PEFT's ``lora_alpha``). Default 16.
        dropout (float): dropout on the adapter input, in ``[0, 1)``. Default 0.0.
        target_modules (list[str] | str): module names or name suffixes (``["q_proj", "v_proj"]``), a regular
            expression matched against full module names, or ``"all-linear"`` (every linear layer but the
            output head). Default ``["q_proj", "v_proj"]``.
        exclude_modules (list[str] | str | None): names, suffixes or a regular expression never to adapt.
        use_rslora (bool): rank-stabilised scaling ``alpha / √r``. Default False.
        init (str): ``"kaiming"`` (A Kaiming-uniform with a=√5, B zeros; PEFT's default), ``"gaussian"``
            (A normal with std 1/r, B zeros), ``"pissa"`` (principal singular vectors of W, the base becoming the
            residual; Meng et al., 2024), ``"pissa_niter_K"`` (the same from a randomised SVD with K subspace
            iterations) or ``"lora_ga"`` (from the SVD of the averaged gradient of W over calibration batches
            passed to ``inject``; Wang et al., 2024). Default ``"kaiming"``.
        dtype (str | torch.dtype | None): dtype of the adapter factors; the base weight's when None.
        layers_to_transform (int | list[int] | None): only the targeted modules in these layers (PEFT's field: the
            layer index is the number after the first ``<layers_pattern>.`` in the module name, or without a
            pattern the first number after a dotted segment); a name given whole in ``target_modules`` is kept
            whatever its layer. Needs ``target_modules`` as a list. Default None (every layer).
        layers_pattern (str | list[str] | None): the name of the layer list (``"layers"``, ``"h"``), with
            ``layers_to_transform``. Default None.
        rank_pattern (dict[str, int]): ranks other than ``r``, by regular expression matched against a module name
            or a dotted suffix of it (PEFT's ``rank_pattern``: the first key that matches counts). Default {}.
        alpha_pattern (dict[str, float]): alphas other than ``alpha``, likewise. Default {}.
        modules_to_save (list[str] | None): whole modules (an output head, an embedding, a classifier), by name or
            dotted name suffix, trained as a copy beside the adapter and saved with it (PEFT's field); the
            original stays for the adapter-less model. Default None.
        use_dora (bool): DoRA (Liu et al., 2024): the adapted weight is ``m ⊙ (W + s·B A) / ‖W + s·B A‖`` per
            output row, with a trained magnitude ``m`` started at the row norms (so the layer starts as the base
            layer); the norm is a constant in backward, as in the paper and PEFT. Works with every ``init``;
            not over an NF4 base. Default False.
        target_parameters (list[str] | None): expert weights of mixture-of-experts models to adapt, one adapter
            per expert (PEFT's field): parameter names or dotted suffixes of them (``["gate_up_proj",
            "down_proj"]``, ``["mlp.experts.down_proj"]``), each matching 3-D expert stacks of experts modules
            that declare their layout (transformers' fused experts: Mixtral, Qwen3-MoE, OLMoE, DeepSeek, …).
            Each expert's adapter applies only to the tokens routed to it. With ``target_modules=[]``, only
            the experts are adapted. Takes the ``kaiming`` and ``gaussian`` inits, not DoRA. Default None.

    Raises:
        ConfigError: a field out of range, named with its value (a ``ValueError``); ``layers_to_transform`` or
            ``layers_pattern`` with ``target_modules`` given as one string; ``layers_pattern`` without
            ``layers_to_transform``.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False
    init: str = "kaiming"
    dtype: object = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    use_dora: bool = False
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_number(self.alpha, "LoraConfig.alpha")
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"LoraConfig.use_dora must be true or false, got {self.use_dora!r}")
        probability(self.dropout, "LoraConfig.dropout")
        if not is_init(self.init):
            raise ConfigError(f"LoraConfig.init must be one of {INITS}, got {self.init!r}")
        self.layers_to_transform = layer_indices(self.layers_to_transform, "LoraConfig.layers_to_transform")
        self.layers_pattern = name_patterns(self.layers_pattern, "LoraConfig.layers_pattern")
        for key in ("layers_to_transform", "layers_pattern"):
            if getattr(self, key) is not None and isinstance(self.target_modules, str):
                raise ConfigError(f"LoraConfig.{key} ({getattr(self, key)!r}) needs target_modules as a list of "
                                  f"names, not the string {self.target_modules!r} (as in PEFT)")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError(f"LoraConfig.layers_pattern ({self.layers_pattern!r}) needs layers_to_transform")
        self.rank_pattern = per_module(self.rank_pattern, "LoraConfig.rank_pattern", positive_int)
        self.alpha_pattern = per_module(self.alpha_pattern, "LoraConfig.alpha_pattern", positive_number)
        if self.modules_to_save is not None:
            self.modules_to_save = module_names(self.modules_to_save, "LoraConfig.modules_to_save")
        if self.target_parameters is not None:
            self.target_parameters = sorted(module_names(self.target_parameters, "LoraConfig.target_parameters"))
            if self.use_dora:
                raise ConfigError(f"LoraConfig.target_parameters ({self.target_parameters!r}) does not take DoRA "
                                  "(use_dora=True), as in PEFT: adapt the experts with plain LoRA")
            if self.init not in ("kaiming", "gaussian"):
                raise ConfigError(f"LoraConfig.target_parameters ({self.target_parameters!r}) takes the inits "
                                  f"'kaiming' and 'gaussian', got {self.init!r}")

    @classmethod
    def from_peft(cls, peft_config) -> LoraConfig:
        """The :class:`LoraConfig` of a ``peft.LoraConfig``: the same modules, ranks, alphas, dropout, init and
        selection (``layers_to_transform``, ``layers_pattern``, ``rank_pattern``, ``alpha_pattern``,
        ``modules_to_save``). PEFT's bookkeeping fields (``task_type``, ``base_model_name_or_path``,
        ``inference_mode``, …) and ``fan_in_fan_out`` (found from the layers here) are not needed.

        Raises:
            ConfigError: not a ``peft.LoraConfig``; no ``target_modules`` (PEFT then picks them by model type);
                an ``init_lora_weights`` without a counterpart here (``False``, ``"olora"``, ``"loftq"``, …);
                a field set to something this package does not do (``bias``, ``lora_bias``, …), named with its
                value.
        """
        import peft

        if not isinstance(peft_config, peft.LoraConfig):
            raise ConfigError(f"from_peft takes a peft.LoraConfig, got {type(peft_config).__name__}")
        default = peft.LoraConfig()
        unsupported = {f.name: getattr(peft_config, f.name) for f in dataclasses.fields(peft_config)
                       if f.name not in _PEFT_FIELDS and f.name not in _PEFT_BOOKKEEPING
                       and getattr(peft_config, f.name) != getattr(default, f.name)}
        if unsupported:
            raise ConfigError(f"peft.LoraConfig fields without a counterpart here: {unsupported}; the fields "
                              f"converted are {sorted(_PEFT_FIELDS)}")
        if peft_config.target_modules is None and not peft_config.target_parameters:
            raise ConfigError("peft.LoraConfig.target_modules is None (PEFT then picks them by model type): give "
                              "the module names")
        init = peft_config.init_lora_weights
        inits = {True: "kaiming", "gaussian": "gaussian", "pissa": "pissa", "lora_ga": "lora_ga"}
        if not (isinstance(init, str) and pissa_niter(init) is not None) and init not in inits:
            raise ConfigError(f"peft.LoraConfig.init_lora_weights {init!r} has no counterpart here; the inits are "
                              f"True, 'gaussian', 'pissa', 'pissa_niter_K' and 'lora_ga'")
        targets = peft_config.target_modules if peft_config.target_modules is not None else []
        return cls(
            r=peft_config.r, alpha=peft_config.lora_alpha, dropout=peft_config.lora_dropout,
            target_modules=targets if isinstance(targets, str) else sorted(targets),
            exclude_modules=peft_config.exclude_modules if isinstance(peft_config.exclude_modules, (str, type(None)))
            else sorted(peft_config.exclude_modules),
            use_rslora=peft_config.use_rslora, init=inits.get(init, init),
            layers_to_transform=peft_config.layers_to_transform, layers_pattern=peft_config.layers_pattern,
            rank_pattern=dict(peft_config.rank_pattern or {}), alpha_pattern=dict(peft_config.alpha_pattern or {}),
            modules_to_save=None if peft_config.modules_to_save is None else list(peft_config.modules_to_save),
            use_dora=bool(peft_config.use_dora),
            target_parameters=sorted(peft_config.target_parameters) if peft_config.target_parameters else None,
        )

    def to_peft(self, **fields):
        """The ``peft.LoraConfig`` of this config (``dtype`` has no PEFT field and is left out; PEFT computes in
        the base weight's dtype). ``fields`` are passed on (``task_type="CAUSAL_LM"``, …)."""
        import peft

        return peft.LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules),
            exclude_modules=self.exclude_modules, use_rslora=self.use_rslora,
            init_lora_weights=True if self.init == "kaiming" else self.init,
            layers_to_transform=self.layers_to_transform, layers_pattern=self.layers_pattern,
            rank_pattern=dict(self.rank_pattern), alpha_pattern=dict(self.alpha_pattern),
            modules_to_save=None if self.modules_to_save is None else list(self.modules_to_save),
            use_dora=self.use_dora,
            target_parameters=None if self.target_parameters is None else list(self.target_parameters), **fields,
        )

    def rank_of(self, module: str) -> int:
        """The rank of ``module`` (a full module name): its :attr:`rank_pattern` entry, else :attr:`r`."""
        return pattern_value(self.rank_pattern, module, self.r)

    def alpha_of(self, module: str) -> float:
        """The alpha of ``module``: its :attr:`alpha_pattern` entry, else :attr:`alpha`."""
        return float(pattern_value(self.alpha_pattern, module, self.alpha))

    def scaling_of(self, module: str) -> float:
        """The scaling of ``module`` from its rank and alpha."""
        return scaling(self.alpha_of(module), self.rank_of(module), self.use_rslora)


# peft.LoraConfig fields that LoraConfig.from_peft converts, and those that only describe PEFT's bookkeeping.
_PEFT_FIELDS = frozenset({"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora",
                          "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
                          "alpha_pattern", "modules_to_save", "use_dora", "target_parameters"})
_PEFT_BOOKKEEPING = frozenset({"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                               "revision", "inference_mode", "fan_in_fan_out", "runtime_config", "megatron_core"})


@dataclass
class RotationalPiSSAConfig(AdapterConfig):
    """Rotational PiSSA: ``W = W_res + U_r R_U diag(S) R_Vᵀ V_rᵀ`` with ``U_r``, ``V_r``, ``W_res`` frozen.

    On the one operator: ``A = V_rᵀ`` and ``B = U_r`` are frozen, and the core ``R = R_U diag(S/s) R_Vᵀ`` is
    computed at every forward from the trained rotations (and singular values), so ``s · B R A`` is the principal
    part and the base weight becomes ``W − s · B R₀ A`` for the ``R₀`` actually produced at init.

    Args:
        r (int): rank (number of singular triplets). Default 8.
        lora_alpha (float): scaling numerator, ``s = lora_alpha / r`` (also readable as :attr:`alpha`). Default 16.
        method (str): how ``R_U`` and ``R_V`` are parametrised (:attr:`rotation` gives the descriptive name).
            ``"penalty"`` (alias ``"way0"``): free ``r×r`` matrices, from the identity, with the penalty
            ``λ(‖R_UᵀR_U − I‖² + ‖R_VᵀR_V − I‖²)`` (:func:`~lispetorch.orthogonality_loss`) to add to the loss;
            ``"givens"`` (``"way1"``): a product of Givens rotations over all ``r(r−1)/2`` planes (angles from 0);
            ``"cayley"`` (``"way2"``): the Cayley transform ``(I − K)⁻¹(I + K)`` of a low-rank skew-symmetric
            ``K = X Yᵀ − Y Xᵀ``, exactly orthogonal (the reference code's ``I + K`` is orthogonal only to first
            order in K); ``"exp"`` (``"way3"``): the matrix exponential of a skew-symmetric matrix.
            Default ``"way0"``.
        orthogonality_reg_weight (float): λ of the penalty parametrisation. Default 1e-3.
        init_identity (bool): start the rotations at the identity; otherwise at a random rotation (the residual
            absorbs it, so outputs are still unchanged at init). Default True.
        freeze_singular_values (bool): keep ``S`` fixed. Default False.
        quantize_residual (bool): store the frozen residual ``W_res`` in NF4. Default False.
        quantize_base_components (bool): store ``U_r`` and ``V_r`` (the frozen A and B) in NF4, dequantised at
            each use: about 4.5 bits a value instead of 32. Default False.
        skew_rank (int): rank of ``X`` and ``Y`` for ``cayley``. Default 2 (capped at ``r``).
        dropout (float): dropout on the adapter input. Default 0.0.
        target_modules (list[str] | str): as in :class:`LoraConfig`. Default ``["q_proj", "v_proj"]``.
        exclude_modules (list[str] | str | None): as in :class:`LoraConfig`.
        dtype (str | torch.dtype | None): dtype of the factors; the base weight's when None.

    Raises:
        ConfigError: a field out of range or an unknown ``method``, named with its value (a ``ValueError``).
    """

    r: int = 8
    lora_alpha: float = 16.0
    method: str = "way0"
    orthogonality_reg_weight: float = 1e-3
    init_identity: bool = True
    freeze_singular_values: bool = False
    quantize_residual: bool = False
    quantize_base_components: bool = False
    skew_rank: int = 2
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    exclude_modules: list[str] | str | None = None
    dtype: object = None

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_number(self.lora_alpha, "RotationalPiSSAConfig.lora_alpha")
        if self.method not in ROTATION_METHODS:
            raise ConfigError(f"RotationalPiSSAConfig.method must be one of {ROTATION_METHODS}, got {self.method!r}")
        non_negative_number(self.orthogonality_reg_weight, "RotationalPiSSAConfig.orthogonality_reg_weight")
        positive_int(self.skew_rank, "RotationalPiSSAConfig.skew_rank")
        probability(self.dropout, "RotationalPiSSAConfig.dropout")

    @property
    def alpha(self) -> float:
        return self.lora_alpha

    @property
    def rotation(self) -> str:
        """The parametrisation's descriptive name: ``penalty``, ``givens``, ``cayley`` or ``exp``."""
        return ROTATION_ALIASES.get(self.method, self.method)


@dataclass
class TinyLoraConfig(AdapterConfig):
    """TinyLoRA: ``ΔW = U_r diag(S_r) (Σᵢ vᵢ Pᵢ) V_rᵀ`` with one trained vector ``v`` of ``u`` values.

    ``U_r, S_r, V_r`` are the frozen rank-``r`` SVD factors of each adapted W (which stays frozen, unchanged);
    ``Pᵢ`` (``u × r × r`` per module) are fixed standard-normal tensors drawn from a generator seeded with
    ``seed``, module after module in the model's module order; ``v`` starts at zero, so outputs are unchanged at
    init. On the one operator: ``A = V_rᵀ``, ``B = U_r diag(S_r)`` (S sits on the output side of R, as in
    LoRA-XS), ``R = Σᵢ vᵢ Pᵢ`` and ``s = 1``.

    Args:
        r (int): rank of the frozen SVD factors. Default 2.
        u (int): length of the trained vector; ``u = 1`` works. Default 32.
        seed (int): seed of the generator that draws the ``Pᵢ``. Default 42.
        groups (int): tying: the adapted modules, in module order, are split into this many contiguous groups of
            (nearly) equal size, each with its own ``v``; 1 shares one ``v`` across all. Default 1.
        target_modules (list[str] | str): as in :class:`LoraConfig`. Default ``"all-linear"``.
        exclude_modules (list[str] | str | None): as in :class:`LoraConfig`.
        dtype (str | torch.dtype | None): dtype of the frozen factors; the base weight's when None (``v`` and
            ``P`` are float32).
        convention (str): ``"paper"`` (default: the above) or ``"qwen-coder"``, the convention of the TinyLoRA
            trainer whose ``tiny_lora_v.pt`` files circulate (TinyLoRA-Qwen-Coder): ``Pᵢ`` of shape ``(u, r)``
            drawn in bfloat16 as ``randn(u, r) / √r`` on each weight's device from the default generator seeded
            with ``seed``, one per adapted layer in module order, and ``ΔW = U_r diag(S_r ⊙ (v P)) V_rᵀ`` with
            ``U_r, S_r, V_r`` (of a float32 SVD on the CPU) and ``v P`` in bfloat16.

    Raises:
        ConfigError: a field out of range (``u ≤ 0`` included), named with its value (a ``ValueError``).
    """

    r: int = 2
    u: int = 32
    seed: int = 42
    groups: int = 1
    target_modules: list[str] | str = "all-linear"
    exclude_modules: list[str] | str | None = None
    dtype: object = None
    convention: str = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int(self.u, "TinyLoraConfig.u")
        positive_int(self.groups, "TinyLoraConfig.groups")
        if self.convention not in TINYLORA_CONVENTIONS:
            raise ConfigError(f"TinyLoraConfig.convention must be one of {TINYLORA_CONVENTIONS}, got "
                              f"{self.convention!r}")
        if self.convention == "qwen-coder" and self.groups != 1:
            raise ConfigError(f"TinyLoraConfig.groups = {self.groups}: the 'qwen-coder' convention shares one v "
                              "across all layers (groups = 1)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"TinyLoraConfig.seed must be an integer, got {self.seed!r}")

    @property
    def alpha(self) -> float:  # s = 1: S sits in B
        return float(self.r)

    @property
    def dropout(self) -> float:
        return 0.0


TINYLORA_CONVENTIONS = ("paper", "qwen-coder")

# The config class of each method that has one; PiSSA and LoRA-GA are inits of LoRA (PEFT's init_lora_weights).
CONFIGS = {"lora": LoraConfig, "rotational_pissa": RotationalPiSSAConfig, "tinylora": TinyLoraConfig}


def method_of(config: AdapterConfig) -> str:
    """The method name of ``config`` in :data:`METHODS` (``pissa_niter_K`` with its K)."""
    if isinstance(config, RotationalPiSSAConfig):
        return "rotational_pissa"
    if isinstance(config, TinyLoraConfig):
        return "tinylora"
    if isinstance(config, LoraConfig):
        return "lora" if config.init in ("kaiming", "gaussian") else config.init
    raise ConfigError(f"config must be a LoraConfig, RotationalPiSSAConfig or TinyLoraConfig, got "
                      f"{type(config).__name__}")


def method_config(name: str, r: int, alpha: float, target_modules="all-linear", dtype=None, dropout: float = 0.0,
                  **options) -> AdapterConfig:
    """The config of the method ``name`` with the common fields set, for callers that choose the method by name
    (training configs, the Lisp primitives' ``method`` option, command lines).

    Args:
        name (str): one of :data:`METHODS`: ``"lora"``, ``"pissa"``, ``"pissa_niter_K"`` (K an integer),
            ``"lora_ga"`` (pass the calibration batches to ``inject``), ``"rotational_pissa"`` or ``"tinylora"``.
        r (int): rank. alpha (float): scaling numerator (ignored by TinyLoRA, whose scaling is 1).
        target_modules, dtype, dropout: as in :class:`LoraConfig` (TinyLoRA has no dropout).
        **options: the method's own fields: ``init`` for ``"lora"`` (kaiming or gaussian), ``use_rslora``;
            ``method``, ``orthogonality_reg_weight``, ``init_identity``, ``freeze_singular_values``,
            ``quantize_residual``, ``quantize_base_components``, ``skew_rank`` for Rotational PiSSA; ``u``,
            ``seed``, ``groups`` for TinyLoRA.

    Raises:
        ConfigError: an unknown method or option, or a field out of range (a ``ValueError``).
    """
    if not isinstance(name, str):
        raise ConfigError(f"method must be one of {METHODS}, got {name!r}")
    try:
        if name == "lora" or name in ("pissa", "lora_ga") or pissa_niter(name) is not None:
            init = options.pop("init", "kaiming") if name == "lora" else name
            return LoraConfig(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, dtype=dtype,
                              init=init, **options)
        if name == "rotational_pissa":
            return RotationalPiSSAConfig(r=r, lora_alpha=alpha, dropout=dropout, target_modules=target_modules,
                                         dtype=dtype, **options)
        if name == "tinylora":
            if dropout:
                raise ConfigError("TinyLoRA has no dropout")
            return TinyLoraConfig(r=r, target_modules=target_modules, dtype=dtype, **options)
    except TypeError as e:  # an option the method's config does not have
        raise ConfigError(f"method {name!r}: {e}") from None
    raise ConfigError(f"method must be one of {METHODS}, got {name!r}")
