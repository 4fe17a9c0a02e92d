"""Rotational PiSSA: ``W = W_res + U_r R_U diag(S) R_Vᵀ V_rᵀ`` with ``U_r``, ``V_r`` and the residual ``W_res``
frozen, and the rotations ``R_U``, ``R_V`` (and ``S``) trained.

On the one operator: ``A = V_rᵀ`` and ``B = U_r`` are frozen, and the core ``R = R_U diag(S/s) R_Vᵀ`` is
computed at every forward by a :class:`RotationalCore` (in float32) and handed to the operator as its R input, so
autograd flows from the operator's gradient for R into the rotations' parameters. The base becomes
``W − s·B R₀ A`` for the ``R₀`` actually produced at init. The parametrisations of ``R_U`` and ``R_V``:
``penalty`` (free matrices with an orthogonality penalty, :func:`orthogonality_loss`), ``givens``, ``cayley``,
``exp`` (exactly orthogonal); the Rotational PiSSA documents call them ``way0``–``way3``.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..adapters import (
    AdapterPlan,
    active_adapter,
    adapter_layers,
    base_weight,
    check_layers,
    install,
    select_for_new_adapter,
)
from ..config import ROTATION_ALIASES, ROTATION_METHODS, RotationalPiSSAConfig
from ..errors import AdapterStateError, ConfigError
from ..hf import parse_dtype
from ..layer import LoraLinear
from ..nf4 import NF4Weight
from ..peft_format import exact_targets
from ..targets import quantize_nf4


# --- the rotations ---------------------------------------------------------------------------------------------
def _round_robin(r: int) -> list[list[tuple[int, int]]]:
    """The ``r(r−1)/2`` planes ``(i, j)`` in rounds of disjoint pairs (the circle method)."""
    n = r + (r % 2)
    players = list(range(n))
    rounds = []
    for _ in range(n - 1):
        pairs = [(min(players[k], players[n - 1 - k]), max(players[k], players[n - 1 - k])) for k in range(n // 2)]
        rounds.append([p for p in pairs if p[1] < r])
        players = [players[0], players[-1], *players[1:-1]]
    return rounds


class FreeMatrix(nn.Module):
    """``penalty`` (``way0``): a free ``r×r`` matrix (identity at init); orthogonality only through a penalty."""

    def __init__(self, r: int, init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(r) if init is None else init.clone().float())

    def forward(self) -> torch.Tensor:
        return self.weight

    def orthogonality_penalty(self) -> torch.Tensor:
        """``‖MᵀM − I‖²_F``."""
        M = self.weight
        return (M.t() @ M - torch.eye(M.shape[0], dtype=M.dtype, device=M.device)).pow(2).sum()


class GivensRotation(nn.Module):
    """``givens`` (``way1``): ``Q = Πₖ G(iₖ, jₖ, θₖ)`` over all ``r(r−1)/2`` planes (angles from 0).

    The planes are grouped in ``r−1`` rounds of disjoint planes; each round is one matrix, all rounds are built in
    one batched ``index_put`` and multiplied in a balanced tree (``⌈log₂(r−1)⌉`` batched products), so
    ``Q = G_{r−2} ⋯ G₁ G₀`` with ``G_t = Π_{(i, j) ∈ round t} G(i, j, θ)``.
    """

    def __init__(self, r: int, angles: torch.Tensor | None = None) -> None:
        super().__init__()
        self.r = r
        rounds = _round_robin(r)
        planes = [(t, i, j) for t, rnd in enumerate(rounds) for i, j in rnd]
        self.rounds = len(rounds)
        self.angles = nn.Parameter(torch.zeros(len(planes)) if angles is None else angles.clone().float())
        for k, name in enumerate(("t", "i", "j")):
            self.register_buffer(name, torch.tensor([p[k] for p in planes], dtype=torch.long), persistent=False)

    def forward(self) -> torch.Tensor:
        eye = torch.eye(self.r, dtype=self.angles.dtype, device=self.angles.device)
        if self.rounds == 0:
            return eye
        c, s = torch.cos(self.angles), torch.sin(self.angles)
        t, i, j = self.t, self.i, self.j
        G = eye.expand(self.rounds, self.r, self.r)  # (rounds, r, r): one matrix per round of disjoint planes
        G = G.index_put((t, i, i), c).index_put((t, j, j), c).index_put((t, i, j), -s).index_put((t, j, i), s)
        while G.shape[0] > 1:  # G[k] is applied after G[k-1]
            if G.shape[0] % 2:
                G = torch.cat([G, eye[None]])
            G = G[1::2] @ G[0::2]
        return G[0]


class CayleyRotation(nn.Module):
    """``cayley`` (``way2``): ``Q = (I − K)⁻¹ (I + K)`` with the low-rank skew-symmetric ``K = X Yᵀ − Y Xᵀ``,
    exactly orthogonal.

    ``X`` starts at zero and ``Y`` small and random, so ``Q = I`` at init and the gradient for ``X`` is non-zero.
    """

    def __init__(self, r: int, rank: int, generator: torch.Generator, identity: bool = True) -> None:
        super().__init__()
        k = min(rank, r)
        self.X = nn.Parameter(torch.zeros(r, k) if identity else torch.randn(r, k, generator=generator) * 0.1)
        self.Y = nn.Parameter(torch.randn(r, k, generator=generator) * 0.1)

    def forward(self) -> torch.Tensor:
        K = self.X @ self.Y.t() - self.Y @ self.X.t()  # (r, r), skew-symmetric
        eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
        return torch.linalg.solve(eye - K, eye + K)


class ExpRotation(nn.Module):
    """``exp`` (``way3``): ``Q = exp(K)`` with ``K = M − Mᵀ`` from the strictly upper triangle ``M`` (zero at init)."""

    def __init__(self, r: int, init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(r, r) if init is None else init.clone().float())

    def forward(self) -> torch.Tensor:
        M = torch.triu(self.weight, diagonal=1)
        return torch.linalg.matrix_exp(M - M.t())


def make_rotation(method: str, r: int, skew_rank: int, identity: bool, generator: torch.Generator) -> nn.Module:
    """The rotation module of ``method`` (``penalty``, ``givens``, ``cayley``, ``exp`` or their aliases
    ``way0``–``way3``), at the identity or at a random rotation."""
    rotation = ROTATION_ALIASES.get(method, method)
    if rotation == "penalty":
        init = None if identity else torch.linalg.qr(torch.randn(r, r, generator=generator))[0]
        return FreeMatrix(r, init)
    if rotation == "givens":
        count = r * (r - 1) // 2
        return GivensRotation(r, None if identity else (torch.rand(count, generator=generator) * 2 - 1) * torch.pi)
    if rotation == "cayley":
        return CayleyRotation(r, skew_rank, generator, identity)
    if rotation == "exp":
        return ExpRotation(r, None if identity else torch.randn(r, r, generator=generator))
    raise ConfigError(f"unknown rotation method {method!r}; choose one of {', '.join(ROTATION_METHODS)}")


class RotationalCore(nn.Module):
    """Rotational PiSSA's core ``R = R_U diag(S) R_Vᵀ`` ``(r, r)``.

    Args:
        S (Tensor): ``(r,)`` the singular values divided by the adapter scaling, so ``s · U_r R V_rᵀ`` is the
            principal part; trained unless ``freeze_singular_values``.
        method (str): the rotation's parametrisation, see :class:`~lispetorch.RotationalPiSSAConfig`.
    """

    def __init__(self, S: torch.Tensor, method: str, skew_rank: int = 2, identity: bool = True,
                 freeze_singular_values: bool = False, generator: torch.Generator | None = None,
                 reg_weight: float = 0.0) -> None:
        super().__init__()
        self.reg_weight = float(reg_weight)  # λ of way0's orthogonality penalty
        r = S.shape[0]
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        S = S.detach().float().clone()
        if freeze_singular_values:
            self.register_buffer("S", S)
        else:
            self.S = nn.Parameter(S)
        self.method = ROTATION_ALIASES.get(method, method)  # the descriptive name
        self.rot_U = make_rotation(method, r, skew_rank, identity, generator)
        self.rot_V = make_rotation(method, r, skew_rank, identity, generator)

    def forward(self) -> torch.Tensor:
        return (self.rot_U() * self.S) @ self.rot_V().t()  # R_U diag(S) R_Vᵀ, (r, r)

    def rotations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R_U, R_V)``, each ``(r, r)``."""
        return self.rot_U(), self.rot_V()

    def orthogonality_penalty(self) -> torch.Tensor:
        """``‖R_UᵀR_U − I‖² + ‖R_VᵀR_V − I‖²`` for ``penalty``; zero for the exactly orthogonal parametrisations."""
        if self.method != "penalty":
            return self.S.new_zeros(())
        return self.rot_U.orthogonality_penalty() + self.rot_V.orthogonality_penalty()



