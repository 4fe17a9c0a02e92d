"""The optimizer's steps as separate commands, for users who want the intermediate files: ``extract`` (A, B and
optionally ΔW of every checkpoint), ``organize`` (one file per module with every checkpoint's factors, and
``master_index.json``), and ``run_all`` (extract, organize, optimize, build).

``optimize`` and ``build`` do not need these files: they stream the factors from the checkpoints directly.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .. import atomic, ops
from ..errors import AdapterFormatError, ConfigError
from .build import build
from .config import CombineConfig, load_config
from .optimize import open_checkpoints, optimize
from .reader import check_finite, layer_of, natural_key, stream

SUMMARY_NAME = "EXTRACTION_SUMMARY.md"
MASTER_INDEX = "master_index.json"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _safe(name: str) -> str:
    return _SAFE.sub("_", name)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save

    atomic.write_bytes(path, save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def extract(
    config: str | os.PathLike | Mapping | CombineConfig,
    output_dir: str | os.PathLike,
    checkpoints: Iterable[str] | None = None,
    delta: bool = False,
    verbose: bool | None = None,
    log=print,
) -> dict:
    """Writes every checkpoint's factors (and with ``delta`` its ``ΔW = s·B A``) to safetensors, with metadata.

    Per checkpoint NAME: ``NAME_A_matrices.safetensors`` (``(r, in)`` by module name), ``NAME_B_matrices`` (``(out,
    r)``), with ``delta`` ``NAME_AB_products`` (``ΔW`` in the base layer's orientation: ``(out, in)``, or ``(in,
    out)`` when ``fan_in_fan_out``; float32, large), and ``NAME_metadata.json``; then ``EXTRACTION_SUMMARY.md`` and a
    copy of the checkpoint list. Every file is written atomically.

    Returns:
        dict: name → metadata of each checkpoint.
    """
    cfg = load_config(config)
    names = cfg.select(checkpoints)
    verbose = cfg.verbose_paths if verbose is None else verbose
    opened = open_checkpoints(cfg, names, verbose=verbose, log=log)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    all_meta = {}
    for position, c in enumerate(opened):
        modules = list(c.modules)
        As, Bs, Ds = {}, {}, {}
        with stream([c], modules) as it:
            for m, (A,), (B,) in it:
                check_finite([c], m, [A], [B])
                As[m], Bs[m] = A.contiguous(), B.contiguous()
                if delta:
                    D = ops.lora_delta(A, B, None, c.modules[m].scale, torch.float32)  # (out, in)
                    Ds[m] = (D.t() if c.fan_in_fan_out else D).contiguous()
        stem = _safe(c.name)
        files = {"A": f"{stem}_A_matrices.safetensors", "B": f"{stem}_B_matrices.safetensors"}
        _write_tensors(out / files["A"], As, {"checkpoint": c.name, "content": "lora_A (r, in)"})
        _write_tensors(out / files["B"], Bs, {"checkpoint": c.name, "content": "lora_B (out, r)"})
        if delta:
            files["AB"] = f"{stem}_AB_products.safetensors"
            orient = "(in, out): fan_in_fan_out" if c.fan_in_fan_out else "(out, in)"
            _write_tensors(out / files["AB"], Ds, {"checkpoint": c.name, "content": f"scale * B @ A {orient}"})
            del Ds
        meta = {
            "name": c.name, "index": position, "path": str(c.path), "description": c.description, "files": files,
            "dtype": str(c.dtype).replace("torch.", ""),
            "adapter_config": {k: c.config.get(k) for k in ("r", "lora_alpha", "use_rslora", "fan_in_fan_out",
                                                            "target_modules", "base_model_name_or_path")},
            "delta_orientation": "in_out" if c.fan_in_fan_out else "out_in",
            "num_modules": len(modules),
            "total_elements": sum(f.out_features * f.in_features for f in c.modules.values()),
            "modules": {m: {"layer": layer_of(m), "rank": f.rank, "alpha": f.alpha, "scale": f.scale,
                            "shape_A": [f.rank, f.in_features], "shape_B": [f.out_features, f.rank]}
                        for m, f in c.modules.items()},
        }
        atomic.write_text(out / f"{stem}_metadata.json", json.dumps(meta, indent=2) + "\n")
        all_meta[c.name] = meta
        if verbose:
            log(f"extracted {c.name}: {len(modules)} modules -> {out}")
    _write_config_copy(cfg, config, out)
    atomic.write_text(out / SUMMARY_NAME, _summary(all_meta, delta))
    return all_meta


def _write_config_copy(cfg: CombineConfig, config, out: Path) -> None:
    if isinstance(config, (str, os.PathLike)) and Path(config).is_file():
        atomic.write_bytes(out / "checkpoints_config.yml", Path(config).read_bytes())
        return
    import yaml

    body = {"checkpoints": {n: {"path": str(e.path), "description": e.description}
                            for n, e in cfg.checkpoints.items()},
            "settings": {"verify_paths": cfg.verify_paths, "verbose_paths": cfg.verbose_paths}}
    atomic.write_text(out / "checkpoints_config.yml", yaml.safe_dump(body, sort_keys=False))


def _summary(all_meta: dict, delta: bool) -> str:
    lines = ["# LoRA extraction summary", "", "| checkpoint | modules | ranks | scales | ΔW elements | files |",
             "|---|---|---|---|---|---|"]
    for name, m in all_meta.items():
        ranks = sorted({v["rank"] for v in m["modules"].values()})
        scales = sorted({round(v["scale"], 6) for v in m["modules"].values()})
        lines.append(f"| {name} | {m['num_modules']} | {ranks} | {scales} | {m['total_elements']:,} | "
                     f"{', '.join(m['files'].values())} |")
    lines += ["", "A: `(r, in)`, B: `(out, r)` by module name (PEFT orientation); ΔW = scale · B A"
              + (" written in the base layer's orientation." if delta else " not written (pass --delta)."), ""]
    return "\n".join(lines)


def _label(module: str, taken: set[str]) -> str:
    layer = layer_of(module)
    label = f"layer_{layer:02d}_{_safe(module.rsplit('.', 1)[-1])}" if layer is not None else _safe(module)
    if label in taken:
        label = _safe(module)
    taken.add(label)
    return label


def organize(input_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None, log=None) -> dict:
    """Regroups extracted factors by module: ``index_NNN_<label>_matrices.safetensors`` holding every checkpoint's
    ``<name>.lora_A``, ``<name>.lora_B`` (and ``<name>.delta`` if extracted), and ``master_index.json``.

    The output directory (default ``input_dir/organized_by_layer_module``) is written next to its place and
    renamed into it, so a failure leaves nothing half-written.

    Returns:
        dict: the master index.
    """
    from safetensors import safe_open

    src = Path(input_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"extracted directory {src} does not exist (run `lispetorch combine extract`)")
    metas = []
    for p in sorted(src.glob("*_metadata.json")):
        try:
            meta = json.loads(p.read_text(encoding="utf-8"))
            meta["files"], meta["name"], meta["modules"]  # noqa: B018  (the keys organize needs)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise AdapterFormatError(f"{p}: not an extraction metadata file ({e})") from None
        metas.append(meta)
    metas.sort(key=lambda meta: meta.get("index", len(metas)))  # the checkpoint list's order
    if not metas:
        raise FileNotFoundError(f"{src} holds no *_metadata.json (run `lispetorch combine extract` into it first)")
    modules = sorted({m for meta in metas for m in meta["modules"]}, key=natural_key)
    out = Path(output_dir) if output_dir is not None else src / "organized_by_layer_module"
    index: dict = {"checkpoints": [m["name"] for m in metas], "num_combinations": len(modules), "modules": {},
                   "checkpoint_info": {m["name"]: {k: m.get(k) for k in ("path", "description", "dtype",
                                                                          "adapter_config", "delta_orientation")}
                                       for m in metas}}
    taken: set[str] = set()
    handles = {}
    import contextlib

    with contextlib.ExitStack() as stack, atomic.directory(out) as tmp:
        for meta in metas:
            for kind, fname in meta["files"].items():
                path = src / fname
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is listed in {meta['name']}'s metadata but does not exist")
                handles[(meta["name"], kind)] = stack.enter_context(safe_open(str(path), framework="pt"))
        for i, m in enumerate(modules):
            label = _label(m, taken)
            fname = f"index_{i:03d}_{label}_matrices.safetensors"
            tensors, present, scales, shapes = {}, [], {}, {}
            for meta in metas:
                if m not in meta["modules"]:
                    continue
                name = meta["name"]
                present.append(name)
                scales[name] = meta["modules"][m]["scale"]
                shapes[name] = {k: meta["modules"][m].get(k) for k in ("shape_A", "shape_B", "alpha", "rank")}
                tensors[f"{name}.lora_A"] = handles[(name, "A")].get_tensor(m)
                tensors[f"{name}.lora_B"] = handles[(name, "B")].get_tensor(m)
                if (name, "AB") in handles:
                    tensors[f"{name}.delta"] = handles[(name, "AB")].get_tensor(m)
            _write_tensors(tmp / fname, tensors, {"module": m, "scales": json.dumps(scales)})
            index["modules"][m] = {"index": i, "file": fname, "layer": layer_of(m), "module_type": m.rsplit(".", 1)[-1],
                                   "checkpoints": present, "scales": scales, "shapes": shapes}
        (tmp / MASTER_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if log:
        log(f"organized {len(modules)} modules of {len(metas)} checkpoints -> {out}")
    return index


def run_all(
    config: str | os.PathLike | Mapping | CombineConfig,
    target: str | None,
    work_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    mode: str | None = None,
    rank: int | None = None,
    template: str | os.PathLike | None = None,
    *,
    layerwise: bool = False,
    constraint: str = "simplex",
    checkpoints: Iterable[str] | None = None,
    on_mismatch: str = "error",
    delta: bool = False,
    overwrite: bool = False,
    verbose: bool | None = None,
    log=print,
) -> dict:
    """Extract and organize into ``work_dir``, optimize (``work_dir/combination_results.json``), then build into
    ``output_dir`` with the target checkpoint as template unless one is given (so by default the output is a
    drop-in for the target: mode ``template``). ``target`` None: the last checkpoint of the list. Returns the paths
    and results."""
    cfg = load_config(config)
    if target is None:
        target = cfg.names[-1]
    if target not in cfg.checkpoints:
        raise ConfigError(f"target {target!r} is not in {cfg.source} (it lists {', '.join(cfg.names)})")
    names = cfg.select(checkpoints)
    if target not in names:
        names = [*names, target]
    work = Path(work_dir)
    extracted = work / "extracted"
    extract(cfg, extracted, names, delta=delta, verbose=verbose, log=log)
    organize(extracted, extracted / "organized_by_layer_module")
    results = optimize(cfg, target, layerwise, constraint=constraint, checkpoints=names, on_mismatch=on_mismatch,
                       verbose=False, log=log)
    results_path = work / "combination_results.json"
    write_results(results, results_path)
    summary = build(cfg, results, output_dir, mode, rank,
                    template if template is not None else cfg.checkpoints[target].path,
                    overwrite=overwrite, on_mismatch=on_mismatch, verbose=False, log=log)
    return {"extracted": str(extracted), "organized": str(extracted / "organized_by_layer_module"),
            "results_file": str(results_path), "results": results, "build": summary}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def summarize(results: Mapping, source: str | os.PathLike = "<results>") -> str:
    """The analysis of an optimize results file as text: each checkpoint's weight and share, the dominant one, the
    residual, relative error and R² with what they mean, the constraint and KKT checks, the layer-wise gain when
    solved. Reads the fields the optimizer's guide's results have (``global_weights``, ``method``,
    ``evaluation``) and uses the others when present.

    Raises:
        AdapterFormatError: no ``global_weights`` list of finite numbers, or ``checkpoint_names`` not matching it.
    """
    w = results.get("global_weights")
    if not isinstance(w, list) or not w or not all(_number(x) for x in w):
        raise AdapterFormatError(f"{source}: 'global_weights' must be a non-empty list of finite numbers, got {w!r}")
    names = results.get("checkpoint_names")
    if names is None:
        names = [f"w{i + 1}" for i in range(len(w))]
    if not isinstance(names, list) or len(names) != len(w):
        raise AdapterFormatError(f"{source}: 'checkpoint_names' must list one name per weight, got {names!r}")
    ev = results.get("evaluation") if isinstance(results.get("evaluation"), Mapping) else {}
    lines = [f"Optimization results: {source}"]
    if results.get("target"):
        lines.append(f"target (approximated): {results['target']}")
    lines.append(f"method: {results.get('method', 'unknown')}; constraint: {results.get('constraint', 'simplex')}")
    if results.get("num_modules"):
        lines.append(f"modules: {results['num_modules']}; ΔW elements per checkpoint: "
                     f"{results.get('total_elements', 0):,}")
    total = sum(abs(x) for x in w) or 1.0
    lines += ["", "weights:"]
    for n, x in zip(names, w, strict=True):
        lines.append(f"  {n:>24s}  {x: .6f}  ({abs(x) / total:.1%} of the total weight)")
    top = max(range(len(w)), key=lambda i: abs(w[i]))
    lines.append(f"dominant: {names[top]} ({abs(w[top]) / total:.1%})")
    lines.append("")
    resid, rel, r2 = ev.get("residual_norm"), ev.get("relative_error"), ev.get("r_squared")
    if _number(resid):
        lines.append(f"residual norm (final L2 error): {resid:.6f}")
    if _number(ev.get("objective_value")):
        lines.append(f"objective (squared residual): {ev['objective_value']:.6f}")
    if _number(rel):
        lines.append(f"relative error (residual / target norm): {rel:.6f}")
    if _number(r2):
        meaning = ("the combination explains most of the target" if r2 > 0.5 else
                   "the combination explains part of the target" if r2 > 0 else
                   "negative: the target holds directions no combination of the sources reaches (the zero adapter "
                   "would be as close)")
        lines.append(f"R²: {r2:.6f} ({meaning})")
    if _number(ev.get("constraint_violation")):
        lines.append(f"constraint violation: {ev['constraint_violation']:.2e}")
    kkt = results.get("kkt")
    if isinstance(kkt, Mapping) and "satisfied" in kkt:
        lines.append("KKT conditions: " + ("satisfied (the weights are the global optimum)" if kkt["satisfied"]
                                            else "NOT satisfied"))
    lw = results.get("layerwise")
    if isinstance(lw, Mapping):
        for key, what in (("per_module", "per-module"), ("per_layer", "per-layer")):
            part = lw.get(key) or {}
            if _number(part.get("residual_norm")) and _number(part.get("improvement")):
                lines.append(f"{what} weights: residual {part['residual_norm']:.6f} ({part['improvement']:.2%} "
                             "closer than the global weights)")
    t = results.get("timings")
    if isinstance(t, Mapping) and _number(t.get("total_s")):
        lines.append(f"computation time: {t['total_s']:.3f} s")
    return "\n".join(lines)


def write_results(results: dict, path: str | os.PathLike) -> Path:
    """Writes an optimize() result as JSON, atomically."""
    path = Path(path)
    atomic.write_text(path, json.dumps(results, indent=2, allow_nan=False) + "\n")
    return path


__all__ = ["extract", "organize", "run_all", "summarize", "write_results"]
