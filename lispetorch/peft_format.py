"""PEFT's adapter files with no model in sight: file names, tensor keys, ``adapter_config.json`` fields.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``; the tensors are keyed
``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and ``...lora_B.weight`` ``(out, r)``. Per-module ranks
and alphas that differ from the most common ones go to ``rank_pattern`` / ``alpha_pattern``, keyed by a regular
expression that PEFT matches against a dotted suffix of the module name.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch

from . import atomic, validate
from .errors import AdapterFormatError, NonFiniteError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# base_model.model.<module>.lora_A.weight; PEFT in memory also writes .lora_A.<adapter>.weight. A DoRA
# magnitude: base_model.model.<module>.lora_magnitude_vector (in memory .lora_magnitude_vector.<adapter>.weight).
_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.(?:(lora_A|lora_B)(?:\.[^.]+)?\.weight"
                  r"|(lora_magnitude_vector)(?:\.[^.]+\.weight)?)")
MAGNITUDE = "lora_magnitude_vector"


def scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / √r`` for rank-stabilised LoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def peft_key(module: str, which: str) -> str:
    """The PEFT key of a module's factor: ``base_model.model.<module>.lora_A.weight`` (``which``: lora_A, lora_B),
    or of its DoRA magnitude, ``base_model.model.<module>.lora_magnitude_vector``."""
    return f"{PREFIX}{module}.{which}" if which == MAGNITUDE else f"{PREFIX}{module}.{which}.weight"


def parse_key(key: str) -> tuple[str, str] | None:
    """``(module, "lora_A" | "lora_B" | "lora_magnitude_vector")`` of a PEFT LoRA key, with or without prefix and
    adapter name; else None."""
    m = _KEY.fullmatch(key)
    return None if m is None else (m.group(1), m.group(2) or m.group(3))


def exact_targets(modules) -> str:
    """A regular expression that full-matches exactly the module names ``modules``."""
    return "^(" + "|".join(re.escape(m) for m in sorted(modules)) + ")$"


def pattern_value(pattern: dict, name: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that matches the module name or a dotted
    suffix of it (PEFT's rule, matched with RE2 in linear time: :func:`lispetorch.validate.suffix_match`)."""
    for key, value in pattern.items():
        if validate.suffix_match(key, name):
            return value
    return default


def most_common(values: dict):
    """The most common of ``values``' values (the first seen among equals)."""
    return Counter(values.values()).most_common(1)[0][0]


def ranked_fields(ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    """``r``, ``lora_alpha`` (the most common) and ``rank_pattern``/``alpha_pattern`` (the modules that differ,
    keyed by their escaped names) for per-module ranks and alphas."""
    r, alpha = most_common(ranks), most_common(alphas)
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != alpha},
    }


def lora_config(ranks: dict[str, int], alphas: dict[str, float], dropouts: dict[str, float], use_rslora: bool,
                fan_in_fan_out: bool, target_modules: list[str] | str, base_model: str | None = None,
                task_type: str | None = None, use_dora: bool = False) -> dict:
    """The ``adapter_config.json`` PEFT writes for a LoRA with these per-module ranks, alphas and dropouts."""
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model or None,
        "revision": None,
        "inference_mode": True,
        **ranked_fields(ranks, alphas),
        "lora_dropout": most_common(dropouts),
        "target_modules": target_modules,
        "exclude_modules": None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


