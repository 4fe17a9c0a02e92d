"""LoRA on a mixture of experts: one low-rank adapter per expert on the fused 3-D expert weights transformers
stores (``mlp.experts.gate_up_proj`` ``(E, 2I, H)``, ``down_proj`` ``(E, H, I)``), PEFT's ``target_parameters``.

The experts module is wrapped by a :class:`LoraExperts`, whose forward routes the tokens as transformers' grouped
experts forward does (the rows of each expert in one block) and computes every projection with one native call,
:func:`lispetorch.ops.lora_experts_linear`: an expert's weight and adapter meet only the tokens routed to it, and
no per-expert delta ``B_e A_e`` is formed (PEFT forms the delta of every expert at every forward).

Layout: expert ``e``'s weight as ``(out, in)`` is ``W[e]`` (``W[e]ᵀ`` for a stack stored transposed,
``is_transposed``), and its adapter ``A_e (r, in)``, ``B_e (out, r)``, stored stacked as ``A (E, r, in)`` and
``B (E, out, r)``. PEFT's file keeps ``lora_A`` as ``(r·E, in)`` expert-major and ``lora_B`` as ``(out, r·E)``
rank-major (:func:`to_peft`, :func:`from_peft`).
"""

from __future__ import annotations

import contextlib
import warnings
from types import MappingProxyType

import torch
from torch import nn

from . import ops
from .errors import AdapterStateError, ConfigError, ShapeError, merged_error
from .layer import AdapterSettings, init_factors, is_adaptable, local_part, weight_fingerprint, whole_weight
from .switch import AdapterSwitch, WrapsBaseLayer
from .targets import own_forward

# What transformers' ``use_experts_implementation`` declares on an experts module: the layout its generic
# (grouped, batched) forwards read, and so does LoraExperts.
LAYOUT = ("num_experts", "has_gate", "has_bias", "is_transposed")


