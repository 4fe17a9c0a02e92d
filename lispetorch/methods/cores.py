"""Parametrised r×r cores: modules whose ``forward()`` returns the R of ``y = x Wᵀ + b + s·((x Aᵀ) Rᵀ) Bᵀ``.

The adapter layer calls the core at every forward and hands the result to the native operator as its R input,
so autograd flows from the operator's gradient for R into these parameters. Rotations are computed in float32.
"""

from __future__ import annotations

import torch
from torch import nn


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
    """``way0``: a free ``r×r`` matrix (identity at init); orthogonality only through a penalty."""

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
    """``way1``: ``Q = Πₖ G(iₖ, jₖ, θₖ)`` over all ``r(r−1)/2`` planes (angles from 0).

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
    """``way2``: ``Q = (I − K)⁻¹ (I + K)`` with the low-rank skew-symmetric ``K = X Yᵀ − Y Xᵀ``, exactly orthogonal.

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
    """``way3``: ``Q = exp(K)`` with ``K = M − Mᵀ`` from the strictly upper triangle ``M`` (zero at init)."""

    def __init__(self, r: int, init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(r, r) if init is None else init.clone().float())

    def forward(self) -> torch.Tensor:
        M = torch.triu(self.weight, diagonal=1)
        return torch.linalg.matrix_exp(M - M.t())


def make_rotation(method: str, r: int, skew_rank: int, identity: bool, generator: torch.Generator) -> nn.Module:
    """The rotation module of ``method`` (``way0``–``way3``), at the identity or at a random rotation."""
    if method == "way0":
        init = None if identity else torch.linalg.qr(torch.randn(r, r, generator=generator))[0]
        return FreeMatrix(r, init)
    if method == "way1":
        count = r * (r - 1) // 2
        return GivensRotation(r, None if identity else (torch.rand(count, generator=generator) * 2 - 1) * torch.pi)
    if method == "way2":
        return CayleyRotation(r, skew_rank, generator, identity)
    if method == "way3":
        return ExpRotation(r, None if identity else torch.randn(r, r, generator=generator))
    raise ValueError(f"unknown rotation method {method!r}; choose one of way0, way1, way2, way3")


class RotationalCore(nn.Module):
    """Rotational PiSSA's core ``R = R_U diag(S) R_Vᵀ`` ``(r, r)``.

    Args:
        S (Tensor): ``(r,)`` the singular values divided by the adapter scaling, so ``s · U_r R V_rᵀ`` is the
            principal part; trained unless ``freeze_singular_values``.
        method (str): ``way0``–``way3``, see :class:`~lispetorch.RotationalPiSSAConfig`.
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
        self.method = method
        self.rot_U = make_rotation(method, r, skew_rank, identity, generator)
        self.rot_V = make_rotation(method, r, skew_rank, identity, generator)

    def forward(self) -> torch.Tensor:
        return (self.rot_U() * self.S) @ self.rot_V().t()  # R_U diag(S) R_Vᵀ, (r, r)

    def rotations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R_U, R_V)``."""
        return self.rot_U(), self.rot_V()

    def orthogonality_penalty(self) -> torch.Tensor:
        """``‖R_UᵀR_U − I‖² + ‖R_VᵀR_V − I‖²`` for ``way0``; zero for the exactly orthogonal ways."""
        if self.method != "way0":
            return self.S.new_zeros(())
        return self.rot_U.orthogonality_penalty() + self.rot_V.orthogonality_penalty()


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
