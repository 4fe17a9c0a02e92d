"""The files of the ``extract`` and ``organize`` steps read back as checkpoints, so that ``optimize`` and ``build``
take the directory the step before wrote, as the optimizer's guide chains them:

- an extracted directory: ``NAME_metadata.json`` with ``NAME_A_matrices.safetensors`` and
  ``NAME_B_matrices.safetensors`` (factors by module name) per checkpoint;
- an organised directory (``organized_by_layer_module/``): ``master_index.json`` and one
  ``index_NNN_<label>_matrices.safetensors`` per module holding every checkpoint's ``NAME.lora_A`` and
  ``NAME.lora_B``.

Each checkpoint is a :class:`StoredCheckpoint`: the same shapes, ranks and scalings as the checkpoint it came
from, its factors read from those files (:func:`stream_stored`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import AdapterFormatError, ConfigError
from .config import CheckpointEntry, CombineConfig
from .reader import Checkpoint, ModuleFactors, natural_key

MASTER_INDEX = "master_index.json"
_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StoredCheckpoint(Checkpoint):
    """A checkpoint read back from the extract or organize step's files: ``locations`` gives, per module, the
    files holding its A and B (under the keys ``ModuleFactors.key_A`` / ``key_B``)."""

    locations: dict[str, tuple[Path, Path]] = field(default_factory=dict, repr=False)

    @property
    def weights_file(self) -> Path:
        first = next(iter(self.locations.values()), None)
        return first[0] if first else self.path


def is_stored(path) -> bool:
    """Whether ``path`` is a directory written by ``extract`` or ``organize``."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    p = Path(path)
    return p.is_dir() and ((p / MASTER_INDEX).is_file() or any(p.glob("*_metadata.json")))


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _metadata(directory: Path) -> list[dict]:
    metas = []
    for p in sorted(directory.glob("*_metadata.json")):
        meta = _json(p)
        for key in ("name", "files", "modules"):
            if key not in meta:
                raise AdapterFormatError(f"{p}: not an extraction metadata file (no {key!r})")
        meta["_file"] = p
        metas.append(meta)
    return sorted(metas, key=lambda m: (m.get("index", math.inf), str(m["_file"])))


def _factors(meta: dict, module: str, where: Path) -> ModuleFactors:
    try:
        r, i = meta["shape_A"]
        o, _ = meta["shape_B"]
        return ModuleFactors(module, module, int(r), int(i), int(o), float(meta["alpha"]), float(meta["scale"]))
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterFormatError(f"{where}: module {module!r} has no usable shape_A, shape_B, alpha and scale "
                                 f"({e})") from None


def _checkpoint(meta: dict, modules: dict[str, ModuleFactors], locations: dict, directory: Path) -> StoredCheckpoint:
    cfg = meta.get("adapter_config") or {}
    dtype = _DTYPES.get(str(meta.get("dtype", "float32")), torch.float32)
    return StoredCheckpoint(
        meta["name"], Path(meta.get("path") or directory), str(meta.get("description") or ""), dict(cfg), modules,
        dtype, fan_in_fan_out=meta.get("delta_orientation") == "in_out", use_rslora=bool(cfg.get("use_rslora")),
        locations=locations)


def _config(checkpoints: list[StoredCheckpoint], directory: Path) -> CombineConfig:
    return CombineConfig({c.name: CheckpointEntry(c.name, c.path, c.description) for c in checkpoints},
                         verify_paths=False, verbose_paths=False, source=str(directory))