def declares_layout(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module that declares its layout (transformers'
    ``use_experts_implementation``), which :class:`LoraExperts` needs to route tokens as the model does."""
    return all(hasattr(module, a) for a in LAYOUT) and isinstance(module.num_experts, int)


def weight_names(module: nn.Module) -> tuple[str, ...]:
    """The expert weights of a declared experts module, in the order its forward applies them."""
    return ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")


def expert_parameters(model: nn.Module) -> dict[str, tuple[str, str]]:
    """The 3-D parameters of ``model`` and the 2-D weights of its routers (:func:`single_weights` of a module beside
    an experts module), by full name (``model.layers.0.mlp.experts.gate_up_proj``, ``model.layers.0.mlp.gate.weight``),
    as ``(module name, parameter name)``; a :class:`LoraExperts` counts as the module it wraps."""
    found = {}
    wrapped = [n + "." for n, m in model.named_modules() if isinstance(m, LoraExperts)]
    modules = [(n, m) for n, m in model.named_modules() if not any(n.startswith(w) for w in wrapped)]
    # a router is a module beside an experts module (under the same parent)
    beside_experts = {n.rpartition(".")[0] for n, m in modules
                      if declares_layout(m.base_layer if isinstance(m, LoraExperts) else m)}
    for name, module in modules:
        owner = module.base_layer if isinstance(module, LoraExperts) else module
        router = name.rpartition(".")[0] in beside_experts and not declares_layout(owner)
        for pname, p in owner.named_parameters(recurse=False):
            if p.dim() == 3 or (router and pname in single_weights(owner)):
                found[f"{name}.{pname}" if name else pname] = (name, pname)
    return found


def target_matches(key: str, targets: list[str]) -> bool:
    """PEFT's rule for ``target_parameters``: the full parameter name, or a suffix of it after a ``.``."""
    return any(key == t or key.endswith("." + t) for t in targets)


def single_weights(module: nn.Module) -> tuple[str, ...]:
    """The 2-D weights of a module that no linear adapter can wrap (a router with a forward of its own, such as
    transformers' top-k routers, whose ``weight`` is ``(experts, hidden)``): adapted as a whole, PEFT's
    ``target_parameters`` on a 2-D parameter."""
    if isinstance(module, LoraExperts):
        module = module.base_layer
    if declares_layout(module) or (is_adaptable(module) and not own_forward(module)):
        return ()
    return tuple(n for n, p in module.named_parameters(recurse=False) if p.dim() == 2)


def adaptable_expert_weights(model: nn.Module, found: dict[str, tuple[str, str]] | None = None
                             ) -> dict[str, tuple[str, str]]:
    """The expert weights :class:`LoraExperts` can adapt, by full name, as ``(module name, weight name)``."""
    usable = {}
    for key, (mod, pname) in (expert_parameters(model) if found is None else found).items():
        module = model.get_submodule(mod)
        owner = module.base_layer if isinstance(module, LoraExperts) else module
        if (declares_layout(owner) and pname in weight_names(owner) and
                getattr(owner, pname).shape[0] == owner.num_experts) or pname in single_weights(owner):
            usable[key] = (mod, pname)
    return usable


def match_parameters(model: nn.Module, target_parameters: list[str]) -> dict[str, tuple[str, ...]]:
    """The expert weights ``target_parameters`` selects, as ``{experts module name: parameter names}`` (in the
    order the module's forward applies them).

    Raises:
        ConfigError: a target that matches no parameter, or matches one that is not an expert weight of an
            experts module this package can route (the message lists the candidate parameters found).
    """
    found = expert_parameters(model)
    usable = adaptable_expert_weights(model, found)
    chosen: dict[str, list[str]] = {}
    for target in target_parameters:
        hits = [k for k in found if target_matches(k, [target])]
        flat = [] if hits else [k for k, _ in model.named_parameters() if target_matches(k, [target])]
        if flat:
            raise ConfigError(f"target_parameters entry {target!r} matches {flat[0]!r} (shape "
                              f"{tuple(model.get_parameter(flat[0]).shape)}), which is neither a 3-D expert weight "
                              "(experts, out, in) nor a router's 2-D weight (a linear layer is adapted through "
                              f"target_modules); the candidate parameters are {_listing(usable or found)}")
        if not hits:
            raise ConfigError(f"target_parameters entry {target!r} matches no parameter; the model's expert and "
                              f"router weights are {_listing(usable or found)}")
        bad = [k for k in hits if k not in usable]
        if bad:
            owner = model.get_submodule(found[bad[0]][0])
            raise ConfigError(f"target_parameters entry {target!r} matches {bad[0]!r} (shape "
                              f"{tuple(model.get_parameter(bad[0]).shape)} on {type(owner).__name__}), which is not "
                              "an expert weight of an experts module that declares its layout (transformers' "
                              f"use_experts_implementation); the candidate parameters are {_listing(usable)}")
        for k in hits:
            mod, pname = usable[k]
            chosen.setdefault(mod, [])
            if pname not in chosen[mod]:
                chosen[mod].append(pname)
    out = {}
    for mod, names in chosen.items():
        module = model.get_submodule(mod)
        owner = module.base_layer if isinstance(module, LoraExperts) else module
        out[mod] = tuple(n for n in adaptable_names(owner) if n in names)
    return out


def weight_shape(module: nn.Module, pname: str) -> tuple[int, int, int]:
    """``(experts, out, in)`` of weight ``pname`` of an experts module (or a router: one expert)."""
    owner = module.base_layer if isinstance(module, LoraExperts) else module
    w = getattr(owner, pname)
    if w.dim() == 2:
        return 1, w.shape[0], w.shape[1]
    E, d1, d2 = w.shape
    return (E, d2, d1) if owner.is_transposed else (E, d1, d2)


def init_expert_factors(module: nn.Module, pname: str, r: int, init: str = "kaiming",
                        dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA's starting factors for every expert of weight ``pname``: ``A (E, r, in)``, each expert's drawn as a
    layer's (:func:`~lispetorch.layer.init_factors`), and ``B (E, out, r)`` zeros."""
    owner = module.base_layer if isinstance(module, LoraExperts) else module
    w = getattr(owner, pname)
    E, out_f, in_f = weight_shape(owner, pname)
    pairs = [init_factors(r, in_f, out_f, init, dtype or w.dtype, w.device) for _ in range(E)]
    return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])


