"""Reading LoRA checkpoints module by module from memory-mapped safetensors.

A checkpoint is a PEFT adapter directory. Its ``adapter_config.json`` gives each module's scaling
``s = lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``; ``rank_pattern``/``alpha_pattern`` per module);
its ``adapter_model.safetensors`` holds ``<module>.lora_A.weight`` ``(r, in)`` and ``<module>.lora_B.weight``
``(out, r)``. ``ΔW = s · B A`` in PEFT's orientation ``(out, in)`` whatever ``fan_in_fan_out`` says (that flag
only says that the base layer stores its weight transposed, as GPT-2's ``Conv1D`` does).

Only the headers are read when a checkpoint is opened; :func:`stream` then yields one module's factors of all
checkpoints at a time while the next module is read, so peak memory is two modules' factors.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import scaling
from ..peft_io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, AdapterFormatError, _pattern_value, read_config

_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight")


@dataclass
class ModuleFactors:
    """Where one module's factors are in a checkpoint, and its shapes and scaling."""

    key_A: str
    key_B: str
    rank: int
    in_features: int
    out_features: int
    alpha: float
    scale: float


@dataclass
class Checkpoint:
    """An opened (not yet read) PEFT LoRA checkpoint."""

    name: str
    path: Path
    description: str
    config: dict
    modules: dict[str, ModuleFactors]
    dtype: torch.dtype
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_NAME


def natural_key(name: str):
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def layer_of(name: str) -> int | None:
    """The layer index of a module name (``model.layers.3.self_attn.q_proj`` → 3, ``transformer.h.3.attn`` → 3)."""
    m = re.search(r"\.(?:layers|h|blocks|layer|block)\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None


def open_checkpoint(name: str, path: str | Path, description: str = "") -> Checkpoint:
    """Reads a checkpoint's config and tensor headers and checks them; no tensor data is read.

    Raises:
        FileNotFoundError: the directory does not exist.
        AdapterFormatError: a missing or malformed file, an unsupported key, a module lacking A or B, factors whose
            shapes do not fit each other or the config's rank (each named with the file and key).
    """
    from safetensors import safe_open

    path = Path(path)
    config = read_config(path)  # names the file; raises when the directory or the config is missing
    wfile = path / WEIGHTS_NAME
    if not wfile.is_file():
        legacy = " (only a legacy adapter_model.bin is there; re-save it as safetensors)" \
            if (path / "adapter_model.bin").is_file() else ""
        raise AdapterFormatError(f"checkpoint {name!r}: {wfile} is missing{legacy}")
    try:
        with safe_open(str(wfile), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
        raise AdapterFormatError(f"checkpoint {name!r}: {wfile} is not a readable safetensors file ({e})") from None
    found: dict[str, dict[str, str]] = {}
    for key in shapes:
        m = _KEY.fullmatch(key)
        if m is None:
            raise AdapterFormatError(f"checkpoint {name!r}: {wfile} holds {key!r}, which is not a LoRA A/B weight "
                                     "(only lora_A / lora_B weights can be combined)")
        found.setdefault(m.group(1), {})[m.group(2)] = key
    if not found:
        raise AdapterFormatError(f"checkpoint {name!r}: {wfile} holds no LoRA weights")
    use_rslora = bool(config.get("use_rslora", False))
    alpha_pattern = config.get("alpha_pattern") or {}
    rank_pattern = config.get("rank_pattern") or {}
    modules: dict[str, ModuleFactors] = {}
    for module in sorted(found, key=natural_key):
        pair = found[module]
        if set(pair) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(pair)).pop()
            raise AdapterFormatError(f"checkpoint {name!r}: {wfile} has no {missing} for module {module!r}")
        sa, sb = shapes[pair["lora_A"]], shapes[pair["lora_B"]]
        if len(sa) != 2 or len(sb) != 2 or sb[1] != sa[0] or sa[0] == 0:
            raise AdapterFormatError(f"checkpoint {name!r}: {wfile}: {pair['lora_A']} has shape {sa} and "
                                     f"{pair['lora_B']} has shape {sb}; expected (r, in) and (out, r)")
        r = sa[0]
        r_cfg = _pattern_value(rank_pattern, module, config.get("r", r))
        if r_cfg != r:
            raise AdapterFormatError(f"checkpoint {name!r}: {pair['lora_A']} has rank {r} but {path / CONFIG_NAME} "
                                     f"says {r_cfg}")
        alpha = float(_pattern_value(alpha_pattern, module, config.get("lora_alpha", 8)))
        modules[module] = ModuleFactors(pair["lora_A"], pair["lora_B"], r, sa[1], sb[0], alpha,
                                        scaling(alpha, r, use_rslora))
    bad = {d for d in dtypes if d not in ("F16", "BF16", "F32", "F64")}
    if bad:
        raise AdapterFormatError(f"checkpoint {name!r}: {wfile} holds tensors of dtype {sorted(bad)}; LoRA "
                                 "factors must be floating-point")
    order = ["F64", "F32", "BF16", "F16"]
    widest = min(dtypes, key=order.index)
    dtype = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[widest]
    return Checkpoint(name, path, description, config, modules, dtype,
                      fan_in_fan_out=bool(config.get("fan_in_fan_out", False)), use_rslora=use_rslora)


def common_modules(checkpoints: list[Checkpoint], on_mismatch: str = "error") -> tuple[list[str], list[str]]:
    """The modules every checkpoint adapts, in natural order, and the ones dropped.

    Args:
        on_mismatch (str): ``"error"`` (default) raises when the checkpoints adapt different module sets;
            ``"intersect"`` keeps the modules all of them adapt and warns, listing the ones dropped.

    Raises:
        ValueError: different module sets (with ``"error"``), a module whose shapes differ between checkpoints,
            or checkpoints that disagree on ``fan_in_fan_out``.
    """
    if on_mismatch not in ("error", "intersect"):
        raise ValueError(f"on_mismatch must be 'error' or 'intersect', got {on_mismatch!r}")
    fan = {c.name: c.fan_in_fan_out for c in checkpoints}
    if len(set(fan.values())) > 1:
        raise ValueError(f"checkpoints disagree on fan_in_fan_out ({fan}): they were trained on different layer "
                         "types and cannot be combined")
    sets = [set(c.modules) for c in checkpoints]
    common = set.intersection(*sets)
    union = set.union(*sets)
    dropped = sorted(union - common, key=natural_key)
    if dropped:
        lines = []
        for c, s in zip(checkpoints, sets, strict=True):
            missing = sorted(union - s, key=natural_key)
            if missing:
                shown = ", ".join(missing[:8]) + (f", … ({len(missing)} in all)" if len(missing) > 8 else "")
                lines.append(f"{c.name} lacks {shown}")
        detail = "; ".join(lines)
        if on_mismatch == "error" or not common:
            extra = "" if common else " (no module is adapted by all of them)"
            raise ValueError(f"the checkpoints adapt different module sets{extra}: {detail}. Pass "
                             "on_mismatch='intersect' (--intersect) to combine only the modules all of them adapt")
        warnings.warn(f"combining only the {len(common)} modules all checkpoints adapt; dropped {len(dropped)}: "
                      f"{detail}", stacklevel=3)
    modules = sorted(common, key=natural_key)
    for m in modules:
        shapes = {c.name: (c.modules[m].out_features, c.modules[m].in_features) for c in checkpoints}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"module {m!r} has different shapes (out, in) across checkpoints: {shapes}")
    return modules, dropped