def open_stored(directory: str | os.PathLike) -> tuple[CombineConfig, list[StoredCheckpoint]]:
    """The checkpoints an extracted or organised directory holds, in the checkpoint list's order, and a checkpoint
    list naming them (their original paths and descriptions).

    Raises:
        FileNotFoundError: not such a directory, or a file its index names is missing.
        AdapterFormatError: an index or metadata file that does not parse or lacks a field (named).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist or is not a directory")
    if (directory / MASTER_INDEX).is_file():
        checkpoints = _open_organized(directory)
    else:
        metas = _metadata(directory)
        if not metas:
            raise FileNotFoundError(f"{directory} holds neither {MASTER_INDEX} (organize's output) nor "
                                    "*_metadata.json (extract's output)")
        checkpoints = []
        for meta in metas:
            where = meta["_file"]
            try:
                files = (directory / meta["files"]["A"], directory / meta["files"]["B"])
            except (KeyError, TypeError):
                raise AdapterFormatError(f"{where}: 'files' must name the A and B files") from None
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"{f} is listed in {where} but does not exist")
            modules = {m: _factors(v, m, where) for m, v in sorted(meta["modules"].items(), key=lambda kv:
                                                                     natural_key(kv[0]))}
            checkpoints.append(_checkpoint(meta, modules, {m: files for m in modules}, directory))
    return _config(checkpoints, directory), checkpoints


def _open_organized(directory: Path) -> list[StoredCheckpoint]:
    where = directory / MASTER_INDEX
    index = _json(where)
    names, entries = index.get("checkpoints"), index.get("modules")
    if not isinstance(names, list) or not isinstance(entries, dict):
        raise AdapterFormatError(f"{where}: expected 'checkpoints' (a list) and 'modules' (a mapping)")
    info = index.get("checkpoint_info") or {}
    per: dict[str, tuple[dict, dict]] = {n: ({}, {}) for n in names}
    for m, e in sorted(entries.items(), key=lambda kv: natural_key(kv[0])):
        try:
            path = directory / e["file"]
            present, scales = e["checkpoints"], e["scales"]
        except (KeyError, TypeError):
            raise AdapterFormatError(f"{where}: module {m!r} lacks 'file', 'checkpoints' or 'scales'") from None
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in {where} but does not exist")
        shapes = e.get("shapes") or {}
        for n in present:
            if n not in per:
                raise AdapterFormatError(f"{where}: module {m!r} names checkpoint {n!r}, which is not in "
                                         "'checkpoints'")
            s = shapes.get(n)
            if not s or None in s.values():  # an index without shapes: read them from the file's header
                with safe_open(str(path), framework="pt") as f:
                    ra, ia = f.get_slice(f"{n}.lora_A").get_shape()
                    ob, _ = f.get_slice(f"{n}.lora_B").get_shape()
                s = {"shape_A": [ra, ia], "shape_B": [ob, ra], "alpha": float(scales[n]) * ra}
            meta = {**s, "scale": scales[n]}
            mf = _factors(meta, m, where)
            mf.key_A, mf.key_B = f"{n}.lora_A", f"{n}.lora_B"
            per[n][0][m] = mf
            per[n][1][m] = (path, path)
    return [_checkpoint({"name": n, **(info.get(n) or {})}, mods, locs, directory)
            for n, (mods, locs) in per.items()]


@contextlib.contextmanager
def stream_stored(checkpoints: list[StoredCheckpoint], modules: list[str], timer: dict | None = None) \
        -> Iterator[Iterator[tuple[str, list[torch.Tensor], list[torch.Tensor]]]]:
    """As :func:`lispetorch.combine.reader.stream`, over the stored files: ``(module, [Aᵢ], [Bᵢ])`` in
    ``modules`` order."""
    with contextlib.ExitStack() as stack:
        handles: dict[Path, object] = {}

        def handle(path: Path):
            if path not in handles:
                try:
                    handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
                except Exception as e:  # safetensors raises its own error type for a file it cannot read
                    raise AdapterFormatError(f"{path} is not a readable safetensors file ({e})") from None
            return handles[path]

        def gen():
            for m in modules:
                As, Bs = [], []
                for c in checkpoints:
                    if m not in c.modules:
                        raise ConfigError(f"checkpoint {c.name!r} has no factors for module {m!r}")
                    fa, fb = c.locations[m]
                    mf = c.modules[m]
                    try:
                        As.append(handle(fa).get_tensor(mf.key_A))
                        Bs.append(handle(fb).get_tensor(mf.key_B))
                    except Exception as e:  # a key the index names but the file lacks
                        if isinstance(e, AdapterFormatError):
                            raise
                        raise AdapterFormatError(f"checkpoint {c.name!r}: cannot read the factors of {m!r} from "
                                                 f"{fa} ({e})") from None
                yield m, As, Bs

        yield gen()


__all__ = ["MASTER_INDEX", "StoredCheckpoint", "is_stored", "open_stored", "stream_stored"]