def adaptable_names(module: nn.Module) -> tuple[str, ...]:
    """The weights of ``module`` a :class:`LoraExperts` can adapt: an experts module's expert weights, in the order
    its forward applies them, or a router's 2-D weights."""
    return weight_names(module) if declares_layout(module) else single_weights(module)


def parameter_targets(names: list[str], model: nn.Module) -> list[str]:
    """PEFT's ``target_parameters`` that select exactly the weights ``names`` (full parameter names) among all the
    base model's parameters, by PEFT's rule (a name equal to a parameter's, or a dotted suffix of it): for each,
    its shortest suffix (``gate_up_proj``, ``gate.weight``) that selects no other."""
    universe = {n.replace(".base_layer", "") for n, _ in model.named_parameters() if ".lora_" not in n}
    universe |= set(expert_parameters(model))
    wanted, out = set(names), set()
    for name in names:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(u in wanted for u in universe if u == suffix or u.endswith("." + suffix)):
                out.add(suffix)
                break
    return sorted(out)


def _listing(found: dict) -> str:
    # a router's weight by its module's name too (gate.weight), as target_parameters names it
    names = sorted({".".join(k.split(".")[-2:]) if k.endswith(".weight") else k.rsplit(".", 1)[-1] for k in found})
    return f"{names} (e.g. {sorted(found)[0]!r}, {len(found)} in all)" if found else "none"


# --- PEFT's layout -------------------------------------------------------------------------------------------
def to_peft(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``lora_A`` ``(r·E, in)`` (expert-major) and ``lora_B`` ``(out, r·E)`` (rank-major: column
    ``k·E + e`` is column ``k`` of ``B_e``) from ``A (E, r, in)`` and ``B (E, out, r)``."""
    E, r, n_in = A.shape
    return A.reshape(E * r, n_in), B.permute(1, 2, 0).reshape(B.shape[1], r * E)


def from_peft(A: torch.Tensor, B: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`to_peft`: ``A (E, r, in)`` and ``B (E, out, r)``."""
    rE, n_in = A.shape
    r = rE // num_experts
    return A.reshape(num_experts, r, n_in), B.reshape(B.shape[0], r, num_experts).permute(2, 0, 1)


def nesting_order(module: nn.Module, params: tuple[str, ...]) -> list[str]:
    """``params`` in the order PEFT wraps them: the order the experts module declares its parameters (PEFT nests
    one wrapper per parameter, the first innermost)."""
    owner = module.base_layer if isinstance(module, LoraExperts) else module
    declared = [n for n, _ in owner.named_parameters(recurse=False)]
    return sorted(params, key=declared.index)


def peft_module_names(name: str, module: nn.Module, params: tuple[str, ...]) -> dict[str, str]:
    """The module name PEFT gives each adapted weight of the experts module ``name`` in its files: the module
    itself for the outermost wrapper, ``<name>.base_layer`` for the next, and so on."""
    order = nesting_order(module, params)
    return {p: name + ".base_layer" * (len(order) - 1 - i) for i, p in enumerate(order)}


def peft_weight_names(model: nn.Module, selection: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, str]]:
    """PEFT's module name of each selected weight (``{experts module: weight names}``, as :func:`match_parameters`
    gives them) → ``(experts module, weight)``."""
    return {key_mod: (mod, p) for mod, params in selection.items()
            for p, key_mod in peft_module_names(mod, model.get_submodule(mod), params).items()}


def unnest(name: str) -> tuple[str, int]:
    """``(module name, depth)`` of a PEFT module name with ``depth`` trailing ``.base_layer`` parts."""
    depth = 0
    while name.endswith(".base_layer"):
        name, depth = name[:-len(".base_layer")], depth + 1
    return name, depth


