"""The optimal combination weights of LoRA checkpoints, by fused Gram accumulation.

For every adapted module, checkpoint i contributes ``ΔWᵢ = sᵢ Bᵢ Aᵢ``. The weights minimise
``Σ_modules ‖Σᵢ wᵢ ΔWᵢ − ΔW_target‖²_F``; all the solver needs is the Gram of the deltas, which the native
:func:`lispetorch.ops.lora_gram_modules` computes from the factors (sources and target of each module together,
many modules per call), in float64, from the factors read from the checkpoint files in the order they lie there.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping

import numpy as np

from .. import ops
from ..errors import AdapterFormatError, ConfigError
from .config import CombineConfig, load_config, verify_paths
from .reader import Checkpoint, check_finite, common_modules, file_order, layer_of, open_checkpoint, read_copies, stream
from .solver import CONSTRAINTS, objective, solve
from .stored import StoredCheckpoint, is_stored, open_stored, stream_stored


def stream_factors(checkpoints: list[Checkpoint], modules: list[str], timer: dict | None = None,
                   in_file_order: bool = False, mapped: bool = False):
    """:func:`~lispetorch.combine.reader.stream` over checkpoint directories (with ``in_file_order``, in the order
    the factors lie in the files; ``mapped``: views of the mapped files, see there), or
    :func:`~lispetorch.combine.stored.stream_stored` over the extract or organize step's files."""
    if any(isinstance(c, StoredCheckpoint) for c in checkpoints):
        return stream_stored(checkpoints, modules, timer)
    order = file_order(checkpoints, modules) if in_file_order else modules
    return stream(checkpoints, order, timer, mapped=mapped)


def open_list(config, names: list[str] | None = None, verbose: bool = False, log=print) \
        -> tuple[CombineConfig, list[Checkpoint] | None]:
    """The checkpoint list and, for an extracted or organised directory, its checkpoints already opened
    (None for a checkpoint list, whose checkpoints :func:`open_checkpoints` opens)."""
    if is_stored(config):
        cfg, opened = open_stored(config)
        if verbose:
            log(f"reading {len(opened)} checkpoint(s) from {cfg.source}: {', '.join(cfg.names)}")
        return cfg, opened
    return load_config(config), None


def default_target(cfg: CombineConfig) -> str:
    """The checkpoint to approximate when none is named: the last of the list (the guide's list ends with it)."""
    return cfg.names[-1]


def open_checkpoints(cfg: CombineConfig, names: list[str], verbose: bool = False, log=print) -> list[Checkpoint]:
    """Verifies the paths (when the list's ``verify_paths`` says so) and opens the named checkpoints."""
    if cfg.verify_paths or verbose:
        if verbose:
            log(f"checking {len(names)} checkpoint path(s) from {cfg.source}:")
        verify_paths(cfg, names, verbose=verbose, log=log)
    return [open_checkpoint(n, cfg.checkpoints[n].path, cfg.checkpoints[n].description) for n in names]


def module_grams(checkpoints: list[Checkpoint], modules: list[str], timer: dict | None = None,
                 scales: list[float] | None = None, batch_bytes: int = 8 << 20) -> dict[str, np.ndarray]:
    """``{module: G}`` with ``G[i, j] = ⟨ΔWᵢ, ΔWⱼ⟩`` over ``checkpoints`` (k×k, float64), streamed module by module
    from the files in the order the factors lie in them, one native call per ``batch_bytes`` of factors.

    Raises:
        ValueError: a checkpoint holding NaN or Inf (named with its key).
    """
    timer = {} if timer is None else timer
    k = len(checkpoints)
    grams: dict[str, np.ndarray] = {}
    batch: list[tuple[str, list, list, list[float]]] = []  # (module, [Aᵢ], [Bᵢ], [sᵢ]) not yet computed
    size = 0

    def flush() -> None:
        t0 = time.perf_counter()
        try:
            G = ops.lora_gram_modules([A for _, As, _, _ in batch for A in As],
                                      [B for _, _, Bs, _ in batch for B in Bs],
                                      [x for *_, s in batch for x in s], k).numpy()         # (M, k, k)
        except RuntimeError as e:
            if not mapped or "SIGBUS" not in str(e):
                raise
            it.verify()  # names the file cut short
            raise AdapterFormatError(f"a checkpoint's file changed while it was being read ({e})") from None
        if mapped:
            it.verify()
        finite = np.isfinite(np.diagonal(G, axis1=1, axis2=2)).all(axis=1)
        for (m, As, Bs, _), Gm, ok in zip(batch, G, finite, strict=True):
            if not ok:  # views of maps are read again as copies, where a truncation is an error
                check_finite(checkpoints, m, *(read_copies(checkpoints, m) if mapped else (As, Bs)))
            grams[m] = Gm
        timer["gram_s"] = timer.get("gram_s", 0.0) + time.perf_counter() - t0
        batch.clear()

    # Views of the mapped files where the native Gram reads them (its reads turn a file cut short into an error).
    mapped = ops.cpu_isa() != "aten" and not any(isinstance(c, StoredCheckpoint) for c in checkpoints)
    with stream_factors(checkpoints, modules, timer, in_file_order=True, mapped=mapped) as it:
        for m, As, Bs in it:
            s = [c.modules[m].scale for c in checkpoints]
            if scales is not None:
                s = [a * b for a, b in zip(s, scales, strict=True)]
            batch.append((m, As, Bs, s))
            size += sum(t.nbytes for t in As) + sum(t.nbytes for t in Bs)
            if size >= batch_bytes:
                flush()
                size = 0
        if batch:
            flush()
    return {m: grams[m] for m in modules}