# --- injection ------------------------------------------------------------------------------------------------
def inject(model: nn.Module, config: RotationalPiSSAConfig, adapter_name: str = "default",
           calibration_batches=None) -> dict[str, LoraLinear]:
    """:func:`~lispetorch.inject` for :class:`~lispetorch.RotationalPiSSAConfig`."""
    dtype = parse_dtype(config.dtype)
    chosen = select_for_new_adapter(model, config, adapter_name)
    check_layers(chosen, config.r, "Rotational PiSSA")
    s = config.scaling
    generator = torch.Generator().manual_seed(0)
    plans = {}
    stored: dict[str, tuple[NF4Weight, NF4Weight]] = {}
    for name, module in chosen.items():
        w = base_weight(module)
        U, S, Vh = ops.svd_factors(w, config.r)
        if config.quantize_base_components:  # U_r and V_r in NF4 (the residual absorbs the rounding)
            fdtype = dtype or w.dtype
            stored[name] = (NF4Weight(Vh.to(fdtype)), NF4Weight(U.to(fdtype)))
            Vh, U = stored[name][0].dequantize(), stored[name][1].dequantize()
        core = RotationalCore(S / s, config.method, config.skew_rank, config.init_identity,
                              config.freeze_singular_values, generator, config.orthogonality_reg_weight).to(w.device)
        plans[name] = AdapterPlan(Vh.to(dtype or w.dtype), U.to(dtype or w.dtype), config.lora_alpha, config.dropout,
                            R_fn=core, frozen=("A", "B"), offset=True)
    layers = install(model, chosen, plans, adapter_name)
    for name, (qa, qb) in stored.items():  # the dense copies freed: U_r and V_r held in NF4 only
        layers[name].store_factors_nf4(adapter_name, qa, qb)
    if config.quantize_residual:
        quantize_nf4(model, exact_targets(layers))
    return layers


def orthogonality_loss(model: nn.Module, adapter_name: str | None = None, weight: float | None = None) -> torch.Tensor:
    """Rotational PiSSA's ``penalty`` (``way0``) term ``λ Σ_layers (‖R_UᵀR_U − I‖² + ‖R_VᵀR_V − I‖²)``, differentiable.

    Args:
        model (nn.Module): a model with a Rotational PiSSA adapter.
        adapter_name (str | None): the adapter; the active one when None.
        weight (float | None): λ; the one the adapter was injected with when None.

    Returns:
        Tensor: a scalar (zero for ``givens``, ``cayley`` and ``exp``, whose rotations are exactly orthogonal).

    Raises:
        AdapterStateError: the adapter is not a Rotational PiSSA adapter.
    """
    name = adapter_name or active_adapter(model)
    total, lam = None, weight
    for layer in adapter_layers(model).values():
        core = layer.lora_R_fn[name] if name in layer.lora_R_fn else None
        if isinstance(core, RotationalCore):
            pen = core.orthogonality_penalty()
            total = pen if total is None else total + pen
            lam = core.reg_weight if lam is None else lam
    if total is None:
        raise AdapterStateError(f"adapter {name!r} is not a Rotational PiSSA adapter")
    return lam * total
