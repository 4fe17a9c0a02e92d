"""Merged export on disk, streaming: :func:`export_merged` folds a PEFT LoRA adapter directory into a Hugging Face
model directory's safetensors weights and writes a new model directory, one tensor at a time.

No model is built: each shard of the model (``model.safetensors``, or ``model.safetensors.index.json`` and the
shards it names) is read tensor by tensor, the weights the adapter adapts get ``W + s·B A`` (transposed for a
GPT-2 ``Conv1D``, ``fan_in_fan_out``), the modules it trains whole (``modules_to_save``) take the adapter's
tensors, and each tensor is written to the output shard as soon as it is ready. The memory held is one tensor
plus the adapter, never a shard or the model. The output keeps the input's sharding, index and non-weight files
(config, tokenizer, generation config), and appears in one step (:func:`lispetorch.atomic.directory`): an
interrupted export leaves no output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
from pathlib import Path

import torch

from . import atomic
from .errors import AdapterFormatError, ConfigError, ShapeError
from .hf import DTYPES
from .peft_format import (
    CONFIG_NAME,
    MAGNITUDE,
    PREFIX,
    WEIGHTS_NAME,
    module_ranks,
    parse_key,
    peft_key,
    read_config,
    read_weights,
    scaling,
)
from .validate import show

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")
# safetensors dtype names <-> torch dtypes
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
MAX_HEADER = 100 << 20


# --- safetensors, one tensor at a time -------------------------------------------------------------------------
def read_header(path: Path) -> tuple[dict, dict, int]:
    """``(tensors, metadata, data_start)`` of a safetensors file: each tensor's dtype, shape and byte range."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise AdapterFormatError(f"{path}: not a safetensors file (shorter than its 8-byte header size)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER:
                raise AdapterFormatError(f"{path}: not a safetensors file (header of {n} bytes)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{path}: not a safetensors file (header not JSON: {e})") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path}: not a safetensors file (header not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    size = path.stat().st_size
    for key, info in header.items():
        ok = isinstance(info, dict) and info.get("dtype") in _ST_DTYPES and isinstance(info.get("shape"), list) \
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
        if ok:
            begin, end = info["data_offsets"]
            numel = 1
            for d in info["shape"]:
                numel *= d
            ok = 0 <= begin <= end <= size - 8 - n and \
                end - begin == numel * _ST_DTYPES[info["dtype"]].itemsize
        if not ok:
            raise AdapterFormatError(f"{path}: tensor {show(key)} has an unreadable entry {show(info)}")
    return header, metadata, 8 + n


def read_tensor(f, info: dict, data_start: int) -> torch.Tensor:
    """One tensor of an open safetensors file, read into its own memory (not a mapping of the file)."""
    begin, end = info["data_offsets"]
    buf = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(data_start + begin)
    if f.readinto(buf.numpy()) != end - begin:
        raise AdapterFormatError(f"{f.name}: truncated")
    return buf.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def _write_shard(src: Path, dst: Path, transform, dtype: torch.dtype | None) -> int:
    """Writes ``dst`` with ``src``'s tensors, in its order, each passed through ``transform(key, tensor)``
    and cast to ``dtype`` if floating; returns the data size in bytes."""
    header, metadata, start = read_header(src)
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    out, offset = {}, 0
    for key in order:
        info = header[key]
        st = _ST_DTYPES[info["dtype"]]
        out_dtype = dtype if dtype is not None and st.is_floating_point else st
        numel = (info["data_offsets"][1] - info["data_offsets"][0]) // st.itemsize
        size = numel * out_dtype.itemsize
        out[key] = {"dtype": _ST_NAMES[out_dtype], "shape": info["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        out = {"__metadata__": metadata, **out}
    blob = json.dumps(out, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(struct.pack("<Q", len(blob)))
        g.write(blob)
        for key in order:
            t = transform(key, read_tensor(f, header[key], start))
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            g.write(t.contiguous().view(-1).view(torch.uint8).numpy())
        g.flush()
        os.fsync(g.fileno())
    return offset


# --- the adapter, keyed by checkpoint names ------------------------------------------------------------------
def _shards(model_dir: Path) -> tuple[list[str], dict | None]:
    """The shard file names of ``model_dir`` and its index (None for a single file)."""
    index_path = model_dir / INDEX
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterFormatError(f"{index_path}: not valid JSON ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise AdapterFormatError(f"{index_path}: needs a non-empty 'weight_map' of tensor name -> shard file")
        names = []
        for key, name in weight_map.items():
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                raise AdapterFormatError(f"{index_path}: weight_map[{show(key)}] is {show(name)}, not a shard file "
                                         "name in the model directory")
            if name not in names:
                names.append(name)
        for name in names:
            if not (model_dir / name).is_file():
                raise FileNotFoundError(f"{index_path}: shard {name} is missing from {model_dir}")
        return names, index
    if (model_dir / SINGLE).is_file():
        return [SINGLE], None
    raise FileNotFoundError(f"{model_dir}: no {SINGLE} or {INDEX} (only safetensors model directories are exported)")


def _checkpoint_key(module: str, param: str, keys: set[str], where: str) -> str:
    """The checkpoint's key for ``module.param``: the same name, or the name with the model class's prefix
    (``model.``, ``transformer.``) dropped or added."""
    name = f"{module}.{param}"
    candidates = [name]
    if "." in name:
        candidates.append(name.split(".", 1)[1])
    candidates += sorted({f"{k.split('.', 1)[0]}.{name}" for k in keys if "." in k})
    for c in candidates:
        if c in keys:
            return c
    raise AdapterFormatError(f"{where}: module {show(module)} has no tensor {show(name)} in the model's checkpoint "
                             f"(some of its keys: {sorted(keys)[:5]})")


def _deltas(adapter_dir: Path, keys: dict[str, tuple], where: str):
    """``(deltas, replaced)``: checkpoint key -> (A, B, scaling, transposed, DoRA magnitude or None) for each adapted
    weight, and
    checkpoint key -> tensor for each tensor of a module trained whole; every tensor checked."""
    config = read_config(adapter_dir)
    weights = read_weights(adapter_dir)
    wpath = adapter_dir / WEIGHTS_NAME
    names = set(keys)
    replaced: dict[str, torch.Tensor] = {}
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(n, str) and n for n in saved):
        raise AdapterFormatError(f"{adapter_dir / CONFIG_NAME}: modules_to_save must be a list of module names, "
                                 f"got {show(saved)}")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        parsed = parse_key(key)
        if parsed is not None:
            found.setdefault(parsed[0], {})[parsed[1]] = tensor
            continue
        stem = key[len(PREFIX):] if key.startswith(PREFIX) else key
        module = next((m for m in saved if f".{m}." in f".{stem}"), None)  # a name or a dotted suffix of one
        if module is None:
            raise AdapterFormatError(f"{wpath}: unsupported key {show(key)} (only lora_A / lora_B weights and the "
                                     "tensors of modules_to_save are read)")
        ck = _checkpoint_key(*stem.rsplit(".", 1), names, str(wpath))
        dtype, shape = keys[ck]
        if tuple(tensor.shape) != tuple(shape):
            raise ShapeError(f"{wpath}: {key} has shape {tuple(tensor.shape)} but the model's {ck} is {tuple(shape)}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterFormatError(f"{wpath}: key {show(key)} holds non-finite values")
        replaced[ck] = tensor
    if not found and not replaced:
        raise AdapterFormatError(f"{wpath}: holds no LoRA weights")
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    use_rslora = bool(config.get("use_rslora", False))
    use_dora = bool(config.get("use_dora", False))
    deltas = {}
    for module, pair in found.items():
        magnitude = pair.pop(MAGNITUDE, None)
        if (magnitude is not None) != use_dora:
            raise AdapterFormatError(f"{wpath}: module {show(module)} {'has' if magnitude is not None else 'lacks'} "
                                     f"a DoRA magnitude ({peft_key(module, MAGNITUDE)}) and {CONFIG_NAME} says "
                                     f"use_dora {use_dora}")
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterFormatError(f"{wpath}: module {show(module)} lacks {({'lora_A', 'lora_B'} - set(pair)).pop()}")
        A, B = pair["lora_A"], pair["lora_B"]
        ck = _checkpoint_key(module, "weight", names, str(wpath))
        if ck in replaced:
            raise AdapterFormatError(f"{wpath}: module {show(module)} is both adapted and trained whole")
        r = A.shape[0] if A.dim() == 2 else -1
        _, shape = keys[ck]
        out_in = tuple(reversed(shape)) if fan_in_fan_out else tuple(shape)
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r or (B.shape[0], A.shape[1]) != out_in:
            raise ShapeError(f"{wpath}: {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, which do "
                             f"not fit the model's {ck} of shape {tuple(shape)}"
                             f"{' (fan_in_fan_out: stored in × out)' if fan_in_fan_out else ''}")
        if magnitude is not None and tuple(magnitude.shape) != (out_in[0],):
            raise ShapeError(f"{wpath}: {peft_key(module, MAGNITUDE)} has shape {tuple(magnitude.shape)} but the "
                             f"model's {ck} needs ({out_in[0]},)")
        for which, t in (*pair.items(), *(() if magnitude is None else ((MAGNITUDE, magnitude),))):
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise AdapterFormatError(f"{wpath}: {module}.{which} holds non-finite or non-float values")
        rank_cfg, alpha = module_ranks(config, module, r)
        if rank_cfg != r:
            raise AdapterFormatError(f"{wpath}: {module}.lora_A has rank {r} but {CONFIG_NAME} says {rank_cfg}")
        deltas[ck] = (A, B, scaling(alpha, r, use_rslora), fan_in_fan_out, magnitude)
    return deltas, replaced


def _merge(key: str, W: torch.Tensor, delta) -> torch.Tensor:
    """``W + s·B A`` (transposed for ``fan_in_fan_out``; for DoRA ``m ⊙ (W + s·B A) / ‖W + s·B A‖`` per output
    row), computed in float32 in ``W``'s own memory when it is float32, in ``W``'s dtype; a non-finite result
    (caught by its sum in float64, one pass) is refused."""
    A, B, s, transposed, magnitude = delta
    d = (B.float() @ A.float()) * s
    merged = W.float().add_(d.T if transposed else d)  # (out, in), or (in, out) transposed
    if magnitude is not None:
        rows = merged.T if transposed else merged
        norm = torch.linalg.vector_norm(rows, dim=1)  # (out,)
        g = torch.where(norm > 0, magnitude.float() / norm, torch.zeros_like(norm))
        rows.mul_(g[:, None])
    merged = merged.to(W.dtype)
    if not torch.isfinite(merged.sum(dtype=torch.float64)):
        raise ValueError(f"merging into {key} gives non-finite values; nothing was written")
    return merged


# --- the directory -------------------------------------------------------------------------------------------
def export_merged(adapter_dir: str | os.PathLike, model_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  dtype: str | torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Writes ``out_dir``: the Hugging Face model of ``model_dir`` with the PEFT LoRA adapter of ``adapter_dir``
    merged in, streaming (one tensor in memory at a time, plus the adapter; no model is built).

    The output has the input's shards and index, each adapted weight ``W + s·B A`` (``s`` = alpha / r, or
    rsLoRA's alpha / √r, per module after ``rank_pattern`` / ``alpha_pattern``; ``fan_in_fan_out`` for GPT-2's
    ``Conv1D``), the adapter's tensors for its ``modules_to_save``, and the input's other files (config,
    tokenizer, generation config). ``AutoModelForCausalLM.from_pretrained(out_dir)`` gives the merged model.

    Args:
        adapter_dir: a PEFT LoRA adapter directory (``adapter_config.json``, ``adapter_model.safetensors``).
        model_dir: the base model's directory, in safetensors (one file or an index and shards).
        out_dir: the directory to write; it appears complete or not at all.
        dtype: the floating dtype of the output (``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch
            dtype); None keeps each tensor's. The merge itself is computed in float32.
        overwrite: replace an existing ``out_dir``. Default False.

    Returns:
        Path: ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False (nothing is written, on this or any error).
        FileNotFoundError: a missing directory or shard.
        AdapterFormatError: an adapter or checkpoint that cannot be read or does not fit (naming file and key).
        ShapeError: an adapter tensor whose shape does not fit the checkpoint's weight.
        ConfigError: an unknown dtype, or ``out_dir`` equal to an input directory.
        ValueError: a merged weight that would be non-finite.
    """
    adapter_dir, model_dir, out_dir = Path(adapter_dir), Path(model_dir), Path(out_dir)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {show(dtype)} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ConfigError(f"dtype {show(dtype)} is not a floating torch dtype")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    for other in (model_dir, adapter_dir):
        if out_dir.resolve() == other.resolve():
            raise ConfigError(f"output directory {out_dir} is an input directory")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {out_dir} exists (pass overwrite=True / --overwrite to replace it)")
    shards, index = _shards(model_dir)
    keys: dict[str, tuple] = {}
    for shard in shards:
        header, _, _ = read_header(model_dir / shard)
        for key, info in header.items():
            keys[key] = (info["dtype"], info["shape"])
    deltas, replaced = _deltas(adapter_dir, keys, str(adapter_dir))

    def transform(key: str, t: torch.Tensor) -> torch.Tensor:
        if key in replaced:
            return replaced[key].to(t.dtype)
        if key in deltas:
            return _merge(key, t, deltas[key])
        return t

    with atomic.directory(out_dir) as tmp:
        total = sum(_write_shard(model_dir / s, tmp / s, transform, dtype) for s in shards)
        if index is not None:
            index = {**index, "metadata": {**(index.get("metadata") or {}), "total_size": total}}
            (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for src in sorted(model_dir.iterdir()):
            if src.is_file() and not src.name.startswith(".") and not src.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(src, tmp / src.name)
        if dtype is not None and (tmp / "config.json").is_file():
            config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            name = str(dtype).removeprefix("torch.")
            config["dtype"] = name
            if "torch_dtype" in config:
                config["torch_dtype"] = name
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


# --- the command ---------------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="a PEFT LoRA adapter directory")
    parser.add_argument("--model", required=True, help="the base model's directory (safetensors)")
    parser.add_argument("--out", required=True, help="the merged model directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="floating dtype of the output")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def main(args: argparse.Namespace) -> int:
    out = export_merged(args.adapter, args.model, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
