"""Writing the combined adapter: a PEFT adapter directory holding ``Σᵢ wᵢ ΔWᵢ`` (exactly, recompressed, or the
A/B-averaged approximation).

Modes, for every module, with ``sᵢ`` checkpoint i's scaling and ``wᵢ`` its weight:

- ``template`` (the drop-in; the default when a template is given): the template checkpoint's shapes, ranks and
  ``adapter_config.json``: for every module the best approximation of ``Σ wᵢ sᵢ Bᵢ Aᵢ`` at the template's rank
  ``r_t`` (Eckart–Young, from the factors as in ``svd``), written as ``s_t B A`` with the template's scaling
  ``s_t`` (zero-padded when the sum's rank is below ``r_t``).
- ``cat`` (exact): ``A = [A₁; …; A_k]``, ``B = [w₁s₁B₁ | … | w_k s_k B_k]``, rank ``Σ rᵢ``, scaling 1, so
  ``B A = Σ wᵢ sᵢ Bᵢ Aᵢ``.
- ``svd``: the best rank-``rank`` approximation of that sum in the Frobenius norm, from QR factorisations of the
  stacked factors and an SVD of the small core (:func:`lispetorch.ops.lora_factored_svd`); scaling 1.
- ``linear``: ``A = Σ wᵢ Aᵢ``, ``B = Σ wᵢ (sᵢ/s) Bᵢ`` with ``s`` the output's scaling (the original optimizer's
  method; needs equal ranks). Its product holds cross terms ``wᵢwⱼ Bᵢ Aⱼ``: it is an approximation, and the
  output says how far it is from the exact sum.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from .. import atomic, ops
from ..errors import AdapterFormatError, ConfigError, ShapeError
from ..peft_format import (
    CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    exact_targets,
    finite_or_raise,
    peft_key,
    ranked_fields,
    read_config,
    write_files,
)
from .config import CombineConfig
from .optimize import open_checkpoints, open_list, stream_factors
from .reader import Checkpoint, check_finite, common_modules, open_checkpoint, single_thread

MODES = ("template", "cat", "svd", "linear")
README_NAME = "COMBINATION_README.md"
_NOT_COPIED = {WEIGHTS_NAME, CONFIG_NAME, LEGACY_WEIGHTS_NAME, README_NAME}


def weights_of(weights) -> dict[str, float]:
    """A mapping name → weight from a mapping or an :func:`~lispetorch.combine.optimize` result."""
    if isinstance(weights, Mapping) and "global_weights" in weights:
        names = weights.get("checkpoint_names")
        if not isinstance(names, list) or len(names) != len(weights["global_weights"]):
            raise AdapterFormatError("the optimization result has global_weights but no matching checkpoint_names")
        weights = dict(zip(names, weights["global_weights"], strict=True))
    if not isinstance(weights, Mapping) or not weights:
        raise TypeError(f"weights must be a non-empty mapping name -> weight or an optimize() result, got "
                        f"{type(weights).__name__}")
    out = {}
    for n, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"the weight of checkpoint {n!r} must be a finite number, got {w!r}")
        out[str(n)] = float(w)
    return out


def _targets(modules: list[str], base_config: dict, base_modules: set[str] | None) -> list[str] | str:
    if base_modules is not None and set(modules) == base_modules and base_config.get("target_modules"):
        return base_config["target_modules"]
    return exact_targets(modules)


def build(
    config: str | os.PathLike | Mapping | CombineConfig,
    weights,
    output_dir: str | os.PathLike,
    mode: str | None = None,
    rank: int | None = None,
    template: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    on_mismatch: str = "error",
    dtype: torch.dtype | None = None,
    verbose: bool | None = None,
    layerwise: str | None = None,
    log=print,
) -> dict:
    """Writes the combined adapter ``Σ wᵢ ΔWᵢ`` as a PEFT adapter directory, atomically.

    Args:
        config (str | PathLike | Mapping): the checkpoint list (YAML path), a mapping name → checkpoint path, or
            the directory the ``extract`` (or ``organize``) step wrote, whose factor files are then read.
        weights (Mapping | dict): name → weight, or an :func:`optimize` result (its ``global_weights``).
            Checkpoints with weight 0 are left out.
        output_dir (str | PathLike): the directory to write; built next to its place and renamed into it, so a
            failed build leaves nothing.
        mode (str | None): ``"template"`` (the drop-in: the template's shapes, ranks and config, by the best
            approximation at its ranks), ``"cat"`` (exact, rank Σ rᵢ), ``"svd"`` (best rank-``rank``
            approximation) or ``"linear"`` (A and B averaged separately: an approximation with cross terms).
            Default ``"template"`` when a template is given, else ``"cat"``.
        rank (int | None): the rank of ``svd`` mode; default the largest rank of the combined checkpoints.
        template (str | PathLike | None): a checkpoint directory whose other files (tokenizer, configs, training
            state, README) are copied, whose ``adapter_config.json`` is the base of the new one, and whose tensors
            other than LoRA factors (``modules_to_save``: a trained head, embeddings) are kept. Default: none
            copied, and the first combined checkpoint's config and other tensors.
        overwrite (bool): replace an existing non-empty ``output_dir``. Default False.
        on_mismatch (str): ``"error"`` (default) or ``"intersect"`` when checkpoints adapt different modules.
        dtype (torch.dtype | None): dtype of the written factors; default the template's (mode ``template``),
            else the checkpoints' widest dtype.
        layerwise (str | None): ``"module"`` or ``"layer"``: combine every module with its own (or its layer's)
            weights from an :func:`optimize` result solved with ``layerwise=True``. Default None: the global
            weights.

    Returns:
        dict: ``output_dir``, ``mode``, ``weights``, ``rank`` (most common), ``kept_tensors`` (the other tensors
        kept, and ``kept_from``) and ``relative_deviation``: the Frobenius distance of the written adapter from
        the exact ``Σ wᵢ ΔWᵢ``, relative to its norm (0 up to rounding for ``cat``; the discarded singular
        values for ``template`` and ``svd``; the cross terms for ``linear``).

    Raises:
        ValueError: unknown mode or names, bad rank, linear mode with unequal ranks, NaN/Inf, different modules.
        FileExistsError: ``output_dir`` exists, is not empty and ``overwrite`` is False.
    """
    if mode is None:
        mode = "template" if template is not None else "cat"
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if rank is not None and mode != "svd":
        raise ConfigError(f"rank applies to mode 'svd' only (mode is {mode!r})")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    cfg, stored = open_list(config)
    per_module = _layer_weights(weights, layerwise) if layerwise is not None else None
    wmap = global_w = weights_of(weights)
    if per_module is not None:  # a checkpoint is used when some module gives it a weight
        wmap = {n: float(any(v.get(n, 0.0) != 0.0 for v in per_module.values())) for n in wmap}
    names = cfg.select(list(wmap))
    names = [n for n in cfg.names if n in names]  # the list's order
    used = [n for n in names if wmap[n] != 0.0]
    if not used:
        raise ConfigError("every weight is 0: the combined adapter would be empty")
    output_dir = Path(output_dir)
    verbose = cfg.verbose_paths if verbose is None else verbose
    if stored is None:
        opened = open_checkpoints(cfg, used, verbose=verbose, log=log)
    else:
        opened = [c for c in stored if c.name in used]
    for e in cfg.checkpoints.values():
        if output_dir.resolve() == e.path.resolve():
            raise ConfigError(f"output_dir {output_dir} is checkpoint {e.name!r} of the list: refusing to "
                              "overwrite an input")
    template = Path(template) if template is not None else None
    if template is not None:
        if not template.is_dir():
            raise FileNotFoundError(f"template checkpoint {template} does not exist or is not a directory")
        if output_dir.resolve() == template.resolve():
            raise ConfigError(f"output_dir {output_dir} is the template: refusing to overwrite an input")
        base_config = read_config(template)
    else:
        base_config = dict(opened[0].config)
        if mode == "template":
            raise ConfigError("mode 'template' needs a template checkpoint (--template_checkpoint DIR) whose shapes "
                              "and ranks the combined adapter takes")
    tmpl = open_checkpoint("template", template) if template is not None and (template / WEIGHTS_NAME).is_file() \
        else None
    if mode == "template" and tmpl is None:
        raise FileNotFoundError(f"mode 'template' needs the template's {WEIGHTS_NAME} (its shapes and ranks), but "
                                f"{template / WEIGHTS_NAME} does not exist")
    if output_dir.exists() and not overwrite and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to "
                              "replace it")
    modules, dropped = common_modules(opened, on_mismatch)
    if mode == "template":
        _check_template(tmpl, modules, opened[0])
    out_dtype = dtype or (tmpl.dtype if mode == "template" else
                          max((c.dtype for c in opened), key=lambda d: torch.finfo(d).bits))
    w = [wmap[c.name] for c in opened]
    first = opened[0]
    if rank is None and mode == "svd":
        rank = max(c.modules[m].rank for c in opened for m in modules)

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dev_sq = 0.0
    norm_sq = 0.0
    with single_thread(), stream_factors(opened, modules) as it:
        for m, As, Bs in it:
            check_finite(opened, m, As, Bs)
            wm = w
            if per_module is not None:
                if m not in per_module:
                    raise AdapterFormatError(f"the layer-wise results have no weights for module {m!r}")
                wm = [per_module[m].get(c.name, 0.0) for c in opened]
            s = [wi * c.modules[m].scale for wi, c in zip(wm, opened, strict=True)]
            if mode == "template":
                t = tmpl.modules[m]
                B, A, _ = ops.lora_factored_svd(As, Bs, s, t.rank)                    # (out, q), (q, in)
                if A.shape[0] < t.rank:  # the sum has a lower rank than the template: zero rows and columns
                    A = torch.cat([A, A.new_zeros(t.rank - A.shape[0], A.shape[1])], 0)
                    B = torch.cat([B, B.new_zeros(B.shape[0], t.rank - B.shape[1])], 1)
                out_scale = t.scale
                A, B = A / math.sqrt(out_scale), B / math.sqrt(out_scale)
                ranks[m], alphas[m] = t.rank, t.alpha
            elif mode == "cat":
                A = torch.cat([a.double() for a in As], 0)                               # (R, in)
                B = torch.cat([b.double() * si for b, si in zip(Bs, s, strict=True)], 1)  # (out, R)
                out_scale = 1.0
                ranks[m] = alphas[m] = A.shape[0]
            elif mode == "svd":
                B, A, _ = ops.lora_factored_svd(As, Bs, s, rank)                       # (out, q), (q, in)
                out_scale = 1.0
                ranks[m] = alphas[m] = A.shape[0]
            else:
                rs = {c.name: c.modules[m].rank for c in opened}
                if len(set(rs.values())) > 1:
                    raise ConfigError(f"mode 'linear' needs equal ranks, but module {m!r} has ranks {rs}; use mode "
                                      "'cat' (exact) or 'svd'")
                f = first.modules[m]
                out_scale = f.scale
                A = sum(wi * a.double() for wi, a in zip(wm, As, strict=True))  # (r, in)
                B = sum(si / out_scale * b.double() for si, b in zip(s, Bs, strict=True))  # (out, r)
                ranks[m], alphas[m] = f.rank, f.alpha
            A, B = A.to(out_dtype).contiguous(), B.to(out_dtype).contiguous()
            # distance of what is written from the exact sum, by the same factored Gram
            G = ops.lora_gram([A, *As], [B, *Bs], [1.0, *s]).numpy()
            sign = [out_scale] + [-1.0] * len(As)
            norm_sq += float(G[1:, 1:].sum())
            dev_sq += float(sum(sign[i] * sign[j] * G[i, j] for i in range(len(sign)) for j in range(len(sign))))
            tensors[peft_key(m, "lora_A")] = A
            tensors[peft_key(m, "lora_B")] = B
    kept_from = tmpl if tmpl is not None else first
    kept = _other_tensors(kept_from)
    tensors.update(kept)

    if mode == "linear":
        # the factors were scaled for the first checkpoint's scaling: its config fields say exactly that
        out_cfg = dict(base_config)
        defaults = {"r": first.modules[modules[0]].rank, "lora_alpha": 8, "use_rslora": False,
                    "rank_pattern": {}, "alpha_pattern": {}}
        for key, default in defaults.items():
            out_cfg[key] = first.config.get(key, default)
    elif mode == "template":
        out_cfg = dict(base_config)  # the template's own config: the same ranks, alphas and targets
    else:
        out_cfg = {**base_config, **ranked_fields(ranks, alphas), "use_rslora": False}
    base_modules = None
    if template is not None and (template / WEIGHTS_NAME).is_file():
        base_modules = set(open_checkpoint("template", template).modules)
    elif template is None:
        base_modules = set(first.modules)
    if mode != "template":
        out_cfg["target_modules"] = _targets(modules, base_config, base_modules)
        out_cfg["inference_mode"] = True
    out_cfg["fan_in_fan_out"] = first.fan_in_fan_out
    out_cfg["peft_type"] = "LORA"
    out_cfg["use_dora"] = False

    rel_dev = math.sqrt(max(dev_sq, 0.0) / norm_sq) if norm_sq > 0 else 0.0
    if per_module is not None:  # what is reported: the global solution beside the per-module weights used
        w = [global_w[c.name] for c in opened]
    used_weights = {c.name: wi for c, wi in zip(opened, w, strict=True)}
    summary = {"output_dir": str(output_dir), "mode": mode, "weights": used_weights,
               "rank": out_cfg["r"], "relative_deviation": rel_dev, "num_modules": len(modules),
               "dropped_modules": dropped, "kept_tensors": sorted(kept),
               "kept_from": str(kept_from.path) if kept else None, "layerwise": layerwise}
    finite_or_raise(tensors, f"{output_dir}: the combined adapter ({mode}, {out_dtype})")
    with atomic.directory(output_dir) as tmp:
        if template is not None:
            for item in sorted(template.iterdir()):
                if item.name in _NOT_COPIED:
                    continue
                if item.is_dir():
                    shutil.copytree(item, tmp / item.name, symlinks=True)
                else:
                    shutil.copy2(item, tmp / item.name)
        write_files(tmp, tensors, out_cfg)
        (tmp / README_NAME).write_text(_readme(cfg, opened, w, mode, summary, template, modules, out_dtype))
    return summary


def _layer_weights(results, layerwise: str) -> dict[str, dict[str, float]]:
    """``{module: {name: weight}}`` from an optimize result's per-module or per-layer solution."""
    if layerwise not in ("module", "layer"):
        raise ConfigError(f"layerwise must be 'module' or 'layer', got {layerwise!r}")
    lw = results.get("layerwise") if isinstance(results, Mapping) else None
    if not isinstance(lw, Mapping) or not isinstance(results.get("modules"), Mapping):
        raise AdapterFormatError("layer-wise weights need an optimize result solved with layerwise=True "
                                 "(--layerwise); this one has no 'layerwise' section")
    names = lw.get("checkpoint_names")
    out = {}
    for m, info in results["modules"].items():
        if layerwise == "module":
            entry = (lw.get("modules") or {}).get(m)
        else:
            layer = info.get("layer") if isinstance(info, Mapping) else None
            entry = (lw.get("layers") or {}).get("none" if layer is None else str(layer))
        ws = entry.get("weights") if isinstance(entry, Mapping) else None
        if not isinstance(names, list) or not isinstance(ws, list) or len(ws) != len(names):
            raise AdapterFormatError(f"the layer-wise results have no usable {layerwise} weights for module {m!r}")
        out[m] = {n: float(x) for n, x in zip(names, ws, strict=True)}
        for n, x in out[m].items():
            if not math.isfinite(x):
                raise ConfigError(f"the {layerwise} weight of checkpoint {n!r} for module {m!r} is {x}")
    return out


def _check_template(tmpl: Checkpoint, modules: list[str], first: Checkpoint) -> None:
    """The template adapts exactly the combined modules, with the same shapes (a drop-in)."""
    missing = [m for m in modules if m not in tmpl.modules]
    extra = [m for m in tmpl.modules if m not in modules]
    if missing or extra:
        detail = "; ".join(x for x in (f"it lacks {', '.join(missing[:8])}" if missing else "",
                                       f"it adapts {', '.join(extra[:8])}, which the combined checkpoints do not "
                                       "all adapt" if extra else "") if x)
        raise AdapterFormatError(f"template {tmpl.path} does not adapt the combined modules ({detail}); use mode "
                                 "'cat' or 'svd', or a template adapting the same modules")
    for m in modules:
        t, f = tmpl.modules[m], first.modules[m]
        if (t.out_features, t.in_features) != (f.out_features, f.in_features):
            raise ShapeError(f"template {tmpl.path}: module {m!r} is ({t.out_features}, {t.in_features}) (out, in) "
                             f"but checkpoint {first.name!r} has ({f.out_features}, {f.in_features})")


def _other_tensors(source: Checkpoint) -> dict[str, torch.Tensor]:
    """The tensors of ``source`` that are not LoRA factors (``modules_to_save``), as stored, checked finite."""
    if not source.other:
        return {}
    out = {}
    with safe_open(str(source.weights_file), framework="pt") as f:
        for key in source.other:
            t = f.get_tensor(key)
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise AdapterFormatError(f"{source.weights_file}: {key} holds {int((~torch.isfinite(t)).sum())} "
                                         "NaN/Inf value(s)")
            out[key] = t.contiguous()
    return out


def _readme(cfg, opened: list[Checkpoint], w, mode, summary, template, modules, dtype) -> str:
    lines = [
        "# Combined LoRA adapter", "",
        f"Written by `lispetorch combine build` (mode `{mode}`) from the checkpoint list `{cfg.source}`.", "",
        "| checkpoint | weight | path | description |", "|---|---|---|---|",
    ]
    for c, wi in zip(opened, w, strict=True):
        lines.append(f"| {c.name} | {wi:.6f} | `{c.path}` | {c.description} |")
    lines += ["", f"Modules: {len(modules)}; factors stored as {str(dtype).replace('torch.', '')}; rank "
              f"{summary['rank']} (per-module ranks in `rank_pattern`)."]
    if summary["dropped_modules"]:
        lines.append(f"Modules left out (not adapted by every checkpoint): {', '.join(summary['dropped_modules'])}.")
    if summary.get("layerwise"):
        lines.append(f"Each module was combined with its own {summary['layerwise']}'s weights from the layer-wise "
                     "solution (the table gives the global weights).")
    lines.append("")
    dev = summary["relative_deviation"]
    if mode == "template":
        lines += ["Mode `template` is a drop-in for the template checkpoint: the same tensor shapes, ranks and "
                  "`adapter_config.json`. Every module holds the best approximation of `Σ wᵢ ΔWᵢ` at the template's "
                  "rank in the Frobenius norm (Eckart–Young), computed from QR factorisations of the stacked factors "
                  "and an SVD of the small core, without forming the sum.",
                  f"Distance from the exact sum, relative to its norm (the discarded singular values): {dev:.6f}. "
                  "Mode `cat` writes the exact sum at rank Σ rᵢ."]
    elif mode == "cat":
        lines += ["Mode `cat` is exact: for every module `A = [A₁; …; A_k]` and `B = [w₁s₁B₁ | … | w_k s_k B_k]` "
                  "(sᵢ the checkpoint's scaling), so `B A = Σ wᵢ ΔWᵢ`; the adapter's scaling is 1 (lora_alpha = r).",
                  f"Measured distance from the exact sum, relative to its norm: {dev:.3e} (rounding only)."]
    elif mode == "svd":
        lines += ["Mode `svd` is the best approximation of `Σ wᵢ ΔWᵢ` of the stated rank in the Frobenius norm "
                  "(Eckart–Young), computed from QR factorisations of the stacked factors and an SVD of the small "
                  "core, without forming the sum; scaling 1 (lora_alpha = r).",
                  f"Distance from the exact sum, relative to its norm (the discarded singular values): {dev:.6f}."]
    else:
        lines += ["Mode `linear` combines A and B separately (`A = Σ wᵢ Aᵢ`, `B = Σ wᵢ (sᵢ/s) Bᵢ`), as the original "
                  "optimizer did. **This is an approximation**: `B A` contains the cross terms `wᵢ wⱼ Bᵢ Aⱼ` (i ≠ j) "
                  "and scales each `Bᵢ Aᵢ` by `wᵢ²` rather than `wᵢ`. Use mode `cat` for the exact sum.",
                  f"Measured distance from the exact sum `Σ wᵢ ΔWᵢ`, relative to its norm: {dev:.6f}."]
    if summary["kept_tensors"]:
        lines += ["", f"Tensors other than LoRA factors ({', '.join(summary['kept_tensors'])}) were kept as they are "
                  f"in `{summary['kept_from']}`: they are not combined."]
    if template is not None:
        lines += ["", f"Other files (tokenizer, configs, training state) were copied from the template `{template}`; "
                  "training state such as optimizer.pt belongs to the template's adapter, not to this one."]
    lines += ["", "Load it with:", "", "```python", "from peft import PeftModel",
              "model = PeftModel.from_pretrained(base_model, \"path/to/this/directory\")", "```", ""]
    return "\n".join(lines)
