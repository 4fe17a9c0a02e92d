"""Reading LoRA checkpoints module by module from their safetensors files.

A checkpoint is a PEFT adapter directory. Its ``adapter_config.json`` gives each module's scaling
``s = lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``; ``rank_pattern``/``alpha_pattern`` per module);
its ``adapter_model.safetensors`` holds ``<module>.lora_A.weight`` ``(r, in)`` and ``<module>.lora_B.weight``
``(out, r)``. ``ΔW = s · B A`` in PEFT's orientation ``(out, in)`` whatever ``fan_in_fan_out`` says (that flag
only says that the base layer stores its weight transposed, as GPT-2's ``Conv1D`` does).

Only the headers are read when a checkpoint is opened; :func:`stream` then yields one module's factors of all
checkpoints at a time, read in groups of modules into memory of the process (one system call per file and group,
the file checked before and after), while the disk reads of the next bytes are under way.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import json
import math
import mmap
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy
import torch

from ..errors import AdapterFormatError, ConfigError, ShapeError
from ..peft_format import CONFIG_NAME, MAGNITUDE, WEIGHTS_NAME, module_ranks, parse_key, read_config, scaling
from ..validate import show


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
    # tensors of the weights file that are not LoRA factors (``modules_to_save``: a trained head, embeddings)
    other: list[str] = field(default_factory=list)
    # the weights file's first bytes (its header's length and the header) when it was opened
    header: bytes = field(default=b"", repr=False)

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


def read_header(path: Path, data: bytes | None = None, size: int | None = None) -> tuple[dict[str, TensorEntry], int]:
    """The tensors of a safetensors file (key → :class:`TensorEntry`, byte ranges from the file's start) and the
    file's size, from its header: 8 bytes of little-endian length, then that many bytes of JSON, as the format
    defines. ``data`` and ``size``: the file's first bytes (at least its header) and its size when the caller has
    them already.

    The tensors' byte ranges must fit their shapes and dtypes and lie one after another, without overlap or gap,
    from the end of the header to the end of the file, as the format requires (and ``safetensors`` checks when
    it loads a file).

    Raises:
        AdapterFormatError: a file too short for its header, a header that is not the format's JSON, a tensor
            whose byte range is outside the data, does not fit its shape and dtype, or overlaps another's (both
            named), data that the tensors do not cover.
    """
    try:
        if size is None:
            size = path.stat().st_size
        if data is None:
            with open(path, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                body = f.read(n) if 0 <= n <= size else b""
        else:
            n = int.from_bytes(data[:8], "little") if size >= 8 and len(data) >= 8 else -1
            body = data[8:8 + n] if 0 <= n <= size else b""
    except OSError as e:
        raise AdapterFormatError(f"{path}: cannot be read ({e.strerror})") from None
    bad = f"{path} is not a readable safetensors file"
    if n < 0 or 8 + n > size or len(body) < n:
        raise AdapterFormatError(f"{bad} (its header length {n} does not fit in its {size} bytes)")
    base = 8 + n
    try:
        header = json.loads(body)
        if not isinstance(header, dict):
            raise TypeError(f"the header is a JSON {type(header).__name__}, not an object")
        entries = {}
        for key, e in header.items():
            if key == "__metadata__":
                if e is not None and not (isinstance(e, dict) and all(isinstance(v, str) for v in e.values())):
                    raise TypeError(f"__metadata__ must map names to strings, got {e!r:.80}")
                continue
            begin, end = e["data_offsets"]
            if type(begin) is not int or type(end) is not int or \
                    not all(type(d) is int and d >= 0 for d in e["shape"]):
                raise TypeError(f"{key}: offsets {e['data_offsets']!r} and shape {e['shape']!r} must be "
                                "non-negative integers")
            entries[key] = TensorEntry(str(e["dtype"]), tuple(e["shape"]), base + begin, base + end)
        for key, e in entries.items():
            width = _DTYPES[e.dtype].itemsize if e.dtype in _DTYPES else None
            if not base <= e.begin <= e.end <= size or (width and math.prod(e.shape) * width != e.end - e.begin):
                raise AdapterFormatError(
                    f"{key}: shape {list(e.shape)} of {e.dtype} in bytes [{e.begin}, {e.end}) of {size}")
        ordered = sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end))
        for (k0, e0), (k1, e1) in zip(ordered, ordered[1:], strict=False):
            if e1.begin < e0.end:
                raise AdapterFormatError(f"{k1} (bytes [{e1.begin}, {e1.end})) overlaps {k0} (bytes "
                                         f"[{e0.begin}, {e0.end}))")
        at = base
        for key, e in ordered:
            if e.begin > at:
                raise AdapterFormatError(f"bytes [{at}, {e.begin}) before {key} belong to no tensor")
            at = e.end
        if at != size:
            raise AdapterFormatError(f"bytes [{at}, {size}) at its end belong to no tensor")
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as e:
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
    if config.get("use_dora"):
        raise AdapterFormatError(f"checkpoint {name!r}: {path / CONFIG_NAME} says use_dora: a DoRA adapter's output "
                                 "is not linear in its factors, so checkpoints combine as LoRA adapters only")
    if config.get("target_parameters"):
        raise AdapterFormatError(f"checkpoint {name!r}: {path / CONFIG_NAME} has target_parameters "
                                 f"{show(config['target_parameters'])}: its expert stacks hold one ΔW per expert "
                                 "under one key, which the optimizer would read as one matrix; checkpoints combine "
                                 "as adapters on linear layers only")
    wfile = path / WEIGHTS_NAME
    if not wfile.is_file():
        legacy = " (only a legacy adapter_model.bin is there; re-save it as safetensors)" \
            if (path / "adapter_model.bin").is_file() else ""
        raise AdapterFormatError(f"checkpoint {name!r}: {wfile} is missing{legacy}")
    try:
        with open(wfile, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header = _head(f.fileno(), size)
        entries, size = read_header(wfile, header, size)
    except OSError as e:
        raise AdapterFormatError(f"checkpoint {name!r}: {wfile}: cannot be read ({e.strerror})") from None
    except AdapterFormatError as e:
        raise AdapterFormatError(f"checkpoint {name!r}: {e}") from None
    shapes = {k: e.shape for k, e in entries.items()}
    dtypes = {e.dtype for e in entries.values()}
    found: dict[str, dict[str, str]] = {}
    other = []
    for key in shapes:
        parsed = parse_key(key)
        if parsed is None and not re.search(r"(^|\.)lora_", key):
            other.append(key)  # a whole tensor trained beside the adapter (modules_to_save)
            continue
        if parsed is None:
            raise AdapterFormatError(f"checkpoint {name!r}: {wfile} holds {show(key)}, which is not a LoRA A/B weight "
                                     "(only lora_A / lora_B weights can be combined)")
        if parsed[1] == MAGNITUDE:
            raise AdapterFormatError(f"checkpoint {name!r}: {wfile} holds a DoRA magnitude ({show(key)}) but "
                                     f"{CONFIG_NAME} does not say use_dora")
        pair = found.setdefault(parsed[0], {})
        if parsed[1] in pair:
            raise AdapterFormatError(f"checkpoint {name!r}: {wfile} holds two keys for the {parsed[1]} of module "
                                     f"{parsed[0]!r}: {pair[parsed[1]]!r} and {key!r}")
        pair[parsed[1]] = key
    if not found:
        raise AdapterFormatError(f"checkpoint {name!r}: {wfile} holds no LoRA weights")
    use_rslora = bool(config.get("use_rslora", False))
    modules: dict[str, ModuleFactors] = {}
    for module in sorted(found, key=natural_key):
        pair = found[module]
        if set(pair) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(pair)).pop()
            raise AdapterFormatError(f"checkpoint {name!r}: {wfile} has no {missing} for module {show(module)}")
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
    dtypes = {e.dtype for k, e in entries.items() if k not in other}
    bad = {d for d in dtypes if d not in ("F16", "BF16", "F32", "F64")}
    if bad:
        raise AdapterFormatError(f"checkpoint {name!r}: {wfile} holds tensors of dtype {sorted(bad)}; LoRA "
                                 "factors must be floating-point")
    order = ["F64", "F32", "BF16", "F16"]
    widest = min(dtypes, key=order.index)
    dtype = _DTYPES[widest]
    return Checkpoint(name, path, description, config, modules, dtype,
                      fan_in_fan_out=bool(config.get("fan_in_fan_out", False)), use_rslora=use_rslora,
                      entries=entries, file_size=size, other=other, header=header)


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


class MappedFile:
    """An open safetensors file, read tensor by tensor into buffers of this process (:meth:`read`), and for callers
    that know nothing changes the file while they use it, mapped into memory (:meth:`tensor`).

    The file stays open while this object lives: a file renamed over it or deleted does not change what is read.
    A file changed in place underneath (truncated, copied over, ``rsync --inplace``) is an
    :class:`~lispetorch.errors.AdapterFormatError` naming the file: :meth:`read` compares the file's size and
    modification time with those it had when opened, before and after every read, and a short read is an error.
    A view of a map (:meth:`tensor`, :meth:`views`) cannot be so guarded in Python: a page of a map cut off by a
    truncation kills the process with ``SIGBUS`` when read there, so :func:`stream` reads copies unless its caller
    reads the views only in the native Gram, whose reads are guarded (``mapped``).

    ``entries`` and ``size``: what the file held when its checkpoint was opened, and ``header`` the bytes they
    were read from (:attr:`Checkpoint.header`): a file whose header bytes and size are still those is not parsed
    again.

    Raises:
        AdapterFormatError: see :func:`read_header`; a header that differs from ``entries`` (the file changed since
            its checkpoint was opened).
    """

    def __init__(self, path: Path, entries: dict[str, TensorEntry] | None = None, size: int = -1,
                 header: bytes = b"") -> None:
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close() or the garbage collector
        try:
            st = os.fstat(self._file.fileno())
            self._stamp = (st.st_size, st.st_mtime_ns)
            data = _head(self._file.fileno(), st.st_size)
        except OSError as e:
            self._file.close()
            raise AdapterFormatError(f"{path}: cannot be read ({e.strerror})") from None
        if entries is not None and header and data == header and size == st.st_size:
            self.entries, self._size = entries, size  # the very bytes ``entries`` were read from
        else:
            try:
                self.entries, self._size = read_header(path, data, st.st_size)
            except AdapterFormatError:
                self._file.close()
                raise
        if entries is not None and (size != self._size or entries != self.entries):
            self._file.close()
            raise AdapterFormatError(f"{path}: changed since it was opened (its header or size is not the same); "
                                     "open the checkpoints again")
        self._map: mmap.mmap | None = None
        self._address = 0

    def close(self) -> None:
        """Closes the file (views of its map stay valid)."""
        self._file.close()

    def _changed(self) -> str | None:
        """What changed in the file since it was opened (its size, its modification time), or None."""
        st = os.fstat(self._file.fileno())
        if st.st_size != self._stamp[0]:
            return f"its size went from {self._stamp[0]} to {st.st_size} bytes"
        if st.st_mtime_ns != self._stamp[1]:
            return "it was modified"
        return None

    def layout(self, *keys: str) -> tuple[int, list[tuple[int, int, int]], list[int]]:
        """Where :meth:`read` puts the tensors ``keys`` in a buffer: the bytes it needs, its reads as
        ``(file offset, buffer offset, length)``, and each tensor's buffer offset. Tensors that lie one after the
        other in the file lie so in the buffer too, and are read by one system call, as long as each stays aligned
        for its dtype; any other starts at the next multiple of 64 bytes.

        Raises:
            AdapterFormatError: a dtype that is not floating-point.
        """
        at, spans, places = 0, [], []
        for key in keys:
            e = self.entries[key]
            dtype = _DTYPES.get(e.dtype)
            if dtype is None:
                raise AdapterFormatError(f"{self.path}: {key} has dtype {e.dtype}, not a floating-point type")
            n = e.end - e.begin
            if n and spans and spans[-1][0] + spans[-1][2] == e.begin and at % dtype.itemsize == 0:
                spans[-1][2] += n
            elif n:
                at = _aligned(at)
                spans.append([e.begin, at, n])
            places.append(at)
            at += n
        return at, [(b, a, n) for b, a, n in spans], places

    def read_size(self, *keys: str) -> int:
        """The bytes :meth:`read` needs in a buffer for ``keys`` (see :meth:`layout`)."""
        return self.layout(*keys)[0]

    def read(self, *keys: str, buffer=None, offset: int = 0,
             layout: tuple[int, list[tuple[int, int, int]], list[int]] | None = None) -> list[torch.Tensor]:
        """The tensors ``keys``, read from the file into memory of this process: ``buffer`` from ``offset`` on
        (:meth:`read_size` bytes; any object with a writable buffer), or a new one, placed as :meth:`layout` says
        (tensors that lie one after the other take one system call; ``layout``: what it said, when the caller has
        it already). The file's size and modification time are compared with those it had when
        opened once before the reads and once after them all; the tensors are returned only after that.

        Raises:
            AdapterFormatError: a dtype that is not floating-point; the file changed since it was opened (named,
                with what changed), or cannot be read.
        """
        size, spans, places = layout or self.layout(*keys)
        if buffer is None:
            buffer = bytearray(size)
        fd = self._file.fileno()
        whole = memoryview(buffer)
        try:
            changed = self._changed()
            for begin, at, n in spans if changed is None else ():
                view, done = whole[offset + at:offset + at + n], 0
                try:
                    while done < n:
                        got = os.preadv(fd, [view[done:]], begin + done)
                        if got == 0:
                            changed = f"it ends at byte {begin + done}, inside the tensors it had there"
                            break
                        done += got
                finally:
                    view.release()
                if changed is not None:
                    break
            changed = changed or self._changed()
        except OSError as err:
            raise AdapterFormatError(f"{self.path}: cannot be read ({err.strerror})") from None
        finally:
            whole.release()
        if changed is not None:
            raise self._changed_while_read(changed)
        out = []
        for key, at in zip(keys, places, strict=True):
            e = self.entries[key]
            dtype = _DTYPES[e.dtype]
            count = (e.end - e.begin) // dtype.itemsize
            t = torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset + at) if count else \
                torch.empty(0, dtype=dtype)
            out.append(t.view(e.shape))
        return out

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as a view of the file mapped copy-on-write (a write to a view changes this process's
        pages, never the file; a copy only where its offset is not aligned for its dtype). Only for a file that
        nothing changes while the views live (see the class)."""
        if self._map is None:
            changed = self._changed()
            if changed is not None:
                raise AdapterFormatError(f"{self.path} changed since it was opened ({changed})")
        t = self._view(key)
        if t is None:
            e = self.entries[key]
            t = torch.frombuffer(self._map, dtype=torch.uint8, count=e.end - e.begin, offset=e.begin).clone()
            t = t.view(_DTYPES[e.dtype]).view(e.shape)
        return t

    def views(self, *keys: str) -> list[torch.Tensor] | None:
        """The tensors ``keys`` as views of the file mapped copy-on-write, or None where one of them is not aligned
        for its dtype (a view would need a copy, read here unguarded). The file's size and modification time are
        compared with those it had when opened before the views are made. Only for a reader that reads views
        under a guard that turns a page cut off by a truncation into an error (the native Gram,
        :func:`~lispetorch.ops.lora_gram_modules`): a plain read of such a page kills the process with ``SIGBUS``.

        Raises:
            AdapterFormatError: a dtype that is not floating-point; the file changed since it was opened.
        """
        changed = self._changed()
        if changed is not None:
            raise AdapterFormatError(f"{self.path} changed since it was opened ({changed})")
        out = [self._view(key) for key in keys]
        return None if any(t is None for t in out) else out

    def _view(self, key: str) -> torch.Tensor | None:
        """The tensor ``key`` as a view of the map (made at the first call), or None where its offset is not aligned
        for its dtype."""
        e = self.entries[key]
        dtype = _DTYPES.get(e.dtype)
        if dtype is None:
            raise AdapterFormatError(f"{self.path}: {key} has dtype {e.dtype}, not a floating-point type")
        if e.end == e.begin:
            return torch.empty(e.shape, dtype=dtype)
        if self._map is None:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
            self._address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        if (self._address + e.begin) % dtype.itemsize:
            return None
        return torch.frombuffer(self._map, dtype=dtype, count=(e.end - e.begin) // dtype.itemsize,
                                offset=e.begin).view(e.shape)

    def verify(self) -> None:
        """Raises :class:`~lispetorch.errors.AdapterFormatError` if the file's size or modification time is no
        longer what it was when opened: what was read from its map may not be what it held."""
        changed = self._changed()
        if changed is not None:
            raise self._changed_while_read(changed)

    def _changed_while_read(self, changed: str) -> AdapterFormatError:
        return AdapterFormatError(f"{self.path} changed while it was being read ({changed}); nothing read from it is "
                                  "used")

    def readahead(self, begin: int, end: int) -> None:
        """Starts reading bytes ``[begin, end)`` from the disk into the page cache and returns
        (``POSIX_FADV_WILLNEED``); the pages are there, or on their way, when :meth:`read` asks for them. Where the
        system has no such advice, does nothing (the pages come in as they are read)."""
        end = min(end, self._size)
        if end <= begin or not hasattr(os, "posix_fadvise"):
            return
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._file.fileno(), begin, end - begin, os.POSIX_FADV_WILLNEED)


