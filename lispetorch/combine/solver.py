"""Combination weights from the Gram matrix: least squares on the simplex, non-negative, or unconstrained.

Given ``G[i, j] = ⟨ΔWᵢ, ΔWⱼ⟩``, ``b[i] = ⟨ΔWᵢ, T⟩`` and ``c = ‖T‖²`` (summed over modules), the squared residual of
weights ``w`` is ``f(w) = ‖Σ wᵢ ΔWᵢ − T‖² = wᵀGw − 2bᵀw + c``. The problem has k unknowns (the number of
checkpoints), so it is solved exactly: a primal active-set method (Nocedal & Wright, *Numerical Optimization*,
Algorithm 16.3) that ends at a point where every KKT condition holds, which :func:`kkt` then checks:

    simplex:      min f(w)  s.t.  Σ wᵢ = 1,  w ≥ 0      ∇f/2 = Gw − b = −ν·1 + μ,  μ ≥ 0,  μᵢwᵢ = 0
    nonnegative:  min f(w)  s.t.  w ≥ 0                  Gw − b = μ,  μ ≥ 0,  μᵢwᵢ = 0
    unconstrained: min f(w)                              Gw − b = 0  (minimum-norm solution if G is singular)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import AdapterFormatError, ConfigError, ShapeError

CONSTRAINTS = ("simplex", "nonnegative", "unconstrained")
METHODS = {"simplex": "simplex_active_set", "nonnegative": "nonnegative_active_set",
           "unconstrained": "unconstrained_least_squares"}


@dataclass
class Solution:
    """Weights, their squared residual ``f(w)``, the KKT report and the method's name."""

    weights: np.ndarray
    objective: float
    kkt: dict
    method: str
    iterations: int


def objective(G: np.ndarray, b: np.ndarray, c: float, w: np.ndarray) -> float:
    """``wᵀGw − 2bᵀw + c``, the squared Frobenius residual, clamped at 0 (rounding can push it below)."""
    return max(float(w @ G @ w - 2.0 * b @ w + c), 0.0)


def _check(G, b):
    G = np.asarray(G, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1] or b.shape != (G.shape[0],) or G.shape[0] == 0:
        raise ShapeError(f"the Gram matrix must be (k, k) and b (k,), got {G.shape} and {b.shape}")
    if not (np.isfinite(G).all() and np.isfinite(b).all()):
        raise AdapterFormatError("the Gram matrix or the cross products hold NaN or Inf (a checkpoint holds non-finite "
                                 "values)")
    return (G + G.T) / 2.0, b


def _scale(G, b) -> float:
    return max(float(np.abs(G).max()), float(np.abs(b).max()), np.finfo(np.float64).tiny)


def _subproblem(G, g, F, simplex):
    """The step p on the free set F minimising ½pᵀGp + gᵀp with p = 0 off F (and Σp = 0 for the simplex)."""
    k = len(g)
    p = np.zeros(k)
    if len(F) == 0:
        return p
    GF = G[np.ix_(F, F)]
    if simplex:
        n = len(F)
        K = np.zeros((n + 1, n + 1))
        K[:n, :n] = GF
        K[:n, n] = K[n, :n] = 1.0
        rhs = np.concatenate([-g[F], [0.0]])
        sol = np.linalg.lstsq(K, rhs, rcond=None)[0]
        p[F] = sol[:n]
    else:
        p[F] = np.linalg.lstsq(GF, -g[F], rcond=None)[0]
    return p


def _active_set(G, b, simplex: bool, tol: float):
    k = len(b)
    if simplex:
        j = int(np.argmin(np.diag(G) / 2.0 - b))  # the best vertex
        w = np.zeros(k)
        w[j] = 1.0
        free = np.zeros(k, dtype=bool)
        free[j] = True
    else:
        w = np.zeros(k)
        free = np.zeros(k, dtype=bool)
    max_iter = 50 * k + 100
    at_minimum = False  # True right after a full step: w minimises f on the current face
    for it in range(1, max_iter + 1):
        g = G @ w - b
        F = np.flatnonzero(free)
        p = np.zeros(k) if at_minimum else _subproblem(G, g, F, simplex)
        at_minimum = False
        if np.abs(p).max() <= 1e-12 * (1.0 + np.abs(w).max()):
            bound = np.flatnonzero(~free)
            if len(bound) == 0:
                return w, it
            nu = -float(g[F].mean()) if (simplex and len(F)) else 0.0
            mu = g[bound] + nu
            i = int(np.argmin(mu))
            if mu[i] >= -tol:
                return w, it
            free[bound[i]] = True
            continue
        neg = F[p[F] < 0]
        alpha, block = 1.0, None
        if len(neg):
            ratios = -w[neg] / p[neg]
            i = int(np.argmin(ratios))
            if ratios[i] < 1.0:
                alpha, block = float(max(ratios[i], 0.0)), int(neg[i])
        w = w + alpha * p
        if block is not None:
            w[block] = 0.0
            free[block] = False
        else:
            at_minimum = True
        w[~free] = 0.0
    raise RuntimeError(f"the active-set method did not converge in {max_iter} iterations (k={k})")


