"""What an adapter learned: per module statistics of its factors and the spectrum of ``ΔW = s·B A``.

    import lispetorch as lt
    report = lt.analyze("runs/a/adapter", model="models/base")   # or an adapted model
    report.modules["model.layers.0.self_attn.q_proj"]["effective_rank"]
    report.write_json("analysis.json"); report.plot("plots/")

The singular values of ``ΔW`` come from the factors alone: with ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (two thin
QR decompositions), ``ΔW = s·Q_B (R_B R_Aᵀ) Q_Aᵀ``, so the singular values of ``ΔW`` are those of the r×r matrix
``s·R_B R_Aᵀ``. That is exact, and the out×in matrix is never formed.

From the spectrum σ₁ ≥ … ≥ σ_r:

- ``effective_rank``: ``exp(H(p))`` with ``p_i = σ_i / Σσ`` (the entropy of the normalised spectrum; Roy and
  Vetterli, 2007): r for a flat spectrum, 1 for a single direction, 0 for ΔW = 0;
- ``stable_rank``: ``‖ΔW‖_F² / σ₁²``;
- ``rank_90`` / ``rank_99``: the fewest directions holding 90 % / 99 % of the energy ``Σσ²``;
- ``utilisation``: ``effective_rank / r``.

Every adapter of the SVD family (PiSSA, LoRA-GA, Rotational PiSSA, LoRA-XS, TinyLoRA) is analysed as its plain-LoRA
equivalent on the original weights (:func:`lispetorch.export` with ``original_weights=True``, what the training
engine saves), so its ``ΔW`` is the whole change it makes to the original model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from . import atomic
from .adapters import adapter_layers
from .errors import AdapterFormatError, ShapeError
from .experts import LoraExperts, from_peft, match_parameters, peft_weight_names
from .hf import weight_out_in
from .layer import base_of
from .peft_format import (
    CONFIG_NAME,
    MAGNITUDE,
    WEIGHTS_NAME,
    module_ranks,
    parse_key,
    peft_key,
    read_config,
    read_weights,
)
from .peft_io import export

ENERGY_LEVELS = (0.90, 0.99)
HEATMAP_NAME = "heatmap.png"
SPECTRA_NAME = "spectra.png"
_LAYER = re.compile(r"\.(\d+)\.")


def singular_values(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The singular values (descending, float64) of ``scale·B A`` for ``A`` (r, in) and ``B`` (out, r), from a QR
    of each factor and an SVD of the r×r product."""
    _, rb = torch.linalg.qr(B.detach().double())  # B = Q_B R_B, R_B: (k, r)
    _, ra = torch.linalg.qr(A.detach().double().t())  # Aᵀ = Q_A R_A, R_A: (k', r)
    return torch.linalg.svdvals(scale * (rb @ ra.t()))


def spectrum_stats(sv: torch.Tensor, r: int) -> dict:
    """Effective rank, stable rank, rank at 90 % and 99 % energy, and utilisation of a spectrum of rank ``r``."""
    sv = sv.double().clamp_min(0)
    total = float(sv.sum())
    energy = sv.square()
    e_total = float(energy.sum())
    if total <= 0 or e_total <= 0:
        out = {"effective_rank": 0.0, "stable_rank": 0.0, "utilisation": 0.0}
        out.update({f"rank_{round(level * 100)}": 0 for level in ENERGY_LEVELS})
        return out
    p = sv / total
    p = p[p > 0]
    eff = math.exp(float(-(p * p.log()).sum()))
    cum = torch.cumsum(energy, 0) / e_total
    out = {"effective_rank": eff, "stable_rank": e_total / float(energy[0]), "utilisation": eff / r}
    for level in ENERGY_LEVELS:
        out[f"rank_{round(level * 100)}"] = int((cum < level - 1e-12).sum()) + 1
    return out


def module_stats(A: torch.Tensor, B: torch.Tensor, scale: float, weight: torch.Tensor | None = None) -> dict:
    """Every statistic of one adapted module (see the module's docstring); ``weight`` (out, in) adds ``‖W‖_F``
    and ``‖ΔW‖_F / ‖W‖_F``."""
    A64, B64 = A.detach().double(), B.detach().double()
    sv = singular_values(A64, B64, scale)
    r = A.shape[0]
    delta = float(sv.square().sum().sqrt())
    out = {
        "rank": r,
        "scaling": scale,
        "shape": [B.shape[0], A.shape[1]],
        "A_norm": float(A64.norm()), "A_mean": float(A64.mean()), "A_std": float(A64.std()) if A64.numel() > 1 else 0.0,
        "B_norm": float(B64.norm()), "B_mean": float(B64.mean()), "B_std": float(B64.std()) if B64.numel() > 1 else 0.0,
        "delta_norm": delta,
        "singular_values": [float(s) for s in sv],
    }
    out.update(spectrum_stats(sv, r))
    if weight is not None:
        w_norm = float(weight.detach().double().norm())
        out["weight_norm"] = w_norm
        out["relative_delta_norm"] = delta / w_norm if w_norm > 0 else float("inf")
    return out