def _evaluation(G, b, c, w, constraint) -> dict:
    obj = objective(G, b, c, w)
    resid = math.sqrt(obj)
    tnorm = math.sqrt(max(c, 0.0))
    rel = resid / tnorm if tnorm > 0 else None
    violation = float(max(-w.min(), 0.0))
    if constraint == "simplex":
        violation = max(violation, abs(float(w.sum()) - 1.0))
    return {"objective_value": obj, "residual_norm": resid, "target_norm": tnorm, "relative_error": rel,
            "r_squared": 1.0 - rel * rel if rel is not None else None, "constraint_violation": violation}


def _split(G):
    """(k+1)×(k+1) Gram with the target last → sources' G, cross products b, target norm² c."""
    return G[:-1, :-1], G[:-1, -1], float(G[-1, -1])


def optimize(
    config: str | os.PathLike | Mapping | CombineConfig,
    target: str | None = None,
    layerwise: bool = False,
    *,
    constraint: str = "simplex",
    checkpoints: Iterable[str] | None = None,
    on_mismatch: str = "error",
    verbose: bool | None = None,
    log=print,
) -> dict:
    """Finds the weights w minimising ``Σ_modules ‖Σᵢ wᵢ ΔWᵢ − ΔW_target‖²_F``.

    Args:
        config (str | PathLike | Mapping): a checkpoint list (YAML path), a mapping name → checkpoint path, or
            the directory the ``extract`` or ``organize`` step wrote (``organized_by_layer_module/``), whose
            files are then read.
        target (str | None): the name of the checkpoint to approximate; every other listed checkpoint is a
            source. Default the last checkpoint of the list.
        layerwise (bool): also solve per module and per layer, and report how much closer that gets. Default False.
        constraint (str): ``"simplex"`` (Σw = 1, w ≥ 0; default), ``"nonnegative"`` or ``"unconstrained"``.
        checkpoints (Iterable[str] | None): restrict the sources to these names. Default all but the target.
        on_mismatch (str): ``"error"`` (default) or ``"intersect"`` when checkpoints adapt different modules.
        verbose (bool | None): explain the path validation; default the list's ``verbose_paths``.
        log (callable): where verbose messages go. Default ``print``.

    Returns:
        dict: the results (JSON-serialisable): ``global_weights`` (sources in the list's order) with
        ``checkpoint_names``, ``weights`` (name → weight), ``method``, ``evaluation`` (``objective_value`` =
        squared residual, ``residual_norm``, ``relative_error`` = residual / target norm, ``r_squared`` = 1 −
        relative error², ``constraint_violation``), ``kkt``, ``gram``, ``modules`` (per-module breakdown),
        ``layerwise`` (when asked), ``timings``.

    Raises:
        ValueError: a target not in the list, no source, different module sets, shapes that differ, NaN/Inf.
        FileNotFoundError: checkpoint paths that do not exist or lack the adapter files (each named).
    """
    t_start = time.perf_counter()
    if constraint not in CONSTRAINTS:
        raise ConfigError(f"constraint must be one of {CONSTRAINTS}, got {constraint!r}")
    cfg, stored = open_list(config, verbose=bool(verbose), log=log)
    if target is None:
        target = default_target(cfg)
    if not isinstance(target, str) or target not in cfg.checkpoints:
        raise ConfigError(f"target {target!r} is not in {cfg.source} (it lists {', '.join(cfg.names)})")
    names = [n for n in cfg.select(checkpoints) if n != target]
    if not names:
        raise ConfigError(f"no checkpoint to combine: {cfg.source} lists only the target {target!r}")
    verbose = cfg.verbose_paths if verbose is None else verbose
    if stored is None:
        opened = open_checkpoints(cfg, [*names, target], verbose=verbose, log=log)
    else:
        by_name = {c.name: c for c in stored}
        opened = [by_name[n] for n in [*names, target]]
    modules, dropped = common_modules(opened, on_mismatch)
    timer: dict[str, float] = {}
    grams = module_grams(opened, modules, timer)
    t0 = time.perf_counter()
    total = sum(grams.values())
    G, b, c = _split(total)
    sol = solve(G, b, c, constraint)
    w = sol.weights
    per_module = {}
    for m, Gm in grams.items():
        Gs, bs, cs = _split(Gm)
        f = opened[0].modules[m]
        resid = math.sqrt(objective(Gs, bs, cs, w))
        tn = math.sqrt(max(cs, 0.0))
        per_module[m] = {
            "layer": layer_of(m), "shape": [f.out_features, f.in_features],
            "ranks": {c.name: c.modules[m].rank for c in opened},
            "scales": {c.name: c.modules[m].scale for c in opened},
            "residual_norm": resid, "target_norm": tn, "relative_error": resid / tn if tn > 0 else None,
        }
    result = {
        "target": target,
        "checkpoint_names": names,
        "global_weights": [float(x) for x in w],
        "weights": {n: float(x) for n, x in zip(names, w, strict=True)},
        "method": sol.method,
        "constraint": constraint,
        "evaluation": _evaluation(G, b, c, w, constraint),
        "kkt": sol.kkt,
        "gram": {"G": G.tolist(), "b": b.tolist(), "target_norm_sq": c},
        "num_modules": len(modules),
        "total_elements": int(sum(m["shape"][0] * m["shape"][1] for m in per_module.values())),
        "dropped_modules": dropped,
        "checkpoints": {c.name: {"path": str(c.path), "description": c.description} for c in opened},
        "modules": per_module,
    }
    if layerwise:
        result["layerwise"] = _layerwise(grams, constraint, result["evaluation"]["objective_value"], names)
    timer["solve_s"] = time.perf_counter() - t0
    timer["total_s"] = time.perf_counter() - t_start
    result["timings"] = timer
    return result