def _head(fd: int, size: int) -> bytes:
    """The first bytes of an open safetensors file of ``size`` bytes: the header's length and as much of the header
    as that length says and the file holds (:func:`read_header` checks them)."""
    head = os.pread(fd, 8, 0)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    return head + os.pread(fd, n, 8) if 0 <= n <= size else head


def _aligned(n: int) -> int:
    return (n + 63) // 64 * 64


class _Buffers:
    """Buffers that :func:`stream` reads into, used again once nothing refers to them: reading into memory already
    in use costs no page faults, which fresh memory would cost at every module. A buffer is free when the only
    references left are the pool's own (a tensor made by ``torch.frombuffer`` holds one while it lives)."""

    def __init__(self) -> None:
        self._all: list[numpy.ndarray] = []

    def take(self, n: int) -> numpy.ndarray:
        for i in range(len(self._all)):
            # references: the list's, and getrefcount's argument
            if n <= len(self._all[i]) <= 4 * n + (1 << 16) and sys.getrefcount(self._all[i]) == 2:
                return self._all[i]
        buf = numpy.empty(n, dtype=numpy.uint8)  # not filled: every byte a tensor uses is read into it
        self._all.append(buf)
        return buf


def file_order(checkpoints: list[Checkpoint], modules: list[str]) -> list[str]:
    """``modules`` in the order their factors lie in the first checkpoint's file (safetensors sorts keys as
    strings: ``layers.10`` before ``layers.2``), so that streaming reads each file front to back."""
    if not checkpoints:
        return list(modules)
    first = checkpoints[0]
    entries = first.entries or read_header(first.weights_file)[0]
    return sorted(modules, key=lambda m: entries[first.modules[m].key_A].begin)


