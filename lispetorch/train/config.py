"""The training configuration: the LispeTorch guide's keys, checked by name and type before anything runs."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from pathlib import Path

from .. import validate, yaml_io
from ..config import CONFIGS, is_init, method_config
from ..errors import ConfigError
from ..hf import DTYPES
from ..schedule import SCHEDULER_TYPES

QUANTIZE_BASE = ("none", "nf4")
FULL = "full"  # lora.method full: full fine-tuning, every parameter trains (the baseline LoRA is measured against)
_NUMBER = "a number"
_INT = "an integer"
_BOOL = "true or false"
_STR = "a string"
_PATHS = "a path or a list of paths"
_NAMES = "a list of module names, a regular expression, or \"all-linear\""


@dataclasses.dataclass
class LoraSection:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | str = dataclasses.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"])
    # "kaiming" (PEFT's default), "gaussian", "pissa", "pissa_niter_K" or "lora_ga" (calibrated on the first
    # calibration_batches training batches)
    init: str = "kaiming"
    calibration_batches: int = 4
    # "lora" (with the init above), "rotational_pissa" or "tinylora" (lispetorch.config.CONFIGS), or "full" (no
    # adapter: every parameter of the model trains, with the same loop, data and schedule); options: the
    # method's own fields (see lispetorch.config.method_config), e.g. {"method": "givens"} or {"u": 64, "seed": 0}
    method: str = "lora"
    options: dict = dataclasses.field(default_factory=dict)
    # PEFT's selection fields, for method lora (lispetorch.LoraConfig): layers, per-module ranks and alphas, and the
    # modules trained whole beside the adapter
    layers_to_transform: int | list[int] | None = None
    layers_pattern: list[str] | None = None
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)
    modules_to_save: list[str] | None = None
    use_dora: bool = False  # DoRA (method lora, any init)
    # with use_dora: backward computes each layer's base product again instead of keeping its output (the memory of
    # LoRA's activations for about one more base product per layer; lispetorch.set_dora_recompute)
    dora_recompute: bool = False
    # expert weights of a mixture-of-experts model, one adapter per expert (PEFT's field; method lora)
    target_parameters: list[str] | None = None

    def check_method_keys(self) -> dict:
        """The keys of method lora given (the target selection and ``use_dora``), refused for another method; the
        selection's keys given, with their values.

        Raises:
            ConfigError: such a key with another method, named.
        """
        selection = {key: getattr(self, key) for key in _SELECTION if getattr(self, key) not in (None, {})}
        if selection and self.method != "lora":
            raise ConfigError(f"'lora.{next(iter(selection))}' applies to method lora, not {self.method}")
        if self.use_dora and self.method != "lora":
            raise ConfigError(f"'lora.use_dora' applies to method lora, not {self.method}")
        return selection

    def adapter_config(self):
        """The adapter config these keys describe (a ``LoraConfig``, ``RotationalPiSSAConfig`` or
        ``TinyLoraConfig``).

        Raises:
            ValueError: an unknown method or option, or a value out of range.
        """
        selection = self.check_method_keys()
        if self.use_dora:
            selection["use_dora"] = True
        if self.method == FULL:
            return None
        if self.method != "lora":
            name, options = self.method, self.options
        elif self.init in ("kaiming", "gaussian"):
            name, options = "lora", {"init": self.init, **self.options}
        else:  # an SVD init is a method of its own there
            name, options = self.init, self.options
        options = {**selection, **options}
        return method_config(name, self.rank, self.alpha, self.target_modules, dropout=self.dropout, **options)


STRATEGIES = ("ddp", "fsdp")


@dataclasses.dataclass
class DistributedSection:
    """How a run spreads over processes (``torchrun``, or ``lispetorch train --nproc N``): ``ddp`` replicates the
    model and all-reduces the adapter's gradients; ``fsdp`` also shards the frozen base weights across the processes
    (FSDP2). ``timeout``: seconds a process waits for the others in one collective before the job stops with a
    message."""

    strategy: str = "ddp"
    timeout: float = 600.0


@dataclasses.dataclass
class TrainConfig:
    """Every key of a training config, with the guide's defaults. ``data`` and ``output_dir`` are required."""

    data: list[str]
    output_dir: str
    model: str | None = None  # a Hugging Face model directory; the embedded default model when None
    learning_rate: float = 2e-4
    weight_decay: float = 0.01
    num_epochs: int = 3
    max_steps: int = 0  # when > 0: this many optimizer steps, whatever num_epochs says
    batch_size: int = 1
    eval_batch_size: int = 0  # 0: batch_size
    gradient_accumulation_steps: int = 4
    max_seq_length: int = 256
    packing: bool = True
    mask_prompt: bool = False
    validation_split: float = 0.1
    logging_steps: int = 10
    save_steps: int = 100  # 0: only the final adapter
    eval_steps: int = 50  # 0: no periodic validation
    warmup_steps: int = 100
    warmup_ratio: float = 0.0  # when > 0: warmup over this share of the total steps (warmup_steps is then unused)
    max_grad_norm: float = 1.0  # 0: no clipping
    scheduler_type: str = "linear_warmup_cosine"
    min_lr: float = 1e-6
    gamma: float = 0.1
    step_size: int = 100
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 42
    report_to: list[str] = dataclasses.field(default_factory=list)  # "tensorboard", "wandb"
    plot: bool = True
    # "nf4": the base model's linear layers (all but the output head) stored in NF4 before the adapter is made,
    # as QLoRA and the TinyLoRA trainer load theirs; "none": as loaded
    quantize_base: str = "none"
    loraplus_lr_ratio: float = 1.0  # LoRA+: B's learning rate is this times learning_rate (A's); 1: plain LoRA
    gradient_checkpointing: bool = False  # transformers' own (non-reentrant): activations recomputed in backward
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    # a task with metrics (lispetorch.tasks.load_task): a shipped task's name, or {kind, train_file, eval_file,
    # verbalizers, max_eval_examples, max_new_tokens}; it replaces data: training on its train_file, validation
    # (loss and the task metric) on its eval_file
    task: dict | str | None = None
    # data-parallel or sharded training over processes ({strategy: ddp | fsdp, timeout: seconds}); a run under
    # torchrun without it is ddp. With it, a run of one process draws its dropout masks per sample as a run of
    # several does (the same adapter whatever the number of processes)
    distributed: DistributedSection | None = None

    # --- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping, source: str = "config") -> TrainConfig:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: the config must be a mapping of keys to values, got {type(raw).__name__}")
        raw = dict(raw)
        if raw.get("task") is not None and raw.get("data") is None:
            raw["data"] = []  # the task's files are the data
        for key in ("data", "output_dir"):
            if key not in raw or raw[key] is None:
                raise ConfigError(f"{source}: missing required key {key!r}")
        values = {}
        for key, value in raw.items():
            if key == "lora":
                values["lora"] = _lora_section(value, source)
                continue
            if key == "distributed":
                values["distributed"] = None if value is None else _distributed_section(value, source)
                continue
            if key == "task":
                if value is not None and not isinstance(value, (str, Mapping)):
                    raise ConfigError(f"{source}: 'task' must be a shipped task's name or a mapping (kind, "
                                      f"train_file, eval_file, ...), got {validate.show(value)} "
                                      f"({validate.type_name(value)})")
                values["task"] = dict(value) if isinstance(value, Mapping) else value
                continue
            if key == "data" and value == []:
                values["data"] = []
                continue
            if key not in _FIELDS:
                raise ConfigError(f"{source}: unknown key {validate.show(key)}{_suggest(key, _FIELDS)}")
            values[key] = _check(key, value, _FIELDS[key], source)
        config = cls(**values)
        config._validate(source)
        return config

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        raw = yaml_io.load(path, ConfigError) or {}
        config = cls.from_dict(raw, str(path))
        # Relative paths in a config file are relative to the file.
        base = path.resolve().parent
        config.data = [str(base / d) if not Path(d).expanduser().is_absolute() else d for d in config.data]
        config.output_dir = str(base / config.output_dir) if not Path(config.output_dir).is_absolute() \
            else config.output_dir
        if isinstance(config.task, dict):  # task files too
            for key in ("train_file", "eval_file"):
                if isinstance(config.task.get(key), str) and not Path(config.task[key]).expanduser().is_absolute():
                    config.task[key] = str(base / config.task[key])
        if config.model is not None and not Path(config.model).is_absolute() and (base / config.model).exists():
            config.model = str(base / config.model)
        return config

    @classmethod
    def load(cls, config: TrainConfig | Mapping | str | os.PathLike) -> TrainConfig:
        """A TrainConfig from itself, a mapping, or a YAML file path."""
        if isinstance(config, TrainConfig):
            return config
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        if isinstance(config, (str, os.PathLike)):
            return cls.from_yaml(config)
        raise ConfigError(f"a training config is a mapping or a YAML path, got {type(config).__name__}")

    def _validate(self, source: str) -> None:
        for key, (lo, hi, *open_) in RANGES.items():
            value = getattr(self, key)
            if isinstance(value, int):
                validate.integer(value, key, source, lo, hi)
            else:
                validate.number(value, key, source, lo, hi, *open_)
        if self.scheduler_type not in SCHEDULER_TYPES:
            raise ConfigError(f"{source}: unknown scheduler_type {validate.show(self.scheduler_type)}; choose one of "
                              f"{', '.join(SCHEDULER_TYPES)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"{source}: 'dtype' must be one of {', '.join(DTYPES)}, got {validate.show(self.dtype)}")
        if self.quantize_base not in QUANTIZE_BASE:
            raise ConfigError(f"{source}: 'quantize_base' must be one of {', '.join(QUANTIZE_BASE)}, got "
                              f"{validate.show(self.quantize_base)}")
        for name in self.report_to:
            if name not in ("tensorboard", "wandb"):
                raise ConfigError(f"{source}: 'report_to' names {validate.show(name)}; choose tensorboard and/or wandb")
        lora = self.lora
        for key, (lo, hi, *open_) in LORA_RANGES.items():
            value = getattr(lora, key)
            if isinstance(value, int):
                validate.integer(value, f"lora.{key}", source, lo, hi)
            else:
                validate.number(value, f"lora.{key}", source, lo, hi, *open_)
        if not is_init(lora.init):
            raise ConfigError(f"{source}: 'lora.init' must be kaiming, gaussian, pissa, pissa_niter_K (K a number "
                              f"of subspace iterations) or lora_ga, got {validate.show(lora.init)}")
        if lora.method not in CONFIGS and lora.method != FULL:
            raise ConfigError(f"{source}: 'lora.method' must be one of {', '.join(CONFIGS)}, got "
                              f"{validate.show(lora.method)} (or {FULL}: full fine-tuning)")
        if lora.method == FULL and self.save_steps > 0:
            raise ConfigError(f"{source}: 'lora.method: full' writes the trained model at the end only (no "
                              f"resumable checkpoints): set 'save_steps: 0', got {self.save_steps}")
        if lora.method == FULL and self.quantize_base != "none":
            raise ConfigError(f"{source}: 'lora.method: full' trains the base weights, which 'quantize_base: "
                              f"{self.quantize_base}' would freeze in NF4")
        if lora.method != "lora" and lora.init != "kaiming":
            raise ConfigError(f"{source}: 'lora.init' ({validate.show(lora.init)}) applies to method lora; method "
                              f"{lora.method} makes its own factors")
        if lora.method == "tinylora" and lora.dropout != 0:
            raise ConfigError(f"{source}: 'lora.dropout' must be 0 for method tinylora (it has no dropout), got "
                              f"{lora.dropout}")
        if lora.dora_recompute and not lora.use_dora:  # a training option, not part of the adapter's config
            raise ConfigError(f"{source}: 'lora.dora_recompute' applies with 'lora.use_dora: true'")
        try:
            lora.check_method_keys()
        except ConfigError as e:  # the message names its key
            raise ConfigError(f"{source}: {e}") from None
        try:
            lora.adapter_config()
        except ValueError as e:
            raise ConfigError(f"{source}: 'lora.options': {e}") from None
        if self.distributed is not None:
            self._validate_distributed(source)
        if self.quantize_base == "nf4" and (lora.method == "rotational_pissa" or lora.init not in ("kaiming",
                                                                                                "gaussian")):
            what = lora.method if lora.method != "lora" else f"init {lora.init}"
            raise ConfigError(f"{source}: 'quantize_base: nf4' needs a method that leaves the base as it is (lora "
                              f"with init kaiming or gaussian, tinylora); {what} takes its init out of the base "
                              "weight (Rotational PiSSA: options {quantize_residual: true} stores that residual in "
                              "NF4)")

    def _validate_distributed(self, source: str) -> None:
        dist = self.distributed
        if dist.strategy not in STRATEGIES:
            raise ConfigError(f"{source}: 'distributed.strategy' must be one of {', '.join(STRATEGIES)}, got "
                              f"{validate.show(dist.strategy)}")
        validate.number(dist.timeout, "distributed.timeout", source, *DISTRIBUTED_RANGES["timeout"])
        if dist.strategy == "fsdp":
            lora = self.lora
            if lora.method != "lora" or lora.init not in ("kaiming", "gaussian") or self.quantize_base != "none":
                what = f"method {lora.method}" if lora.method != "lora" else f"init {lora.init}" \
                    if lora.init not in ("kaiming", "gaussian") else f"quantize_base {self.quantize_base}"
                raise ConfigError(f"{source}: 'distributed.strategy: fsdp' shards a base that stays as it is loaded "
                                  f"and trains a plain LoRA (method lora, init kaiming or gaussian, quantize_base "
                                  f"none); {what} changes or repacks the base: use strategy ddp")

    def check_world_size(self, world_size: int, source: str = "config") -> None:
        """Raises ConfigError when ``world_size`` processes cannot share every global batch
        (``batch_size × gradient_accumulation_steps`` samples) evenly."""
        batch = self.batch_size * self.gradient_accumulation_steps
        if batch % world_size:
            raise ConfigError(f"{source}: the global batch (batch_size {self.batch_size} × "
                              f"gradient_accumulation_steps {self.gradient_accumulation_steps} = {batch} samples) "
                              f"does not divide among {world_size} processes: make it a multiple of {world_size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def training_dict(self) -> dict:
        """The keys other than ``lora`` (what ``training_info.json`` calls ``training_config``)."""
        d = self.to_dict()
        d.pop("lora")
        return d


# The sane range of every numeric key: (lowest, highest[, lowest excluded[, highest excluded]]). A value outside
# (or NaN, or infinite) is refused by name before anything runs: an infinite learning rate or a NaN gamma would
# train to a NaN adapter, a NaN max_grad_norm would turn clipping off.
RANGES: dict[str, tuple] = {
    "learning_rate": (0.0, 10.0, True),
    "weight_decay": (0.0, 100.0),
    "num_epochs": (1, 1_000_000),
    "max_steps": (0, 10**12),
    "batch_size": (1, 1_000_000),
    "eval_batch_size": (0, 1_000_000),
    "gradient_accumulation_steps": (1, 1_000_000),
    "max_seq_length": (1, 10**8),  # and at most the model's positions (checked when the model is loaded)
    "validation_split": (0.0, 1.0, False, True),
    "logging_steps": (0, 10**12),
    "save_steps": (0, 10**12),
    "eval_steps": (0, 10**12),
    "warmup_steps": (0, 10**12),
    "max_grad_norm": (0.0, 1e6),  # 0: no clipping
    "min_lr": (0.0, 10.0),
    "gamma": (0.0, 10.0, True),
    "step_size": (1, 10**12),
    "seed": (0, 2**32 - 1),
    "warmup_ratio": (0.0, 1.0, False, True),
    "loraplus_lr_ratio": (0.0, 1e6, True),
}
DISTRIBUTED_RANGES: dict[str, tuple] = {
    "timeout": (1.0, 7 * 86400.0),
}
LORA_RANGES: dict[str, tuple] = {
    "rank": (1, 1 << 16),
    "alpha": (0.0, 1e6, True),
    "dropout": (0.0, 1.0, False, True),
    "calibration_batches": (1, 1_000_000),
}

# key -> expected kind
_FIELDS: dict[str, str] = {}
for _f in dataclasses.fields(TrainConfig):
    if _f.name in ("lora", "task", "distributed"):
        continue
    _FIELDS[_f.name] = {"data": _PATHS, "report_to": "names", "model": "optional str"}.get(_f.name) or {
        float: _NUMBER, int: _INT, bool: _BOOL, str: _STR, "float": _NUMBER, "int": _INT, "bool": _BOOL,
        "str": _STR}[_f.type]
_MAPPING = "a mapping"
_INDICES = "a layer index or a list of them"
_LORA_FIELDS = {"rank": _INT, "alpha": _NUMBER, "dropout": _NUMBER, "target_modules": _NAMES, "init": _STR,
                "calibration_batches": _INT, "method": _STR, "options": _MAPPING, "layers_to_transform": _INDICES,
                "layers_pattern": "names", "rank_pattern": _MAPPING, "alpha_pattern": _MAPPING,
                "modules_to_save": "names", "use_dora": _BOOL, "dora_recompute": _BOOL, "target_parameters": "names"}
_SELECTION = ("layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "modules_to_save",
              "target_parameters")


def _suggest(key, known) -> str:
    close = difflib.get_close_matches(key[:100], list(known), n=1) if isinstance(key, str) else []
    return f" (did you mean {close[0]!r}?)" if close else f"; the keys are {', '.join(sorted(known))}"


def _check(key: str, value, kind: str, source: str):
    def fail():
        raise ConfigError(f"{source}: {key!r} must be {kind}, got {validate.show(value)} "
                          f"({validate.type_name(value)})")

    if kind == _NUMBER:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                fail()
        return validate.number(value, key, source)  # finite; the key's range is checked with the others'
    if kind == _INT:
        return validate.integer(value, key, source, integral_float=True)
    if kind == _BOOL:
        return validate.boolean(value, key, source)
    if kind == _STR:
        if not isinstance(value, str):
            fail()
        return value
    if kind == "optional str":
        if value is not None and not isinstance(value, (str, os.PathLike)):
            fail()
        return None if value is None else str(value)
    if kind == _PATHS:
        if isinstance(value, (str, os.PathLike)):
            return [str(value)]
        if isinstance(value, list) and value and all(isinstance(v, (str, os.PathLike)) for v in value):
            return [str(v) for v in value]
        fail()
    if kind == "names":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            kind = "a list of names"
            fail()
        return value
    if kind == _INDICES:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            fail()
        return value
    if kind == _MAPPING:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            fail()
        return dict(value)
    if kind == _NAMES:
        if isinstance(value, str):
            if value != "all-linear":
                validate.compile_pattern(value, key, source)  # RE2: a pattern from a file never backtracks
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value
        fail()
    raise AssertionError(kind)


def _lora_section(value, source: str) -> LoraSection:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: 'lora' must be a mapping (rank, alpha, dropout, target_modules), "
                          f"got {validate.type_name(value)}")
    values = {}
    for key, v in value.items():
        if key not in _LORA_FIELDS:
            raise ConfigError(f"{source}: unknown key {validate.show(f'lora.{key}')}{_suggest(key, _LORA_FIELDS)}")
        if key == "target_modules" and v == [] and value.get("target_parameters"):
            values[key] = []  # the expert weights alone
            continue
        values[key] = _check(f"lora.{key}", v, _LORA_FIELDS[key], source)
    return LoraSection(**values)


_DISTRIBUTED_FIELDS = {"strategy": _STR, "timeout": _NUMBER}


def _distributed_section(value, source: str) -> DistributedSection:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: 'distributed' must be a mapping (strategy, timeout), got "
                          f"{validate.show(value)} ({validate.type_name(value)})")
    values = {}
    for key, v in value.items():
        if key not in _DISTRIBUTED_FIELDS:
            raise ConfigError(f"{source}: unknown key {validate.show(f'distributed.{key}')}"
                              f"{_suggest(key, _DISTRIBUTED_FIELDS)}")
        values[key] = _check(f"distributed.{key}", v, _DISTRIBUTED_FIELDS[key], source)
    return DistributedSection(**values)