def layer_of(module: str) -> int | None:
    """The layer index in a module name (``model.layers.3.self_attn.q_proj`` → 3), or None."""
    m = _LAYER.search(f".{module}.")
    return int(m.group(1)) if m else None


def kind_of(module: str) -> str:
    """The module's type within its layer: the last part of its name (``q_proj``, ``c_attn``; an expert's
    ``gate_up_proj[3]`` is a ``gate_up_proj``)."""
    return module.rsplit(".", 1)[-1].split("[", 1)[0]


def _per_expert(name: str, A: torch.Tensor, B: torch.Tensor, scale: float, r: int) -> dict:
    """An expert stack's PEFT factors (``lora_A`` ``(r·E, in)``, ``lora_B`` ``(out, r·E)``) as one entry per
    expert, ``<name>[e]``."""
    A3, B3 = from_peft(A, B, A.shape[0] // r)
    return {f"{name}[{e}]": (A3[e], B3[e], scale) for e in range(A3.shape[0])}


def _expert_names(model: nn.Module, config: dict) -> dict[str, str]:
    """PEFT's module name of each adapted expert weight (``…experts.base_layer``) → ``<experts module>.<weight>``."""
    targets = config.get("target_parameters")
    if not targets:
        return {}
    keyed = peft_weight_names(model, match_parameters(model, targets))
    return {key_mod: f"{mod}.{p}" for key_mod, (mod, p) in keyed.items()}


def _expert_weight(net: nn.Module, name: str) -> torch.Tensor | None:
    """Expert ``e``'s weight ``(out, in)`` for ``<experts module>.<weight>[e]``, or None for another name."""
    m = re.fullmatch(r"(.+)\.([^.\[]+)\[(\d+)\]", name)
    if m is None:
        return None
    try:
        module = net.get_submodule(m.group(1))
    except AttributeError:
        return None
    owner = module.base_layer if isinstance(module, LoraExperts) else module
    w = getattr(owner, m.group(2), None)
    if not isinstance(w, torch.Tensor) or w.dim() != 3 or int(m.group(3)) >= w.shape[0]:
        return None
    w = w[int(m.group(3))]
    return w.t() if getattr(owner, "is_transposed", False) else w


@dataclasses.dataclass
class Analysis:
    """Per module statistics (``modules``: name → dict) and their summary (``summary``)."""

    source: str
    modules: dict[str, dict]
    summary: dict

    def to_dict(self) -> dict:
        return {"source": self.source, "summary": self.summary, "modules": self.modules}

    def write_json(self, path: str | os.PathLike) -> Path:
        """Writes :meth:`to_dict` as JSON, atomically."""
        path = Path(path)
        atomic.write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def plot(self, directory: str | os.PathLike) -> list[Path]:
        """A layer × module heatmap of the utilisation (and of ``‖ΔW‖/‖W‖`` when known) and the spectra, as PNGs
        in ``directory``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        layers = sorted({layer_of(n) for n in self.modules}, key=lambda v: -1 if v is None else v)
        kinds = sorted({kind_of(n) for n in self.modules})
        panels = [("utilisation", "rank utilisation (effective rank / r)")]
        if all("relative_delta_norm" in m for m in self.modules.values()):
            panels.append(("relative_delta_norm", "‖ΔW‖_F / ‖W‖_F"))
        fig, axes = plt.subplots(1, len(panels), figsize=(4 + 1.2 * len(kinds) * len(panels), 1.5 + 0.4 * len(layers)),
                                 squeeze=False)
        for ax, (key, title) in zip(axes[0], panels, strict=True):
            grid = torch.full((len(layers), len(kinds)), float("nan"))
            for name, m in self.modules.items():
                grid[layers.index(layer_of(name)), kinds.index(kind_of(name))] = m[key]
            im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
            ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
            ax.set_yticks(range(len(layers)), ["-" if v is None else str(v) for v in layers])
            ax.set_xlabel("module")
            ax.set_ylabel("layer")
            ax.set_title(title)
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        paths = [_save(fig, directory / HEATMAP_NAME)]
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(7, 4))
        for kind in kinds:
            spectra = [m["singular_values"] for n, m in self.modules.items() if kind_of(n) == kind]
            for i, sv in enumerate(spectra):
                ax.plot(range(1, len(sv) + 1), sv, color=f"C{kinds.index(kind) % 10}", alpha=0.6,
                        label=kind if i == 0 else None)
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.set_xlabel("index")
        ax.set_ylabel("singular value of ΔW")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(_save(fig, directory / SPECTRA_NAME))
        plt.close(fig)
        return paths


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


def summarize(modules: dict[str, dict]) -> dict:
    """Means over all modules and per module type: effective rank, utilisation, ‖ΔW‖ (and the overall ‖ΔW‖)."""
    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else float("nan")

    out = {"modules": len(modules),
           "delta_norm": math.sqrt(sum(m["delta_norm"] ** 2 for m in modules.values())),
           "effective_rank": mean(m["effective_rank"] for m in modules.values()),
           "utilisation": mean(m["utilisation"] for m in modules.values()),
           "by_kind": {}}
    for kind in sorted({kind_of(n) for n in modules}):
        ms = [m for n, m in modules.items() if kind_of(n) == kind]
        row = {"modules": len(ms), "delta_norm": math.sqrt(sum(m["delta_norm"] ** 2 for m in ms)),
               "effective_rank": mean(m["effective_rank"] for m in ms),
               "utilisation": mean(m["utilisation"] for m in ms),
               "A_norm": mean(m["A_norm"] for m in ms), "B_norm": mean(m["B_norm"] for m in ms)}
        if all("relative_delta_norm" in m for m in ms):
            row["relative_delta_norm"] = mean(m["relative_delta_norm"] for m in ms)
        out["by_kind"][kind] = row
    if modules and all("relative_delta_norm" in m for m in modules.values()):
        out["relative_delta_norm"] = mean(m["relative_delta_norm"] for m in modules.values())
    return out


def adapter_factors(directory: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{module: (A, B, scaling)}`` of a PEFT LoRA adapter directory.

    Raises:
        FileNotFoundError: no such directory. AdapterFormatError: not an adapter directory (names the missing or
            malformed file), a key that is not a LoRA factor, a module lacking A or B, factors that do not fit.
    """
    directory = Path(directory)
    config = read_config(directory)
    weights = read_weights(directory)
    wpath = directory / WEIGHTS_NAME
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        parsed = parse_key(key)
        if parsed is None:
            raise AdapterFormatError(f"{wpath}: key {key!r} is not a LoRA factor (lora_A / lora_B weight)")
        if parsed[1] == MAGNITUDE:  # a DoRA magnitude: the spectra are the low-rank update's
            continue
        found.setdefault(parsed[0], {})[parsed[1]] = tensor
    if not found:
        raise AdapterFormatError(f"{wpath}: holds no LoRA weights")
    out = {}
    rslora = bool(config.get("use_rslora", False))
    for name, pair in sorted(found.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterFormatError(f"{wpath}: module {name!r} lacks {({'lora_A', 'lora_B'} - set(pair)).pop()}")
        A, B = pair["lora_A"], pair["lora_B"]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise AdapterFormatError(f"{wpath}: module {name!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                                     "are not the factors of one low-rank matrix (B: out×r, A: r×in)")
        r = A.shape[0]
        rank, alpha = module_ranks(config, name, r)
        if config.get("target_parameters") and rank != r and rank > 0 and r % rank == 0:  # an expert stack
            out.update(_per_expert(name, A, B, alpha / math.sqrt(rank) if rslora else alpha / rank, rank))
            continue
        if rank != r:
            raise AdapterFormatError(f"{wpath}: {peft_key(name, 'lora_A')} has rank {r} but {directory / CONFIG_NAME}"
                                     f" says {rank}")
        out[name] = (A, B, alpha / math.sqrt(r) if rslora else alpha / r)
    return out


def _renamed(name: str, experts: dict[str, str]) -> str:
    """``<PEFT module>[e]`` → ``<experts module>.<weight>[e]`` where ``experts`` knows the module."""
    head, bracket, tail = name.partition("[")
    return experts[head] + bracket + tail if bracket and head in experts else name


def _load_model(path: str | os.PathLike) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if not Path(path).is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def _live_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    tensors, config = export(model, original_weights=True)
    out = {}
    for key, t in tensors.items():
        parsed = parse_key(key)
        if parsed is None or parsed[1] == MAGNITUDE:  # a module trained whole (modules_to_save), a DoRA magnitude
            continue
        name, which = parsed
        out.setdefault(name, {})[which] = t
    result = {}
    experts = _expert_names(model, config)
    for name, pair in out.items():
        A, B = pair["lora_A"], pair["lora_B"]
        own = experts.get(name)
        rank, alpha = module_ranks(config, own or name, A.shape[0])
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        if own is not None:
            result.update(_per_expert(own, A, B, scale, rank))
        else:
            result[name] = (A, B, scale)
    return result


def analyze(adapter: str | os.PathLike | nn.Module, model: str | os.PathLike | nn.Module | None = None) -> Analysis:
    """The statistics of every adapted module of ``adapter`` (a PEFT adapter directory, or a model holding an
    adapter: its active one, as its plain-LoRA equivalent on the original weights).

    Args:
        adapter: the adapter directory or adapted model.
        model: the base model (a directory or a module) whose weights give ``‖W‖`` and ``‖ΔW‖/‖W‖``. Default
            None: without them (for an adapted model given as ``adapter``, its own base weights are used when the
            adapter leaves them untouched).

    Raises:
        AdapterFormatError: not an adapter directory, or an adapter module the model does not have.
        ShapeError: a factor whose shape does not fit the model's weight (names the file, module and shapes).
    """
    if isinstance(adapter, nn.Module):
        factors = _live_factors(adapter)
        source = type(adapter).__name__
        if model is None and not any(layer.base_offset for layer in adapter_layers(adapter).values()):
            model = adapter
    else:
        factors = adapter_factors(adapter)
        source = str(adapter)
    weights: dict[str, torch.Tensor] = {}
    if model is not None:
        net = model if isinstance(model, nn.Module) else _load_model(model)
        where = source if isinstance(adapter, nn.Module) else str(Path(adapter) / WEIGHTS_NAME)
        mods = dict(net.named_modules())
        if not isinstance(adapter, nn.Module):  # a file's expert weights, named as the model has them
            experts = _expert_names(net, read_config(adapter))
            factors = {_renamed(n, experts): f for n, f in factors.items()}
        for name, (A, B, _) in factors.items():
            expert_w = _expert_weight(net, name)
            if expert_w is not None:
                if tuple(expert_w.shape) != (B.shape[0], A.shape[1]):
                    raise ShapeError(f"{where}: expert weight {name!r}: the adapter's ΔW is {B.shape[0]}×{A.shape[1]}"
                                     f" but the model's is {expert_w.shape[0]}×{expert_w.shape[1]}")
                weights[name] = expert_w.float()
                continue
            if name not in mods:
                raise AdapterFormatError(f"{where}: module {name!r} is not in the model "
                                         f"({model if not isinstance(model, nn.Module) else type(model).__name__})")
            base = base_of(mods[name])
            w = weight_out_in(base) if hasattr(base, "weight") else None
            if w is None or w.dim() != 2:
                raise ShapeError(f"{where}: module {name!r} is not a linear layer in the model")
            if tuple(w.shape) != (B.shape[0], A.shape[1]):
                raise ShapeError(f"{where}: module {name!r}: the adapter's ΔW is {B.shape[0]}×{A.shape[1]} but the "
                                 f"model's weight is {w.shape[0]}×{w.shape[1]}")
            weights[name] = w.float() if w.is_floating_point() else base.dequantize()
    modules = {name: module_stats(A, B, s, weights.get(name)) for name, (A, B, s) in factors.items()}
    return Analysis(source, modules, summarize(modules))


# --- the command -------------------------------------------------------------------------------------------------
def configure(parser) -> None:
    parser.add_argument("adapter", help="a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--model", help="the base model directory: adds ‖W‖ and ‖ΔW‖/‖W‖")
    parser.add_argument("--json", help="write the full analysis (per module) to this JSON file")
    parser.add_argument("--plots", help="write heatmap.png and spectra.png into this directory")


def main(args) -> int:
    result = analyze(args.adapter, args.model)
    rel = "relative_delta_norm" in result.summary
    header = f"{'module':<48} {'r':>3} {'‖ΔW‖':>10} " + (f"{'‖ΔW‖/‖W‖':>10} " if rel else "") + \
        f"{'eff.rank':>8} {'stable':>7} {'r90':>4} {'r99':>4} {'util':>6}"
    print(header)
    for name, m in result.modules.items():
        print(f"{name[-48:]:<48} {m['rank']:>3} {m['delta_norm']:>10.4g} "
              + (f"{m['relative_delta_norm']:>10.4g} " if rel else "")
              + f"{m['effective_rank']:>8.3f} {m['stable_rank']:>7.3f} {m['rank_90']:>4} {m['rank_99']:>4} "
              f"{m['utilisation']:>6.1%}")
    s = result.summary
    print(f"{s['modules']} modules: ‖ΔW‖ {s['delta_norm']:.4g}, mean effective rank {s['effective_rank']:.3f}, "
          f"mean utilisation {s['utilisation']:.1%}")
    if args.json:
        print(f"json: {result.write_json(args.json)}")
    if args.plots:
        for p in result.plot(args.plots):
            print(f"plot: {p}")
    return 0
