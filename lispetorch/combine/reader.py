"""Reading LoRA checkpoints module by module from memory-mapped safetensors.

A checkpoint is a PEFT adapter directory. Its ``adapter_config.json`` gives each module's scaling
``s = lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``; ``rank_pattern``/``alpha_pattern`` per module);
its ``adapter_model.safetensors`` holds ``<module>.lora_A.weight`` ``(r, in)`` and ``<module>.lora_B.weight``
``(out, r)``. ``ΔW = s · B A`` in PEFT's orientation ``(out, in)`` whatever ``fan_in_fan_out`` says (that flag
only says that the base layer stores its weight transposed, as GPT-2's ``Conv1D`` does).

Only the headers are read when a checkpoint is opened; :func:`stream` then yields one module's factors of all
checkpoints at a time, as views of the memory-mapped files, while the next module's pages are read in.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import mmap
import os
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import AdapterFormatError, ConfigError, ShapeError
from ..peft_format import CONFIG_NAME, PREFIX, WEIGHTS_NAME, module_ranks, parse_key, read_config, scaling


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
    # the weights file's tensors and size when it was opened (see read_header)
    entries: dict[str, TensorEntry] = field(default_factory=dict, repr=False)
    file_size: int = -1
    # the keys of the modules trained whole (modules_to_save): not combined, kept from one checkpoint
    saved_keys: tuple[str, ...] = ()

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_NAME


@functools.lru_cache(maxsize=1 << 16)
def natural_key(name: str) -> tuple:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def layer_of(name: str) -> int | None:
    """The layer index of a module name (``model.layers.3.self_attn.q_proj`` → 3, ``transformer.h.3.attn`` → 3)."""
    m = re.search(r"\.(?:layers|h|blocks|layer|block)\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class TensorEntry(NamedTuple):
    """One tensor of a safetensors file: its dtype name, shape and byte range ``[begin, end)`` in the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path, data: bytes | None = None) -> tuple[dict[str, TensorEntry], int]:
    """The tensors of a safetensors file (key → :class:`TensorEntry`, byte ranges from the file's start) and the
    file's size, from its header: 8 bytes of little-endian length, then that many bytes of JSON, as the format
    defines. ``data``: the file's first bytes when the caller has them already (a map).

    Raises:
        AdapterFormatError: a file too short for its header, a header that is not the format's JSON, a tensor
            whose byte range is outside the data or does not fit its shape and dtype.
    """
    try:
        size = path.stat().st_size
        if data is None:
            with open(path, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                body = f.read(n) if 0 <= n <= size else b""
        else:
            n = int.from_bytes(data[:8], "little") if size >= 8 else -1
            body = data[8:8 + n] if 0 <= n <= size else b""
    except OSError as e:
        raise AdapterFormatError(f"{path}: cannot be read ({e.strerror})") from None
    bad = f"{path} is not a readable safetensors file"
    if n < 0 or 8 + n > size:
        raise AdapterFormatError(f"{bad} (its header length {n} does not fit in its {size} bytes)")
    base = 8 + n
    try:
        header = json.loads(body)
        entries = {key: TensorEntry(e["dtype"], tuple(int(d) for d in e["shape"]),
                                    base + int(e["data_offsets"][0]), base + int(e["data_offsets"][1]))
                   for key, e in header.items() if key != "__metadata__"}
        for key, e in entries.items():
            width = _DTYPES[e.dtype].itemsize if e.dtype in _DTYPES else None
            if not base <= e.begin <= e.end <= size or (width and math.prod(e.shape) * width != e.end - e.begin):
                raise AdapterFormatError(
                    f"{key}: shape {list(e.shape)} of {e.dtype} in bytes [{e.begin}, {e.end}) of {size}")
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise AdapterFormatError(f"{bad} ({e})") from None
    return entries, size


def open_checkpoint(name: str, path: str | Path, description: str = "") -> Checkpoint:
    """Reads a checkpoint's config and tensor headers and checks them; no tensor data is read.

    Raises:
        FileNotFoundError: the directory does not exist.
        AdapterFormatError: a missing or malformed file, an unsupported key, a module lacking A or B, factors whose
            shapes do not fit each other or the config's rank (each named with the file and key).
    """
    path = Path(path)
    config = read_config(path)  # names the file; raises when the directory or the config is missing
    wfile = path / WEIGHTS_NAME
    if not wfile.is_file():
        legacy = " (only a legacy adapter_model.bin is there; re-save it as safetensors)" \
            if (path / "adapter_model.bin").is_file() else ""
        raise AdapterFormatError(f"checkpoint {name!r}: {wfile} is missing{legacy}")
    try:
        entries, size = read_header(wfile)
    except AdapterFormatError as e:
        raise AdapterFormatError(f"checkpoint {name!r}: {e}") from None
    shapes = {k: e.shape for k, e in entries.items()}
    dtypes = {e.dtype for e in entries.values()}
    found: dict[str, dict[str, str]] = {}
    saved_names = config.get("modules_to_save") or []
    saved_keys = []
    for key in shapes:
        parsed = parse_key(key)
        if parsed is None and is_saved_key(key, saved_names):
            saved_keys.append(key)
            continue
        if parsed is None:
            raise AdapterFormatError(f"checkpoint {name!r}: {wfile} holds {key!r}, which is not a LoRA A/B weight "
                                     "(only lora_A / lora_B weights can be combined)")
        found.setdefault(parsed[0], {})[parsed[1]] = key
    if not found:
        raise AdapterFormatError(f"checkpoint {name!r}: {wfile} holds no LoRA weights")
    use_rslora = bool(config.get("use_rslora", False))
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
        r_cfg, alpha = module_ranks(config, module, r)
        if r_cfg != r:
            raise AdapterFormatError(f"checkpoint {name!r}: {pair['lora_A']} has rank {r} but {path / CONFIG_NAME} "
                                     f"says {r_cfg}")
        modules[module] = ModuleFactors(pair["lora_A"], pair["lora_B"], r, sa[1], sb[0], alpha,
                                        scaling(alpha, r, use_rslora))
    bad = {d for d in dtypes if d not in ("F16", "BF16", "F32", "F64")}
    if bad:
        raise AdapterFormatError(f"checkpoint {name!r}: {wfile} holds tensors of dtype {sorted(bad)}; LoRA "
                                 "factors must be floating-point")
    order = ["F64", "F32", "BF16", "F16"]
    widest = min(dtypes, key=order.index)
    dtype = _DTYPES[widest]
    return Checkpoint(name, path, description, config, modules, dtype,
                      fan_in_fan_out=bool(config.get("fan_in_fan_out", False)), use_rslora=use_rslora,
                      entries=entries, file_size=size, saved_keys=tuple(sorted(saved_keys)))


def is_saved_key(key: str, modules_to_save: list[str]) -> bool:
    """True for the key of a tensor of a module trained whole: ``base_model.model.<module>.<tensor>`` with
    ``<module>`` named (or ended) by one of ``modules_to_save``, as PEFT writes them."""
    dotted = "." + key.removeprefix(PREFIX)
    return isinstance(modules_to_save, list) and any(
        isinstance(m, str) and m and f".{m}." in dotted for m in modules_to_save)


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
        raise ConfigError(f"on_mismatch must be 'error' or 'intersect', got {on_mismatch!r}")
    fan = {c.name: c.fan_in_fan_out for c in checkpoints}
    if len(set(fan.values())) > 1:
        raise AdapterFormatError(f"checkpoints disagree on fan_in_fan_out ({fan}): they were trained on different "
                                 "layer types and cannot be combined")
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
            raise AdapterFormatError(f"the checkpoints adapt different module sets{extra}: {detail}. Pass "
                                     "on_mismatch='intersect' (--intersect) to combine only the modules all of "
                                     "them adapt")
        warnings.warn(f"combining only the {len(common)} modules all checkpoints adapt; dropped {len(dropped)}: "
                      f"{detail}", stacklevel=3)
    modules = sorted(common, key=natural_key)
    for m in modules:
        shapes = {c.name: (c.modules[m].out_features, c.modules[m].in_features) for c in checkpoints}
        if len(set(shapes.values())) > 1:
            raise ShapeError(f"module {m!r} has different shapes (out, in) across checkpoints: {shapes}")
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


_MADV_WILLNEED = 3


@functools.lru_cache(maxsize=1)
def _madvise():
    """libc's ``madvise`` through ctypes (which lets go of the GIL during the call), or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):  # pragma: no cover
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


class MappedFile:
    """A safetensors file mapped into memory, whose tensors are views of the page cache rather than copies.

    safetensors' own ``get_tensor`` copies every tensor out of its map; for the optimizer, which reads each factor
    once, that copy costs as much as reading the file. Here the file is mapped copy-on-write (a write to a view
    changes this process's pages, never the file) and each tensor is a view at the byte range its header gives
    (see :func:`read_header`). :meth:`readahead` has the kernel read a byte range ahead of use.

    Raises:
        AdapterFormatError: see :func:`read_header`.
    """

    def __init__(self, path: Path, entries: dict[str, TensorEntry] | None = None, size: int = -1) -> None:
        self.path = path
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 8:
                read_header(path)  # raises, naming the file
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        header_size = int.from_bytes(self._map[:8], "little")
        if entries is not None and len(self._map) == size and entries and \
                min(e.begin for e in entries.values()) == 8 + header_size:
            self.entries, self._size = entries, size  # the header read when the checkpoint was opened
        else:
            self.entries, self._size = read_header(path, self._map)
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as a view of the map (a copy only where its offset is not aligned for its dtype)."""
        e = self.entries[key]
        dtype = _DTYPES.get(e.dtype)
        if dtype is None:
            raise AdapterFormatError(f"{self.path}: {key} has dtype {e.dtype}, not a floating-point type")
        if e.end == e.begin:
            return torch.empty(e.shape, dtype=dtype)
        if (self._address + e.begin) % dtype.itemsize == 0:
            t = torch.frombuffer(self._map, dtype=dtype, count=(e.end - e.begin) // dtype.itemsize, offset=e.begin)
        else:
            t = torch.frombuffer(self._map, dtype=torch.uint8, count=e.end - e.begin, offset=e.begin).clone()
            t = t.view(dtype)
        return t.view(e.shape)

    def readahead(self, begin: int, end: int) -> None:
        """Starts reading bytes ``[begin, end)`` from the disk into the page cache and returns
        (``MADV_WILLNEED``); the pages are there, or on their way, when a view first reads them. Off Linux, does
        nothing (the pages come in as they are read)."""
        fn = _madvise()
        end = min(end, self._size)
        if fn is None or end <= begin:
            return
        page = mmap.PAGESIZE
        start = (self._address + begin) // page * page
        fn(start, self._address + end - start, _MADV_WILLNEED)


def file_order(checkpoints: list[Checkpoint], modules: list[str]) -> list[str]:
    """``modules`` in the order their factors lie in the first checkpoint's file (safetensors sorts keys as
    strings: ``layers.10`` before ``layers.2``), so that streaming reads each file front to back."""
    if not checkpoints:
        return list(modules)
    first = checkpoints[0]
    entries = first.entries or read_header(first.weights_file)[0]
    return sorted(modules, key=lambda m: entries[first.modules[m].key_A].begin)


@contextlib.contextmanager
def stream(checkpoints: list[Checkpoint], modules: list[str], timer: dict | None = None, ahead: int = 64 << 20) \
        -> Iterator[Iterator[tuple[str, list[torch.Tensor], list[torch.Tensor]]]]:
    """Maps every checkpoint's safetensors and yields an iterator over ``(module, [Aᵢ], [Bᵢ])``, one module at a
    time, in ``modules`` order. The factors are views of the files' pages (see :class:`MappedFile`): nothing is
    copied, and the process allocates no memory for them.

    Ahead of the module being yielded, the disk reads of the next ``ahead`` bytes of every file are started
    (``MADV_WILLNEED``), so that reading from the disk overlaps the caller's work on the modules before; the
    modules should come in :func:`file_order`. ``timer["read_s"]`` accumulates the time spent starting reads.
    """
    import time

    try:
        files = [MappedFile(c.weights_file, c.entries, c.file_size) for c in checkpoints]
    except OSError as e:
        raise AdapterFormatError(f"cannot map {e.filename}: {e.strerror}") from None
    step = max(ahead // 4, 1 << 20)

    def load(m: str):
        As, Bs = [], []
        for c, f in zip(checkpoints, files, strict=True):
            mf = c.modules[m]
            try:
                As.append(f.tensor(mf.key_A))
                Bs.append(f.tensor(mf.key_B))
            except (KeyError, AdapterFormatError) as e:
                raise AdapterFormatError(f"checkpoint {c.name!r}: {c.weights_file}: cannot read the factors of "
                                         f"{m!r} ({e})") from None
        return As, Bs

    def gen():
        started = [0] * len(files)  # per file: reads started up to this byte
        for m in modules:
            t0 = time.perf_counter()
            As, Bs = load(m)
            for i, (c, f) in enumerate(zip(checkpoints, files, strict=True)):
                end = f.entries[c.modules[m].key_B].end
                if started[i] < end + ahead // 2:
                    begin = max(started[i], f.entries[c.modules[m].key_A].begin)
                    started[i] = max(started[i], end) + ahead
                    started[i] = (started[i] + step - 1) // step * step
                    f.readahead(begin, started[i])
            if timer is not None:
                timer["read_s"] = timer.get("read_s", 0.0) + time.perf_counter() - t0
            yield m, As, Bs

    yield gen()


def check_finite(checkpoints: list[Checkpoint], module: str, As: list[torch.Tensor], Bs: list[torch.Tensor]) -> None:
    """Raises ValueError naming the checkpoint and key that hold NaN or Inf for ``module``."""
    for c, A, B in zip(checkpoints, As, Bs, strict=True):
        for key, t in ((c.modules[module].key_A, A), (c.modules[module].key_B, B)):
            if not torch.isfinite(t).all():
                n = int((~torch.isfinite(t)).sum())
                raise AdapterFormatError(f"checkpoint {c.name!r}: {c.weights_file}: {key} holds {n} NaN/Inf value(s)")