class LoraExperts(AdapterSwitch, WrapsBaseLayer, nn.Module):
    """An experts module with a low-rank adapter per expert on some of its weights (``gate_up_proj`` or
    ``up_proj``, ``down_proj``): expert ``e`` computes with ``W_e + s·B_e A_e`` on the tokens routed to it.

    Holds any number of named adapters, one active at a time, like :class:`~lispetorch.LoraLinear`: the factors
    of adapter ``n`` on weight ``p`` are ``lora_A[n][p]`` ``(E, r, in)`` and ``lora_B[n][p]`` ``(E, out, r)``,
    its hyperparameters ``settings[n]``. Merging folds the active adapter into the expert weights, exactly
    reversibly.

    A router (a module with a forward of its own and a 2-D weight ``(experts, hidden)``) is wrapped the same way,
    as one expert (:attr:`single`): its forward runs over ``W + s·B A``, the dropout not applied (``x`` meets
    ``W`` inside that forward).

    Args:
        base_layer (nn.Module): the experts module (it must declare its layout, see :func:`declares_layout`), or a
            router.
        parameters (tuple[str, ...]): the weights to adapt.
    """

    dropout_seeds: list[int] | None = None  # as LoraLinear's; the routed rows are not per sample (one seed a call)

    def __init__(self, base_layer: nn.Module, parameters: tuple[str, ...]) -> None:
        super().__init__()
        names = adaptable_names(base_layer)
        unknown = [p for p in parameters if p not in names]
        if unknown or not parameters:
            raise ConfigError(f"{type(base_layer).__name__}: can adapt {list(names)} (an experts module declaring "
                              f"its layout, {', '.join(LAYOUT)}, or a router's 2-D weights), got {list(parameters)}")
        self.base_layer = base_layer
        self.parameter_names = tuple(p for p in names if p in parameters)
        # single: a router's 2-D weight, adapted as one expert of one (its forward is the module's own, run with
        # W + s·B A in place of W)
        self.single = not declares_layout(base_layer)
        self.num_experts = 1 if self.single else base_layer.num_experts
        self.lora_A = nn.ModuleDict()  # adapter -> {weight name -> (E, r, in)}
        self.lora_B = nn.ModuleDict()  # adapter -> {weight name -> (E, out, r)}
        # each adapter's settings on each weight (rank, alpha), and those of its first weight as `settings`, which
        # code reading any adapter layer's dropout or rsLoRA flag finds as on a LoraLinear
        self.weight_settings: dict[str, dict[str, AdapterSettings]] = {}
        self.settings: dict[str, AdapterSettings] = {}
        # What a LoraLinear also holds, always empty here (no r×r core, no SVD init, no NF4 factors, no DoRA), so
        # that code walking every adapter layer finds them.
        self.lora_R, self.lora_magnitude_vector = nn.ParameterDict(), nn.ParameterDict()
        self.lora_R_fn, self.lora_nf4, self.base_offset = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self._active_adapter: str | None = None
        self._enabled = True
        self.merged_adapter: str | None = None
        self._merge_state: dict | None = None
        self.batch_adapters: tuple[str | None, ...] | None = None
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.train(base_layer.training)

    # --- state, as LoraLinear's ----------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    def compiled_view(self) -> None:
        """Nothing to refresh: the forward reads the containers directly (kept for the adapter-layer protocol)."""

    @property
    def r(self) -> MappingProxyType:
        """Rank by adapter name."""
        return MappingProxyType({n: s.r for n, s in self.settings.items()})

    @property
    def scaling(self) -> MappingProxyType:
        """Scaling ``s`` by adapter name."""
        return MappingProxyType({n: s.scaling for n, s in self.settings.items()})

    @property
    def use_dora(self) -> MappingProxyType:
        return MappingProxyType(dict.fromkeys(self.settings, False))

    @property
    def is_transposed(self) -> bool:
        return not self.single and bool(self.base_layer.is_transposed)

    def expert_weight(self, pname: str) -> torch.Tensor:
        """Weight ``pname`` of every expert as ``(E, out, in)`` (a transposed view of a transposed stack; a
        router's ``(out, in)`` as ``(1, out, in)``)."""
        w = getattr(self.base_layer, pname)
        return w.unsqueeze(0) if self.single else w.transpose(1, 2) if self.is_transposed else w

    def shape_of(self, pname: str) -> tuple[int, int]:
        """``(out, in)`` of one expert's weight ``pname``."""
        _, out_f, in_f = self.expert_weight(pname).shape
        return out_f, in_f

    # --- factors -------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    init: str = "kaiming", dtype: torch.dtype | None = None) -> None:
        """Adds adapter ``name`` of rank ``r`` on every adapted weight: each expert's A as LoRA's init, B zeros."""
        factors = {p: init_expert_factors(self, p, r, init, dtype) for p in self.parameter_names}
        self.set_factors(name, factors, alpha, dropout, use_rslora)

    def set_factors(self, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float,
                    dropout: float = 0.0, use_rslora: bool = False, alphas: dict[str, float] | None = None) -> None:
        """Installs (or replaces) adapter ``name``: ``factors`` maps each adapted weight to ``(A (E, r, in),
        B (E, out, r))``, each weight with its own rank (one for all its experts) and its alpha from ``alphas``
        (else ``alpha``).

        Raises:
            AdapterStateError: the adapter is merged. ValueError: a weight not adapted here, or factors whose
                shapes do not fit (named with both shapes).
        """
        if self.merged_adapter == name:
            raise merged_error(name)
        if set(factors) != set(self.parameter_names):
            raise ConfigError(f"adapter {name!r}: factors for {sorted(factors)}, but this layer adapts "
                              f"{list(self.parameter_names)}")
        alphas = alphas or {}
        per_weight = {}
        for p in self.parameter_names:
            A, B = factors[p]
            out_f, in_f = self.shape_of(p)
            E = self.num_experts
            r = A.shape[1] if A.dim() == 3 else -1
            if r <= 0 or A.shape != (E, r, in_f) or B.shape != (E, out_f, r):
                raise ShapeError(f"adapter {name!r} on {p}: expected A ({E}, r, {in_f}) and B ({E}, {out_f}, r) with "
                                 f"r ≥ 1, got A {tuple(A.shape)} and B {tuple(B.shape)}")
            per_weight[p] = AdapterSettings(r=r, alpha=float(alphas.get(p, alpha)), use_rslora=bool(use_rslora),
                                            dropout=float(dropout))
        self.lora_A[name] = nn.ParameterDict({p: nn.Parameter(A) for p, (A, _) in factors.items()})
        self.lora_B[name] = nn.ParameterDict({p: nn.Parameter(B) for p, (_, B) in factors.items()})
        self.weight_settings[name] = per_weight
        self.settings[name] = per_weight[self.parameter_names[0]]

    def factors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Adapter ``name``'s ``(A (E, r, in), B (E, out, r))`` by weight name."""
        return {p: (self.lora_A[name][p], self.lora_B[name][p]) for p in self.parameter_names}

    def delete_adapter(self, name: str) -> None:
        """Removes adapter ``name``.

        Raises:
            AdapterStateError: it is merged (unmerge first).
        """
        if self.merged_adapter == name:
            raise merged_error(name, then="unmerge before deleting it")
        del self.lora_A[name], self.lora_B[name]
        del self.settings[name], self.weight_settings[name]
        if self._active_adapter == name:
            self._active_adapter = None

    def adapter_parameters(self, name: str) -> dict[str, list[nn.Parameter]]:
        """The parameters of adapter ``name`` by factor (``R`` and ``M`` empty: no core, no DoRA here)."""
        return {"A": list(self.lora_A[name].values()), "B": list(self.lora_B[name].values()), "R": [], "M": []}

    def factor_containers(self) -> list[nn.Module]:
        """The containers holding the factors (which freezing the rest of a model leaves alone)."""
        return [*self.lora_A.values(), *self.lora_B.values()]

    def training_adapters(self) -> list[str]:
        """The adapters any of whose factors require grad."""
        return [n for n in self.lora_A if any(p.requires_grad for ps in self.adapter_parameters(n).values()
                                              for p in ps)]

    def set_trainable(self, name: str, trainable: bool) -> None:
        """Turns training of adapter ``name`` on or off."""
        for ps in self.adapter_parameters(name).values():
            for p in ps:
                p.requires_grad_(trainable)

    # --- forward -------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """The experts module's forward ``(hidden_states, top_k_index, top_k_weights)`` with each routed token
        through its expert's adapter (a router: its own forward, over ``W + s·B A``)."""
        if self.batch_adapters is not None and self.enabled and \
                any(n is not None and n in self.lora_A for n in self.batch_adapters):
            raise AdapterStateError("a mixed-adapter batch names an adapter that holds expert weights "
                                    f"({sorted(n for n in set(self.batch_adapters) if n in self.lora_A)}): mixed-"
                                    "adapter batches take adapters on linear layers")
        name = self.active_adapter
        if not self.enabled or name is None or name not in self.lora_A or self.merged_adapter is not None:
            return self.base_layer(*args, **kwargs)
        if self.single:  # the module's own forward over W + s·B A
            weights = {}
            for p in self.parameter_names:
                w = getattr(self.base_layer, p)
                A, B = self.lora_A[name][p][0].to(w.dtype), self.lora_B[name][p][0].to(w.dtype)
                weights[p] = w + (B @ A) * self.weight_settings[name][p].scaling
            return torch.func.functional_call(self.base_layer, weights, args, kwargs, strict=False)
        names = ("hidden_states", "top_k_index", "top_k_weights")
        given = dict(zip(names, args, strict=False)) | kwargs
        if len(args) > 3 or set(given) != set(names):
            raise TypeError(f"{type(self.base_layer).__name__} adapted: forward takes (hidden_states, top_k_index, "
                            f"top_k_weights), got {len(args)} positional and {sorted(kwargs)}")
        hidden_states, top_k_index, top_k_weights = (given[n] for n in names)
        base = self.base_layer
        if getattr(base, "_is_expert_parallel", False):
            raise AdapterStateError("expert adapters under expert parallelism are not supported")
        E = self.num_experts
        k = top_k_index.shape[-1]
        ids = top_k_index.reshape(-1)
        weights = top_k_weights.reshape(-1)
        # An index of E or more is a sentinel (no expert), as in transformers' eager forward: such a row goes to the
        # last expert with weight 0, so that every shape here is known before the routing (torch.compile traces it).
        kept = ids < E
        ids = torch.where(kept, ids, E - 1)
        weights = torch.where(kept, weights, torch.zeros_like(weights))
        rows = torch.argsort(ids, stable=True)  # the (token, slot) rows, grouped by expert
        ids = ids[rows]
        tokens = torch.div(rows, k, rounding_mode="floor")
        offsets = torch.zeros(E, dtype=torch.long, device=ids.device).index_add_(
            0, ids, torch.ones_like(ids)).cumsum(0)  # (E,): each expert's block ends here
        first, second = weight_names(base)
        h = self._project(first, name, hidden_states[tokens], offsets)
        h = base._apply_gate(h) if base.has_gate else base.act_fn(h)
        h = self._project(second, name, h, offsets)
        if getattr(base, "has_post_expert_norm", False):
            h = base.post_expert_norm(h)
        h = h * weights[rows].unsqueeze(-1)
        out = torch.zeros(hidden_states.shape[0], h.shape[-1], dtype=h.dtype, device=h.device)
        return out.index_add_(0, tokens, h).to(hidden_states.dtype)

    def _project(self, pname: str, name: str, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        w = self.expert_weight(pname)  # (E, out, in)
        bias = getattr(self.base_layer, f"{pname}_bias") if self.base_layer.has_bias else None
        dtype = w.dtype
        if pname in self.lora_A[name]:
            settings = self.weight_settings[name][pname]
            A, B = self.lora_A[name][pname].to(dtype), self.lora_B[name][pname].to(dtype)
            scale, p = settings.scaling, (settings.dropout if self.training else 0.0)
        else:  # this weight is not adapted: rank 0, the experts alone
            A, B = w.new_empty((w.shape[0], 0, w.shape[2])), w.new_empty((w.shape[0], w.shape[1], 0))
            scale, p = 0.0, 0.0
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        return ops.lora_experts_linear(x.to(dtype), w, bias, A, B, offsets, scale, p, seed)

    # --- merge ---------------------------------------------------------------------------------------------
    def _factor_versions(self, name: str) -> tuple[int, ...]:
        return tuple(p._version for ps in self.adapter_parameters(name).values() for p in ps)

    @staticmethod
    def _merge_one(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, transposed: bool, scale: float, safe: bool):
        # expert e's stored matrix: (out, in) takes s·B A; (in, out) (a transposed stack) takes s·Aᵀ Bᵀ
        return ops.lora_merge_(w, B.t(), A.t(), None, scale, safe) if transposed else \
            ops.lora_merge_(w, A, B, None, scale, safe)

    def _fingerprint(self, pname: str) -> tuple[torch.Tensor, torch.Tensor]:
        w = local_part(getattr(self.base_layer, pname))  # this process's shard under FSDP2
        return weight_fingerprint(w if w.dim() == 2 else w.flatten(0, 1))

    @contextlib.contextmanager
    def _whole_stacks(self):
        """``{weight name: stack}``: each adapted weight whole (gathered under FSDP2 and each process's shard written
        back when the block ends without an error, see :func:`~lispetorch.layer.whole_weight`), with one leading
        expert dimension."""
        with contextlib.ExitStack() as stack:
            yield {p: (lambda w: w.unsqueeze(0) if self.single else w)(
                stack.enter_context(whole_weight(getattr(self.base_layer, p)))) for p in self.parameter_names}

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """Folds the active adapter into every adapted expert weight, keeping what makes :meth:`unmerge` exact.

        Raises:
            RuntimeError: with ``safe``, a merge that would put NaN or Inf into a weight (every weight is left as
                it was).
        """
        if self.merged_adapter is not None or self.active_adapter is None or self.active_adapter not in self.lora_A:
            return
        name = self.active_adapter
        state: dict[str, list] = {}
        with self._whole_stacks() as stacks:
            try:
                for p, (A, B) in self.factors(name).items():
                    scale = self.weight_settings[name][p].scaling
                    state[p] = []
                    for e in range(self.num_experts):
                        state[p].append(self._merge_one(stacks[p][e], A[e], B[e], self.is_transposed, scale, safe))
            except BaseException:
                self._unmerge_state(name, state, stacks, exact=True)
                raise
        self._merge_state = {"state": state, "versions": self._factor_versions(name),
                             "fingerprints": {p: self._fingerprint(p) for p in state}}
        self.merged_adapter = name

    def _unmerge_state(self, name: str, state: dict[str, list], stacks: dict[str, torch.Tensor], exact: bool) -> None:
        for p, per_expert in state.items():
            A, B = self.lora_A[name][p], self.lora_B[name][p]
            scale = self.weight_settings[name][p].scaling
            for e, saved in enumerate(per_expert):
                a, b = (B[e].t(), A[e].t()) if self.is_transposed else (A[e], B[e])
                ops.lora_unmerge_(stacks[p][e], a, b, None, scale, saved if exact else None)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtracts the merged adapter; bit-exact if nothing changed the weights or the factors since."""
        name = self.merged_adapter
        if name is None:
            return
        merged = self._merge_state
        exact = merged["versions"] == self._factor_versions(name) and all(
            all(torch.equal(a, b) for a, b in zip(self._fingerprint(p), fp, strict=True))
            for p, fp in merged["fingerprints"].items())
        if not exact:
            warnings.warn(f"the expert weights or adapter {name!r} changed while merged: unmerging by subtraction "
                          "(not bit-exact)", stacklevel=2)
        with self._whole_stacks() as stacks:
            self._unmerge_state(name, merged["state"], stacks, exact)
        self.merged_adapter = None
        self._merge_state = None

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: " + "/".join(f"r={s.r}" for s in w.values()) for n, w in self.weight_settings.items())
        return (f"experts={self.num_experts}, weights={list(self.parameter_names)}, adapters=[{ranks}], "
                f"active={self.active_adapter!r}")