class Factors:
    """The iterator :func:`stream` yields: ``(module, [Aᵢ], [Bᵢ])`` one module at a time, and :meth:`verify`."""

    def __init__(self, gen: Iterator, files: list[MappedFile], mapped: bool) -> None:
        self._gen, self._files, self.mapped = gen, files, mapped

    def __iter__(self) -> Factors:
        return self

    def __next__(self) -> tuple[str, list[torch.Tensor], list[torch.Tensor]]:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def verify(self) -> None:
        """With views of the maps: raises :class:`~lispetorch.errors.AdapterFormatError` naming a file that changed
        since it was opened, so that what was read from it is not used (call it after reading the views). Copies
        were checked as they were read: nothing to do."""
        if self.mapped:
            for f in self._files:
                f.verify()


@contextlib.contextmanager
def stream(checkpoints: list[Checkpoint], modules: list[str], timer: dict | None = None, ahead: int = 64 << 20,
           group: int = 4 << 20, background: bool = False, mapped: bool = False) \
        -> Iterator[Factors]:
    """Opens every checkpoint's safetensors and yields an iterator over ``(module, [Aᵢ], [Bᵢ])``, one module at a
    time, in ``modules`` order. The factors are read into tensors of their own (see :meth:`MappedFile.read`), not
    views of mapped files: a file truncated or rewritten underneath is then an error naming it, never a signal.

    The modules are read in groups: the first module alone, then groups of twice the bytes of the one before, up to
    ``group`` bytes (of all files together). A group takes one :meth:`MappedFile.read` per file, so one system call
    per file where its factors lie one after the other, as they do in :func:`file_order`, and one check of the file
    before and one after; no tensor of a group is yielded before the check after it.

    Ahead of the group being read, the disk reads of the next ``ahead`` bytes of every file are started
    (``POSIX_FADV_WILLNEED``), so that reading from the disk overlaps the caller's work on the modules before; the
    modules should come in :func:`file_order`. With ``background``, the next group is read by a second thread
    while the caller works on this one (only worth it where a processor is free for it: the Gram's threads take
    them all). ``timer["read_s"]`` accumulates the time spent waiting for the reads.

    With ``mapped``, the factors are views of the files mapped copy-on-write (:meth:`MappedFile.views`), for a
    caller that reads them only where a page cut off by a truncation is an error, not a signal (the native Gram,
    :func:`~lispetorch.ops.lora_gram_modules`, on a CPU with its vector kernels), and that calls the iterator's
    :meth:`Factors.verify` after reading them. A group with a tensor not aligned for its dtype is read as copies.

    Raises:
        AdapterFormatError: a file that cannot be read, or changed since its checkpoint was opened.
    """
    files: list[MappedFile] = []
    try:
        for c in checkpoints:
            files.append(MappedFile(c.weights_file, c.entries or None, c.file_size, c.header))
    except OSError as e:
        for f in files:
            f.close()
        raise AdapterFormatError(f"checkpoint {c.name!r}: {c.weights_file}: cannot be read ({e.strerror})") from None
    except AdapterFormatError as e:
        for f in files:
            f.close()
        raise AdapterFormatError(f"checkpoint {c.name!r}: {e}") from None
    step = max(ahead // 4, 1 << 20)
    buffers = _Buffers()

    def keys_of(m: str) -> list[tuple[str, str]]:
        return [(c.modules[m].key_A, c.modules[m].key_B) for c in checkpoints]

    def groups() -> Iterator[list[str]]:
        size, limit, out = 0, 0, []
        for m in modules:
            try:
                size += sum(f.entries[a].end - f.entries[a].begin + f.entries[b].end - f.entries[b].begin
                            for f, (a, b) in zip(files, keys_of(m), strict=True))
            except KeyError as e:
                raise AdapterFormatError(f"the factors of {m!r} are not where the checkpoint's header said "
                                         f"({e})") from None
            out.append(m)
            if size >= limit:
                yield out
                limit = min(max(2 * size, 1), group)
                size, out = 0, []
        if out:
            yield out

    started = [0] * len(files)  # per file: reads started up to this byte

    def load(ms: list[str]) -> list[tuple[str, list[torch.Tensor], list[torch.Tensor]]]:
        keys = [[k for m in ms for k in keys_of(m)[i]] for i in range(len(files))]
        for i, (f, k) in enumerate(zip(files, keys, strict=True)):
            end = f.entries[k[-1]].end
            if started[i] < end + ahead // 2:
                begin = max(started[i], f.entries[k[0]].begin)
                started[i] = (max(started[i], end) + ahead + step - 1) // step * step
                f.readahead(begin, started[i])
        read = []
        if mapped:  # views, unless a tensor is not aligned for its dtype
            for c, f, k in zip(checkpoints, files, keys, strict=True):
                try:
                    read.append(f.views(*k))
                except AdapterFormatError as e:
                    raise AdapterFormatError(f"checkpoint {c.name!r}: cannot read the factors of {span(ms)}: "
                                             f"{e}") from None
            if any(v is None for v in read):
                read = []
        if not read:
            layouts = [f.layout(*k) for f, k in zip(files, keys, strict=True)]
            buffer, offset = buffers.take(sum(_aligned(lay[0]) for lay in layouts)), 0
            for c, f, k, lay in zip(checkpoints, files, keys, layouts, strict=True):
                try:
                    read.append(f.read(*k, buffer=buffer, offset=offset, layout=lay))
                except AdapterFormatError as e:
                    raise AdapterFormatError(f"checkpoint {c.name!r}: cannot read the factors of {span(ms)}: "
                                             f"{e}") from None
                offset += _aligned(lay[0])
        return [(m, [t[2 * j] for t in read], [t[2 * j + 1] for t in read]) for j, m in enumerate(ms)]

    def span(ms: list[str]) -> str:
        return repr(ms[0]) if len(ms) == 1 else f"{ms[0]!r} … {ms[-1]!r} ({len(ms)} modules)"

    def gen(pool: concurrent.futures.ThreadPoolExecutor | None):
        todo = groups()
        ms = next(todo, None)
        pending = pool.submit(load, ms) if pool is not None and ms is not None else None
        while ms is not None:
            t0 = time.perf_counter()
            got = load(ms) if pending is None else pending.result()
            ms = next(todo, None)
            if pending is not None:
                pending = pool.submit(load, ms) if ms is not None else None
            if timer is not None:
                timer["read_s"] = timer.get("read_s", 0.0) + time.perf_counter() - t0
            yield from got

    try:
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="lispetorch-read")) if background else None
            it = Factors(gen(pool), files, mapped)
            try:
                yield it
            finally:
                it.close()
    finally:
        for f in files:
            f.close()


def read_copies(checkpoints: list[Checkpoint], module: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``([Aᵢ], [Bᵢ])`` of ``module``, read again from the files into memory of this process (:meth:`MappedFile.read`:
    a file changed since its checkpoint was opened is an error)."""
    As, Bs = [], []
    for c in checkpoints:
        f = MappedFile(c.weights_file, c.entries or None, c.file_size, c.header)
        try:
            A, B = f.read(c.modules[module].key_A, c.modules[module].key_B)
        finally:
            f.close()
        As.append(A)
        Bs.append(B)
    return As, Bs


def check_finite(checkpoints: list[Checkpoint], module: str, As: list[torch.Tensor], Bs: list[torch.Tensor]) -> None:
    """Raises ValueError naming the checkpoint and key that hold NaN or Inf for ``module``."""
    for c, A, B in zip(checkpoints, As, Bs, strict=True):
        for key, t in ((c.modules[module].key_A, A), (c.modules[module].key_B, B)):
            if not torch.isfinite(t).all():
                n = int((~torch.isfinite(t)).sum())
                raise AdapterFormatError(f"checkpoint {c.name!r}: {c.weights_file}: {key} holds {n} NaN/Inf value(s)")