# --- write ---------------------------------------------------------------------------------------------------
def write_files(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """``adapter_model.safetensors`` (``tensors`` under PEFT keys) and ``adapter_config.json`` (``config``) in
    ``directory``, which the caller writes atomically as a whole (see :func:`write_directory`)."""
    from safetensors.torch import save, save_file

    directory = Path(directory)
    try:
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    except OSError:
        raise
    except Exception:
        # safetensors' own error for a failed write (a full disk) carries no errno: written again through Python,
        # the failure is an OSError that says why (which the atomic writer reports naming the directory)
        with open(directory / WEIGHTS_NAME, "wb") as f:
            f.write(save(tensors, metadata={"format": "pt"}))
    atomic.follow_umask(directory / WEIGHTS_NAME)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def finite_or_raise(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raises NonFiniteError naming ``where`` and the first key whose tensor holds NaN or Inf."""
    for key, t in tensors.items():
        if torch.is_floating_point(t) and not torch.isfinite(t).all():
            raise NonFiniteError(f"{where}: {key} holds {int((~torch.isfinite(t)).sum())} NaN/Inf value(s); "
                                 "nothing is written")


def write_directory(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """:func:`write_files` into ``directory`` as a whole, atomically: a crash leaves the previous one or none.

    Raises:
        NonFiniteError: a tensor holds NaN or Inf (nothing is written).
        WriteError: the directory cannot be written (a full disk): names it; the previous one is unchanged.
    """
    directory = Path(directory)
    finite_or_raise(tensors, str(directory))
    with atomic.directory(directory) as tmp:
        write_files(tmp, tensors, config)
    return directory


# --- read ----------------------------------------------------------------------------------------------------
def read_config(directory: str | os.PathLike) -> dict:
    """Reads ``adapter_config.json``; errors name the file (and the line, for JSON syntax)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterFormatError(f"{path}: missing (an adapter directory needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise AdapterFormatError(f"{path}: not UTF-8 text ({e})") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise AdapterFormatError(f"{path}: not valid JSON ({validate.show(str(e))})") from None
    except RecursionError:
        raise AdapterFormatError(f"{path}: nested too deeply to be read as JSON") from None
    return check_config(config, path)


MAX_RANK = 1 << 20
MAX_ALPHA = 1e6  # a scaling numerator beyond this overflows the factors' products in half precision


def check_config(config, path: str | os.PathLike) -> dict:
    """``config`` (an ``adapter_config.json``'s content) if every field this project reads holds a value of its
    type and range: ``r`` and ``rank_pattern`` values positive integers; ``lora_alpha`` and ``alpha_pattern``
    values finite, > 0 and ≤ :data:`MAX_ALPHA`; ``lora_dropout`` in [0, 1); ``use_rslora``, ``fan_in_fan_out``
    and ``use_dora`` true or false (a string such as ``"false"`` is refused); pattern keys regular expressions
    that RE2 compiles in PEFT's anchoring. Null stands for a field's default.

    Raises:
        AdapterFormatError: the first field that does not, naming the file, the key and the value.
    """
    src, E = str(path), AdapterFormatError
    if not isinstance(config, dict):
        raise E(f"{path}: expected a JSON object, got {validate.type_name(config)}")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise E(f"{path}: peft_type is {validate.show(peft_type)}; only LORA adapters can be loaded")
    for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if config.get(key) is not None:
            validate.boolean(config[key], key, src, error=E)
    if "r" in config:
        validate.integer(config["r"], "r", src, 1, MAX_RANK, error=E)
    if "lora_alpha" in config:
        validate.number(config["lora_alpha"], "lora_alpha", src, 0.0, MAX_ALPHA, lo_open=True, error=E)
    if config.get("lora_dropout") is not None:
        validate.number(config["lora_dropout"], "lora_dropout", src, 0.0, 1.0, hi_open=True, error=E)
    target = config.get("target_modules")
    if target is not None and not isinstance(target, str) and \
            not (isinstance(target, list) and all(isinstance(t, str) for t in target)):
        raise E(f"{path}: 'target_modules' must be a list of names or a regular expression, got "
                f"{validate.show(target)} ({validate.type_name(target)})")
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise E(f"{path}: '{field}' must be a mapping pattern -> value, got {validate.show(pattern)} "
                    f"({validate.type_name(pattern)})")
        for key, value in pattern.items():
            validate.compile_pattern(key, field, src, E, form=validate.PEFT_PATTERN)
            label = f"{field}[{validate.show(key)}]"
            if field == "rank_pattern":
                validate.integer(value, label, src, 1, MAX_RANK, error=E)
            else:
                validate.number(value, label, src, 0.0, MAX_ALPHA, lo_open=True, error=E)
    return config


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads the adapter tensors (safetensors; a legacy ``.bin`` with ``weights_only``); errors name the file."""
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if path.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
            raise AdapterFormatError(f"{path}: not a readable safetensors file ({e})") from None
    legacy = directory / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterFormatError(f"{legacy}: not a readable weights file ({e})") from None
    raise AdapterFormatError(f"{path}: missing (an adapter directory needs {CONFIG_NAME} and {WEIGHTS_NAME})")


def module_ranks(config: dict, module: str, found_rank: int) -> tuple[int, float]:
    """The rank and alpha ``config`` gives ``module`` (its patterns, else ``r``/``lora_alpha``; PEFT's defaults
    of the found rank and 8 where absent)."""
    rank = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", found_rank))
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return rank, float(alpha)