def _layerwise(grams: dict[str, np.ndarray], constraint: str, global_obj: float, names: list[str]) -> dict:
    """Per-module and per-layer optimal weights, and how much closer they get than the global weights."""
    modules = {}
    obj_modules = 0.0
    for m, Gm in grams.items():
        Gs, bs, cs = _split(Gm)
        s = solve(Gs, bs, cs, constraint)
        modules[m] = {"weights": [float(x) for x in s.weights], "residual_norm": math.sqrt(s.objective),
                      "kkt_satisfied": s.kkt["satisfied"]}
        obj_modules += s.objective
    by_layer: dict[int | None, np.ndarray] = {}
    for m, Gm in grams.items():
        L = layer_of(m)
        by_layer[L] = by_layer.get(L, 0) + Gm
    layers = {}
    obj_layers = 0.0
    for L, Gl in sorted(by_layer.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        Gs, bs, cs = _split(Gl)
        s = solve(Gs, bs, cs, constraint)
        layers["none" if L is None else str(L)] = {"weights": [float(x) for x in s.weights],
                                                   "residual_norm": math.sqrt(s.objective),
                                                   "kkt_satisfied": s.kkt["satisfied"]}
        obj_layers += s.objective
    g = math.sqrt(global_obj)

    def gain(obj):
        r = math.sqrt(obj)
        return {"residual_norm": r, "relative_to_global": r / g if g > 0 else None,
                "improvement": 1.0 - r / g if g > 0 else 0.0}

    return {"checkpoint_names": names, "per_module": gain(obj_modules), "per_layer": gain(obj_layers),
            "global_residual_norm": g, "modules": modules, "layers": layers}