def kkt(G, b, w, constraint: str = "simplex", tol: float = 1e-9) -> dict:
    """Checks the KKT conditions of ``w`` and reports each residual relative to the problem's scale.

    Returns:
        dict: ``stationarity`` (largest ``|∇|`` on the support, after the multiplier), ``dual_feasibility``
        (most negative bound multiplier, 0 when none is negative), ``complementarity`` (largest ``|μᵢwᵢ|``),
        ``primal_feasibility`` (constraint violation), ``multiplier`` (ν of Σw = 1), ``tolerance``, ``satisfied``.
    """
    G, b = _check(G, b)
    w = np.asarray(w, dtype=np.float64)
    s = _scale(G, b)
    g = (G @ w - b) / s
    if constraint == "unconstrained":
        # Gw = b where b is in the range of G; G singular leaves a set of minimisers, any of which is optimal.
        stat = float(np.abs(g).max())
        report = {"stationarity": stat, "dual_feasibility": 0.0, "complementarity": 0.0,
                  "primal_feasibility": 0.0, "multiplier": None}
    else:
        support = w > 0
        nu = -float(g[support].mean()) if (constraint == "simplex" and support.any()) else 0.0
        mu = g + nu
        stat = float(np.abs(mu[support]).max()) if support.any() else 0.0
        dual = float(min(mu[~support].min(), 0.0)) if (~support).any() else 0.0
        comp = float(np.abs(mu * w).max())
        primal = float(max(-w.min(), 0.0))
        if constraint == "simplex":
            primal = max(primal, abs(float(w.sum()) - 1.0))
        report = {"stationarity": stat, "dual_feasibility": dual, "complementarity": comp,
                  "primal_feasibility": primal, "multiplier": nu * s}
    report["tolerance"] = tol
    report["satisfied"] = bool(report["stationarity"] <= tol and report["dual_feasibility"] >= -tol
                               and report["complementarity"] <= tol and report["primal_feasibility"] <= tol)
    return report


def solve(G, b, c: float = 0.0, constraint: str = "simplex", tol: float = 1e-9) -> Solution:
    """The exact minimiser of ``‖Σ wᵢ ΔWᵢ − T‖²`` under ``constraint``, from the Gram quantities.

    Args:
        G (array): ``(k, k)`` Gram of the checkpoints' deltas. b (array): ``(k,)`` their products with the target.
        c (float): ``‖T‖²`` (only for the objective value). Default 0.
        constraint (str): ``"simplex"`` (Σw = 1, w ≥ 0; default), ``"nonnegative"`` or ``"unconstrained"``.
        tol (float): relative tolerance of the KKT check. Default 1e-9.

    Returns:
        Solution: weights, objective ``f(w)``, KKT report (``kkt["satisfied"]`` says whether every condition holds).

    Raises:
        ValueError: an unknown constraint, shapes that do not fit, or non-finite input.
    """
    if constraint not in CONSTRAINTS:
        raise ConfigError(f"constraint must be one of {CONSTRAINTS}, got {constraint!r}")
    G, b = _check(G, b)
    if constraint == "unconstrained":
        w = np.linalg.lstsq(G, b, rcond=None)[0]
        it = 1
    else:
        w, it = _active_set(G, b, constraint == "simplex", tol * _scale(G, b) * 1e-3)
        w = np.maximum(w, 0.0)
        if constraint == "simplex":
            w = w / w.sum()
    return Solution(w, objective(G, b, c, w), kkt(G, b, w, constraint, tol), METHODS[constraint], it)