@contextlib.contextmanager
def single_thread():
    """One intra-op thread while the per-module products run. Each is a fraction of a millisecond of work, on
    which a thread pool's fork/join costs as much as it saves on an idle machine, and many times the work on a
    busy one (a descheduled worker stalls every call); the files are read in the same thread anyway."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@contextlib.contextmanager
def stream(checkpoints: list[Checkpoint], modules: list[str], timer: dict | None = None) \
        -> Iterator[Iterator[tuple[str, list[torch.Tensor], list[torch.Tensor]]]]:
    """Opens every checkpoint's safetensors (memory-mapped) and yields an iterator over
    ``(module, [Aᵢ], [Bᵢ])``, one module at a time, in ``modules`` order.

    A background thread reads the next module while the caller works on the current one, so reading from the
    disk overlaps the computation; at most two modules' factors are in memory. ``timer["read_s"]`` accumulates
    the time the caller waited for data.
    """
    import time
    from concurrent.futures import ThreadPoolExecutor

    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(c.weights_file), framework="pt")) for c in checkpoints]
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="lispetorch-read"))

        def load(m: str):
            As, Bs = [], []
            for c, h in zip(checkpoints, handles, strict=True):
                f = c.modules[m]
                try:
                    # clone: the tensors are views of the memory map; copying reads the pages in this thread
                    As.append(h.get_tensor(f.key_A).clone())
                    Bs.append(h.get_tensor(f.key_B).clone())
                except Exception as e:
                    raise AdapterFormatError(f"checkpoint {c.name!r}: {c.weights_file}: cannot read the "
                                             f"factors of {m!r} ({e})") from None
            return As, Bs

        def gen():
            pending = pool.submit(load, modules[0]) if modules else None
            for i, m in enumerate(modules):
                t0 = time.perf_counter()
                As, Bs = pending.result()
                if timer is not None:
                    timer["read_s"] = timer.get("read_s", 0.0) + time.perf_counter() - t0
                pending = pool.submit(load, modules[i + 1]) if i + 1 < len(modules) else None
                yield m, As, Bs

        yield gen()


def check_finite(checkpoints: list[Checkpoint], module: str, As: list[torch.Tensor], Bs: list[torch.Tensor]) -> None:
    """Raises ValueError naming the checkpoint and key that hold NaN or Inf for ``module``."""
    for c, A, B in zip(checkpoints, As, Bs, strict=True):
        for key, t in ((c.modules[module].key_A, A), (c.modules[module].key_B, B)):
            if not torch.isfinite(t).all():
                n = int((~torch.isfinite(t)).sum())
                raise ValueError(f"checkpoint {c.name!r}: {c.weights_file}: {key} holds {n} NaN/Inf value(s)")


def peft_key(module: str, which: str) -> str:
    """The PEFT key of a module's factor: ``base_model.model.<module>.lora_A.weight``."""
    return f"{PREFIX}{module}.{which}.weight"
