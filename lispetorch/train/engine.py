"""The training loop: AdamW over the adapter, LispE's schedules, accumulation, clipping, validation,
atomic checkpoints with exact resume, a progress bar, metrics, and a plot."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import resource
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .. import analysis, atomic, default_model
from .. import tasks as tasks_mod
from ..adapters import active_adapter, adapter_layers, set_dora_recompute, trainable_parameters
from ..config import RotationalPiSSAConfig, TinyLoraConfig, method_of
from ..devices import resolve_device
from ..dispatch import inject
from ..errors import CheckpointError, ConfigError, NonFiniteError
from ..hf import DTYPES, max_positions
from ..methods import orthogonality_loss, save_tinylora
from ..optim import optimizer_param_groups
from ..peft_format import MAGNITUDE, PREFIX, finite_or_raise, peft_key, write_files
from ..peft_io import export, saved_module_tensors
from ..schedule import make_scheduler
from ..targets import quantize_nf4
from . import data as data_mod
from . import distributed
from .config import FULL, TrainConfig

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
INFO_NAME = "training_info.json"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "training_curves.png"
TINYLORA_NAME = "tiny_lora_v.pt"  # method tinylora: the trained vector (lispetorch.restore_tinylora reads it)
FACTORS_NAME = "adapter_factors.safetensors"  # checkpoints of SVD inits: the trained factors, for resume
CHECKPOINT_FILES = ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                    "rng_state.pth", INFO_NAME)
MANIFEST_NAME = atomic.MANIFEST_NAME  # in every checkpoint, written last: its files' sizes and checksums


def loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the next-token cross-entropies over a collated batch's targets (labels shifted by one, -100
    ignored): divided by :func:`~lispetorch.train.data.target_tokens`, the batch's mean loss."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                                             ignore_index=data_mod.IGNORE_INDEX, reduction="sum")


# --- checkpoints ---------------------------------------------------------------------------------------------
def checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The complete checkpoints under ``output_dir``, oldest first."""
    out = []
    d = Path(output_dir)
    if d.is_dir():
        for p in d.iterdir():
            m = CHECKPOINT_RE.fullmatch(p.name)
            if m and p.is_dir() and all((p / f).is_file() for f in CHECKPOINT_FILES):
                out.append((int(m.group(1)), p))
    return sorted(out)


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every ``checkpoint-N`` directory under ``output_dir``, complete or not, oldest first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in d.iterdir()
                  if (m := CHECKPOINT_RE.fullmatch(p.name)) and p.is_dir())


def check_checkpoint(path: str | os.PathLike) -> str | None:
    """Why the checkpoint ``path`` cannot be resumed from (a file missing, cut short or changed since its manifest
    was written; the manifest missing or malformed), or None when it is intact."""
    path = Path(path)
    why = atomic.check_manifest(path, MANIFEST_NAME)
    if why is None:
        missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
        if missing:
            why = f"{missing[0]} is missing"
    return why


def _save_torch(obj, path: Path) -> None:
    """``torch.save``; a failed write (a full disk) is an ``OSError`` with its errno, not torch's bare
    ``RuntimeError``: torch's own writer does not say why it failed, so the file is written again through a
    Python file, which does (or succeeds)."""
    try:
        torch.save(obj, path)
    except RuntimeError:
        with open(path, "wb") as f:
            torch.save(obj, f)


def _load_torch(path: Path):
    return torch.load(path, weights_only=True, map_location="cpu")


def _read_checkpoint(path: Path) -> dict:
    """Everything resume needs from the checkpoint ``path``, read and checked before anything is changed.

    Raises:
        CheckpointError: the checkpoint is not intact (its manifest says so) or a file does not read back.
    """
    from safetensors.torch import load_file

    why = check_checkpoint(path)
    if why is not None:
        raise CheckpointError(f"{path}: {why}")
    try:
        info = json.loads((path / INFO_NAME).read_text(encoding="utf-8"))
        if not isinstance(info, dict) or type(info.get("global_step")) is not int or \
                type(info.get("epoch")) is not int:
            raise ValueError(f"{INFO_NAME} lacks global_step or epoch")
        factors = path / FACTORS_NAME
        return {
            "info": info,
            "factors": factors.is_file(),
            "weights": load_file(str(factors if factors.is_file() else path / "adapter_model.safetensors")),
            "optimizer": _load_torch(path / "optimizer.pt"),
            "scheduler": _load_torch(path / "scheduler.pt"),
            "rng": _load_torch(path / "rng_state.pth"),
        }
    except Exception as e:  # any reader's own error type (json, safetensors, pickle): the file does not read back
        raise CheckpointError(f"{path}: does not read back ({type(e).__name__}: {e})") from None


def _record(line: str) -> dict | None:
    """A metrics line as a record; None for a blank line or one cut short by a kill (dropped on resume)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    global_step: int
    epoch: int
    train_loss: float  # mean over the last logging window
    eval_loss: float | None  # on the whole validation split, at the end
    initial_eval_loss: float | None  # before the first step (None when resumed or without validation)
    best_loss: float
    tokens: int
    seconds: float
    trainable_parameters: int
    total_parameters: int
    task_metrics: dict | None = None  # the task's metrics on its evaluation split, at the end
    initial_task_metrics: dict | None = None  # the same before the first step (None when resumed)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


class Trainer:
    """Trains a LoRA adapter as ``config`` says. ``model``/``tokenizer`` may be given already loaded (the
    config's ``model`` is then only recorded); otherwise they are loaded from ``config.model`` or the embedded
    default model.

    ``on_step(trainer)`` is called after every optimizer step (and its logging, validation and checkpoint).
    """

    def __init__(self, config: TrainConfig | dict | str | os.PathLike, model=None, tokenizer=None,
                 progress: bool = True, on_step: Callable[[Trainer], None] | None = None):
        self.config = TrainConfig.load(config)
        self.source = str(config) if isinstance(config, (str, os.PathLike)) else "config"  # for messages
        self.device = resolve_device(self.config.device)
        self.progress = progress
        self.on_step = on_step
        self.model, self.tokenizer = model, tokenizer
        self.output_dir = Path(self.config.output_dir)
        self.global_step = 0
        self.epoch = 0
        self.best_loss = math.inf
        self._resumed_loss: float | None = None  # the train loss recorded in the checkpoint resumed from
        # this process's place in a job of several (or a run of one keyed as one), None for a plain run
        self.world: distributed.World | None = None

    # --- setup -----------------------------------------------------------------------------------------------
    def _setup(self, resume: bool = False) -> None:
        cfg = self.config
        self.world, self.device = distributed.start(cfg, self.device, self.source)
        # bad files are reported before any model is loaded
        self.task = tasks_mod.load_task(cfg.task) if cfg.task is not None else None
        docs = data_mod.read_documents(cfg.data) if self.task is None or cfg.data else []
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise ConfigError(f"output_dir {self.output_dir} exists and is not a directory")
        if not resume and checkpoints(self.output_dir):
            # Starting over would mix this run's checkpoints with an earlier run's, and a later resume could
            # pick the wrong one: nothing of the earlier run is overwritten.
            raise ConfigError(f"output_dir {self.output_dir} holds checkpoints of an earlier run: resume it "
                              "(resume=True, --resume) or choose another output_dir")
        model_path = cfg.model
        if self.model is None or self.tokenizer is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if model_path is None:
                model_path = str(default_model.ensure(progress=self.progress))
            elif not Path(model_path).is_dir():
                raise ConfigError(f"model {model_path!r} is not a directory (a Hugging Face model directory "
                                  "with config.json and weights)")
            if self.tokenizer is None:
                self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            if self.model is None:
                self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[cfg.dtype])
        self.model_path = model_path
        positions = max_positions(self.model)
        if positions is not None and cfg.max_seq_length > positions[1]:
            key, n = positions
            raise ConfigError(f"'max_seq_length' is {cfg.max_seq_length}, above the model's maximum number of "
                              f"positions ({key} = {n} in {model_path or 'the model'}'s config): set max_seq_length "
                              f"≤ {n}")
        if self.task is not None:  # the task's prompts and answers, the answers learned; validation on its eval split
            split = {s: data_mod.truncate(data_mod.tokenize(self.tokenizer, [data_mod.Document(*d) for d in
                                                                             self.task.documents(s)], True),
                                          cfg.max_seq_length) for s in ("train", "eval")}
            self.dataset = data_mod.Dataset(split["train"], split["eval"], len(self.task.train))
        else:
            self.dataset = data_mod.load_dataset(None, self.tokenizer, cfg.max_seq_length, packing=cfg.packing,
                                                 mask_prompt=cfg.mask_prompt, validation_split=cfg.validation_split,
                                                 seed=cfg.seed, documents=docs)
        self.pad_id = data_mod.pad_id(self.tokenizer)
        self.model.to(self.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        lora = cfg.lora
        self.lora_config = lora.adapter_config()
        # A LoRA with a plain init trains and saves its factors as they are; every other method (SVD inits,
        # Rotational PiSSA, TinyLoRA) changes the base or computes its core, and is saved as its plain-LoRA
        # equivalent on the original weights, with its trained parameters beside it for resume.
        # plain: the PEFT adapter file is all resume needs (expert adapters' files are in PEFT's nested layout,
        # so their trained factors are kept by name too)
        self.plain = self.lora_config is None or (method_of(self.lora_config) == "lora"
                                                  and not getattr(self.lora_config, "target_parameters", None))
        # Rotational PiSSA's penalty parametrisation keeps its free r×r cores near orthogonal.
        self.last_ortho_loss = 0.0
        self.orthogonality = isinstance(self.lora_config, RotationalPiSSAConfig) and \
            self.lora_config.rotation == "penalty" and self.lora_config.orthogonality_reg_weight > 0
        if cfg.quantize_base == "nf4":  # the frozen base in NF4 before the adapter is made from it
            quantize_nf4(self.model, "all-linear")
        calibration = None
        self.full = lora.method == FULL
        if self.full:  # full fine-tuning: no adapter, every parameter trains
            self.plain = True
            for p in self.model.parameters():
                p.requires_grad_(True)
            self.params = list(self.model.parameters())
        else:
            if method_of(self.lora_config) == "lora_ga":  # the gradients of the first training batches
                micro = self.dataset.micro_batches(cfg.seed, 0, cfg.batch_size)[:lora.calibration_batches]
                calibration = [self._collate(idx)["input_ids"].to(self.device) for idx in micro]
            inject(self.model, self.lora_config, calibration_batches=calibration)
            if lora.dora_recompute:
                set_dora_recompute(self.model)
            self.params = trainable_parameters(self.model)
        if cfg.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        world = self.world
        if world is not None and world.active:
            distributed.broadcast_parameters(self.params)
            if world.sharded:  # the frozen base in shards; the trained parameters whole in every process
                distributed.shard_base(self.model, self.params, self.device)
        # (keyed dropout: one seed per sample and adapted layer, see distributed.sample_seed)
        self._keyed_layers = [] if world is None or self.full else list(adapter_layers(self.model).values())
        trained = {id(p) for p in self.params}
        self.frozen = [p for p in self.model.parameters() if id(p) not in trained]
        self.base_checksum = self._checksum()
        schedule = {"initial_lr": cfg.learning_rate}
        if cfg.loraplus_lr_ratio != 1.0 and not self.full:
            # LoRA+: B at ratio × learning_rate; each group keeps its own rate under the schedule, whose base is the
            # first group's (at learning_rate)
            groups = optimizer_param_groups(self.model, cfg.learning_rate, cfg.loraplus_lr_ratio, cfg.weight_decay)
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate)
            schedule = {}
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        n_batches = math.ceil(len(self.dataset.train) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(n_batches / cfg.gradient_accumulation_steps)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else self.steps_per_epoch * cfg.num_epochs
        self.warmup_steps = math.ceil(cfg.warmup_ratio * self.total_steps) if cfg.warmup_ratio > 0 else \
            cfg.warmup_steps
        self.scheduler = make_scheduler(self.optimizer, cfg.scheduler_type, {
            **schedule, "min_lr": cfg.min_lr, "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps, "gamma": cfg.gamma, "step_size": cfg.step_size})

    def _enable_gradient_checkpointing(self) -> None:
        """transformers' gradient checkpointing, non-reentrant: each decoder layer's activations are recomputed in
        backward (with the RNG state of the forward, so an adapter's dropout draws the same mask again)."""
        if not getattr(self.model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"gradient_checkpointing: the model ({type(self.model).__name__}) does not support "
                              "transformers' gradient checkpointing")
        self.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": True})
        if getattr(self.model.config, "use_cache", False):
            self.model.config.use_cache = False  # a cache is of no use in training, and checkpointing refuses it

    # --- one step --------------------------------------------------------------------------------------------
    def _collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return data_mod.collate([self.dataset.train[j] for j in indices], self.pad_id)

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_sum(self.model, {k: v.to(self.device) for k, v in batch.items()})

    def accumulate(self, batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
        """Backward over the micro-batches of one optimizer step; returns (mean loss, target tokens).

        Each micro-batch's summed loss is divided by the targets of all of them, so the accumulated gradient is
        exactly the gradient of the mean loss over one batch made of all the micro-batches.
        """
        total = sum(data_mod.target_tokens(b) for b in batches)
        loss_sum = 0.0
        for b in batches:
            loss = self._loss_sum(b)
            (loss / max(total, 1)).backward()
            loss_sum += loss.item()
        if self.orthogonality:  # once per optimizer step, with the weight the adapter was made with
            ortho = orthogonality_loss(self.model)
            ortho.backward()
            self.last_ortho_loss = float(ortho.detach())
        return loss_sum / max(total, 1), total

    def _micro_shares(self, samples: list[int]) -> list[tuple[list[int], bool]]:
        """This process's micro-batches of ``samples`` (its contiguous share, cut into ``batch_size``), each with
        whether it counts; sharded, a process with fewer than another runs uncounted ones, so that every process
        takes part in every gather."""
        world, size = self.world, self.config.batch_size
        mine = distributed.share(samples, world.rank, world.size)
        micro = [(mine[i:i + size], True) for i in range(0, len(mine), size)]
        if world.sharded:
            rounds = max(math.ceil(len(distributed.share(samples, r, world.size)) / size) for r in range(world.size))
            micro += [(samples[:1], False)] * (rounds - len(micro))
        return micro

    def accumulate_share(self, window: list[list[int]]) -> tuple[float, int]:
        """One optimizer step's backward in a job of several processes (or a run of one keyed as one): over this
        process's share of the global window, each micro-batch's summed loss divided by the target tokens of the
        whole window, then the gradients summed over the processes. Returns (the window's mean loss, its tokens).
        """
        samples = [j for indices in window for j in indices]
        train = self.dataset.train
        total = sum(int((train[j].labels[1:] != data_mod.IGNORE_INDEX).sum()) for j in samples)
        tokens = sum(train[j].input_ids.numel() for j in samples)
        loss_sum = 0.0
        try:
            for indices, counted in self._micro_shares(samples):
                self._key_dropout(indices)
                loss = self._loss_sum(self._collate(indices))
                if counted:
                    (loss / max(total, 1)).backward()
                    loss_sum += loss.item()
                else:
                    (loss * 0.0).backward()
        finally:
            for layer in self._keyed_layers:
                layer.dropout_seeds = None
        if self.world.active:
            (loss_sum,) = distributed.all_reduce_gradients(self.params, [loss_sum])
        if self.orthogonality:  # once per optimizer step, in every process alike
            ortho = orthogonality_loss(self.model)
            ortho.backward()
            self.last_ortho_loss = float(ortho.detach())
        return loss_sum / max(total, 1), tokens

    def _key_dropout(self, indices: list[int]) -> None:
        """Gives every adapted layer one dropout seed per sample of the next micro-batch, keyed on (seed, step,
        sample index, layer index)."""
        seed, step = self.config.seed, self.global_step
        for k, layer in enumerate(self._keyed_layers):
            layer.dropout_seeds = [distributed.sample_seed(seed, step, j, k) for j in indices]

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean next-token loss over the whole validation split (None when there is none)."""
        if not self.dataset.validation:
            return None
        was_training = self.model.training
        self.model.eval()
        size = self.config.eval_batch_size or self.config.batch_size
        total, count = 0.0, 0
        val = self.dataset.validation
        world = self.world
        if world is None or not world.active:
            for i in range(0, len(val), size):
                batch = data_mod.collate(val[i:i + size], self.pad_id)
                total += self._loss_sum(batch).item()
                count += data_mod.target_tokens(batch)
        else:  # each process its share, the sums all-reduced (sharded: every process as many forwards)
            mine = distributed.share(val, world.rank, world.size)
            rounds = max(math.ceil(len(distributed.share(val, r, world.size)) / size) for r in range(world.size)) \
                if world.sharded else math.ceil(len(mine) / size)
            for i in range(rounds):
                part = mine[i * size:(i + 1) * size]
                batch = data_mod.collate(part or val[:1], self.pad_id)
                loss = self._loss_sum(batch).item()
                if part:
                    total += loss
                    count += data_mod.target_tokens(batch)
            total, count = distributed.all_reduce_sums([total, count], self.device)
        self.model.train(was_training)
        return total / max(count, 1)

    # --- divergence ------------------------------------------------------------------------------------------
    def _name_of(self, param: torch.Tensor) -> str:
        if not hasattr(self, "_param_names"):
            self._param_names = {id(p): n for n, p in self.model.named_parameters()}
        return self._param_names.get(id(param), "a trained parameter")

    def _diverged(self, what: str) -> NonFiniteError:
        return NonFiniteError(f"step {self.global_step + 1}: {what}; training stopped, and nothing of this step is "
                              f"written (checkpoints before it in {self.output_dir} are intact; a lower "
                              "learning_rate or max_grad_norm may help)")

    def _check_finite_step(self, loss: float) -> None:
        """Raises NonFiniteError naming the step when the loss or a gradient of the step about to be taken is NaN
        or infinite: the run stops there, before the optimizer applies it."""
        if not math.isfinite(loss):
            raise self._diverged(f"the training loss is {loss}")
        grads = [p for p in self.params if p.grad is not None]
        if grads:
            finite = torch.stack([torch.isfinite(p.grad).all() for p in grads])
            if not bool(finite.all()):
                p = grads[int((~finite).nonzero()[0, 0])]
                n = int((~torch.isfinite(p.grad)).sum())
                raise self._diverged(f"the gradient of {self._name_of(p)} holds {n} NaN/Inf value(s) (loss {loss:.6g})")

    def _check_finite_parameters(self, lr: float) -> None:
        """Raises NonFiniteError naming the step and the parameter when the optimizer step made one non-finite."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.params])
        if not bool(finite.all()):
            p = self.params[int((~finite).nonzero()[0, 0])]
            n = int((~torch.isfinite(p)).sum())
            raise self._diverged(f"the update (learning rate {lr:.6g}) made {n} value(s) of {self._name_of(p)} "
                                 "NaN/Inf")

    def evaluate_task(self) -> dict | None:
        """The task's metrics on its evaluation split (None without a task)."""
        if self.task is None:
            return None
        metrics = self.task.evaluate(self.model, self.tokenizer)
        self.last_task_metrics = metrics
        return metrics

    def _eval_record(self, ev: float) -> dict:
        """The validation record: loss, perplexity and, with a task, its metrics (``eval_accuracy``, ...)."""
        record = {"step": self.global_step, "eval_loss": ev, "eval_perplexity": math.exp(min(ev, 700.0))}
        metrics = self.evaluate_task()
        if metrics is not None:
            record.update({f"eval_{k}": v for k, v in metrics.items() if k != "total"})
        return record

    # --- the metrics of every logging step: adapter, rank, efficiency, verification ------------------------------
    @torch.no_grad()
    def _checksum(self) -> float:
        """A checksum of the frozen parameters: the sum of Σw and Σ|w| over them, in float64."""
        total = torch.zeros((), dtype=torch.float64)
        for p in self.frozen:  # (a sharded weight's sums are gathered: every process computes them at once)
            if p.is_floating_point():
                d = p.detach().double()
                total += distributed.full(d.sum() + d.abs().sum()).cpu()
            else:
                total += distributed.full(p.detach().double().sum()).cpu()
        return float(total)

    def namespaced_metrics(self, n_train: int, n_total: int) -> dict:
        """``lora_adapters/*`` (factor norms, ‖ΔW‖ per module type and overall), ``lora_rank/*`` (effective rank and
        utilisation, mean and per module type), ``efficiency/*`` (trainable parameters and share) and
        ``verification/*`` (frozen parameters with a gradient; the frozen weights' checksum and whether it is
        unchanged since the start)."""
        out: dict[str, float] = {}
        if not self.full and adapter_layers(self.model):
            summary = analysis.analyze(self.model).summary
            out["lora_adapters/delta_norm"] = summary["delta_norm"]
            out["lora_rank/effective_rank"] = summary["effective_rank"]
            out["lora_rank/utilisation"] = summary["utilisation"]
            for kind, row in summary["by_kind"].items():
                for key in ("A_norm", "B_norm", "delta_norm"):
                    out[f"lora_adapters/{key}/{kind}"] = row[key]
                out[f"lora_rank/effective_rank/{kind}"] = row["effective_rank"]
                out[f"lora_rank/utilisation/{kind}"] = row["utilisation"]
        out["efficiency/trainable_parameters"] = n_train
        out["efficiency/total_parameters"] = n_total
        out["efficiency/trainable_share"] = n_train / max(n_total, 1)
        out["verification/base_params_with_grad"] = sum(1 for p in self.frozen if p.requires_grad or p.grad is not None)
        checksum = self._checksum()
        out["verification/base_checksum"] = checksum
        out["verification/base_unchanged"] = float(checksum == self.base_checksum)
        return out

    def _peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    # --- checkpoints -----------------------------------------------------------------------------------------
    def _info(self, train_loss: float | None) -> dict:
        lora = dataclasses.asdict(self.config.lora)
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_loss": None if math.isinf(self.best_loss) else self.best_loss,
            "current_lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "total_steps": self.total_steps,
            "model": self.model_path,
            "lora_config": lora,
            "training_config": self.config.training_dict(),
        }

    def _write_adapter(self, directory: Path) -> None:
        """The final adapter as a PEFT LoRA on the original base weights: as trained for a plain init; for every
        other method its plain-LoRA equivalent (rank 2r where the base is a residual: PiSSA, LoRA-GA, Rotational
        PiSSA; rank r for TinyLoRA, whose base is untouched)."""
        if self.full:  # full fine-tuning: the whole model, as a Hugging Face model directory
            self.model.save_pretrained(directory)
            self.tokenizer.save_pretrained(directory)
            return
        tensors, config = export(self.model, original_weights=not self.plain)
        finite_or_raise(tensors, f"step {self.global_step}: the trained adapter")
        config["base_model_name_or_path"] = self.model_path
        write_files(directory, tensors, config)
        if isinstance(self.lora_config, TinyLoraConfig):  # the trained vector in TinyLoRA's own file too
            save_tinylora(self.model, directory / TINYLORA_NAME, model_id=self.model_path)

    def save_checkpoint(self, train_loss: float | None) -> Path:
        """``output_dir/checkpoint-N``: adapter (PEFT layout), optimizer, scheduler, RNG, training_info.json, and
        last ``manifest.json`` (every file's size and SHA-256); written into a temporary directory and renamed, so
        it is complete or absent, and a file damaged later is found on resume.

        Raises:
            NonFiniteError: the adapter holds NaN or Inf (nothing is written).
            WriteError: the disk is full or the directory cannot be written (names it; nothing is left).
        """
        path = self.output_dir / f"checkpoint-{self.global_step}"
        if not self.writes:  # rank 0 of a job writes it
            return path
        with atomic.directory(path) as tmp:
            self._write_adapter(tmp)
            if not self.plain:
                # What resume needs: the trained parameters themselves, by their names in the model (the adapter
                # files hold their plain-LoRA equivalent on the original weights; the residual base, the frozen
                # factors and TinyLoRA's projections are rebuilt by the same init).
                from safetensors.torch import save_file

                save_file({n: p.detach().contiguous() for n, p in self._trained()}, str(tmp / FACTORS_NAME),
                          metadata={"format": "pt"})
                atomic.follow_umask(tmp / FACTORS_NAME)
            _save_torch(self.optimizer.state_dict(), tmp / "optimizer.pt")
            _save_torch(self.scheduler.state_dict(), tmp / "scheduler.pt")
            _save_torch(_rng_state(), tmp / "rng_state.pth")
            (tmp / INFO_NAME).write_text(json.dumps(self._info(train_loss), indent=2) + "\n")
            atomic.write_manifest(tmp, MANIFEST_NAME)  # last: a checkpoint with a matching manifest is complete
        return path

    def _trained(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters that train, by their names in the model (a shared one once)."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _resume(self) -> int:
        """Loads the newest intact checkpoint; a damaged one is skipped with a warning naming it and why.

        Raises:
            CheckpointError: checkpoints are there but none is intact (names the directory and each one's fault).
            ConfigError: the checkpoint adapts other modules or shapes than this config.
        """
        found = checkpoint_dirs(self.output_dir)
        if not found:
            warnings.warn(f"no complete checkpoint in {self.output_dir}: starting from the beginning", stacklevel=3)
            return 0
        skipped = []
        for step, path in reversed(found):
            try:
                state = _read_checkpoint(path)
            except CheckpointError as e:
                skipped.append(str(e))
                warnings.warn(f"skipping checkpoint {e}", stacklevel=3)
                continue
            self._apply_checkpoint(step, path, state)
            return step
        raise CheckpointError(f"{self.output_dir}: no intact checkpoint to resume from: " + "; ".join(skipped))

    def _apply_checkpoint(self, step: int, path: Path, state: dict) -> None:
        info, weights = state["info"], state["weights"]
        if state["factors"] and not all(k.startswith(PREFIX) for k in weights):
            params = dict(self._trained())  # the trained parameters by their names in the model
        else:  # PEFT keys: a plain LoRA's adapter, or factors saved so by earlier versions
            params = {peft_key(name, which): getattr(layer, which)[layer.active_adapter]
                      for name, layer in adapter_layers(self.model).items()
                      for which in ("lora_A", "lora_B", MAGNITUDE)
                      if which != MAGNITUDE or layer.active_adapter in layer.lora_magnitude_vector}
            params.update(saved_module_tensors(self.model, active_adapter(self.model)))  # modules_to_save
        if set(params) != set(weights):
            raise ConfigError(f"{path}: the checkpoint adapts other modules than this config "
                              f"({len(weights)} tensors against {len(params)})")
        for key, param in params.items():
            if param.shape != weights[key].shape:
                raise ConfigError(f"{path}: {key} has shape {tuple(weights[key].shape)}, this config makes "
                                  f"{tuple(param.shape)}")
        optimizer_state = self.optimizer.state_dict()
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            self.optimizer.load_state_dict(optimizer_state)
            raise CheckpointError(f"{path}: its optimizer, scheduler or random state does not fit this run "
                                  f"({type(e).__name__}: {e})") from None
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(weights[key])
        self.global_step = info["global_step"]
        self.epoch = info["epoch"]
        self.best_loss = math.inf if info.get("best_loss") is None else info["best_loss"]
        self._trim_metrics(step)
        self._resumed_loss = info.get("train_loss")

    # --- metrics ---------------------------------------------------------------------------------------------
    def _trim_metrics(self, step: int) -> None:
        if not self.writes:
            return
        path = self.output_dir / METRICS_NAME
        if path.exists():
            keep = [line for line in path.read_text(errors="replace").splitlines()
                    if (record := _record(line)) is not None and record.get("step", 0) <= step]
            atomic.write_text(path, "".join(line + "\n" for line in keep))

    def _log(self, record: dict) -> None:
        if not self.writes:
            return
        with open(self.output_dir / METRICS_NAME, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        for writer in self._writers:
            writer(record)

    def _open_writers(self) -> list[Callable[[dict], None]]:
        writers = []
        if not self.writes:
            return writers
        if "tensorboard" in self.config.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("report_to names tensorboard, which is not installed: metrics go to "
                              f"{METRICS_NAME} only", stacklevel=3)
            else:
                tb = SummaryWriter(str(self.output_dir / "runs"))
                self._closers.append(tb.close)
                writers.append(lambda r: [tb.add_scalar(k, v, r["step"]) for k, v in r.items()
                                          if k != "step" and isinstance(v, (int, float))])
        if "wandb" in self.config.report_to:
            try:
                import wandb
            except ImportError:
                warnings.warn(f"report_to names wandb, which is not installed: metrics go to {METRICS_NAME} only",
                              stacklevel=3)
            else:
                run = wandb.init(config=self.config.to_dict(), dir=str(self.output_dir))
                self._closers.append(run.finish)
                writers.append(lambda r: run.log({k: v for k, v in r.items() if k != "step"}, step=r["step"]))
        return writers

    def plot(self) -> Path | None:
        """Loss (train and validation) and learning rate against the step, as a PNG in output_dir."""
        path = self.output_dir / METRICS_NAME
        if not path.exists():
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        lr = [(r["step"], r["lr"]) for r in records if "lr" in r]
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        if train:
            ax1.plot(*zip(*train, strict=True), label="train")
        if val:
            ax1.plot(*zip(*val, strict=True), "o-", label="validation")
        ax1.set_ylabel("loss")
        ax1.legend()
        ax1.grid(alpha=0.3)
        if lr:
            ax2.plot(*zip(*lr, strict=True))
        ax2.set_ylabel("learning rate")
        ax2.set_xlabel("optimizer step")
        ax2.grid(alpha=0.3)
        fig.tight_layout()
        out = self.output_dir / PLOT_NAME
        tmp = out.with_name(f".{out.name}.tmp")
        fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        os.replace(tmp, out)
        return out

    # --- the loop --------------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> TrainResult:
        """Runs to ``max_steps`` (or ``num_epochs``); with ``resume`` continues from the newest complete
        checkpoint in ``output_dir`` and ends with the same adapter as an uninterrupted run.

        In a job of several processes (``torchrun``), every process calls it; rank 0 alone writes. A process that
        fails makes the others stop with its message (:class:`~lispetorch.train.distributed.DistributedError`).
        """
        try:
            return self._train(resume)
        except BaseException as e:
            other = distributed.on_failure(self.world, e)
            if other is not None:
                raise other from e
            raise

    @property
    def writes(self) -> bool:
        """Whether this process writes logs, checkpoints and the adapter (rank 0 of a job; a run of one)."""
        return self.world is None or self.world.main

    def _train(self, resume: bool) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.config
        self._setup(resume)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        start_step = self._resume() if resume else 0
        if self.world is not None and self.world.active:
            distributed.agree(start_step, "the checkpoint to resume from (its step)", self.device)
        if not resume:
            self._trim_metrics(0)
        self._closers: list[Callable[[], None]] = []
        self._writers = self._open_writers()
        n_train = sum(p.numel() for p in self.params)
        n_total = sum(p.numel() for p in self.model.parameters())
        initial_eval = None
        self.last_task_metrics: dict | None = None
        initial_task = None
        if start_step == 0 and cfg.eval_steps > 0:
            initial_eval = self.evaluate()
            if initial_eval is not None:
                self._log(self._eval_record(initial_eval))
                initial_task = self.last_task_metrics
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=start_step, desc="training", disable=not (self.progress and
                                                                                             self.writes),
                   dynamic_ncols=True, unit="step")
        accum = cfg.gradient_accumulation_steps
        tokens_total, started = 0, time.perf_counter()
        window_loss, window_tokens, window_steps, window_start = 0.0, 0, 0, time.perf_counter()
        window_ortho = 0.0
        last_loss = float("nan") if self._resumed_loss is None else self._resumed_loss
        evaluated: tuple[int, float | None] | None = None  # (step, validation loss) of the latest validation
        try:
            while self.global_step < self.total_steps:
                micro = self.dataset.micro_batches(cfg.seed, self.epoch, cfg.batch_size)
                windows = [micro[i:i + accum] for i in range(0, len(micro), accum)]
                done_in_epoch = self.global_step - self.epoch * self.steps_per_epoch
                for window in windows[done_in_epoch:]:
                    if self.world is None:
                        batches = [self._collate(idx) for idx in window]
                        step_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
                        loss, _ = self.accumulate(batches)
                    else:
                        loss, step_tokens = self.accumulate_share(window)
                    self._check_finite_step(loss)
                    if self.orthogonality:
                        window_ortho += self.last_ortho_loss
                    grad_norm = None
                    if cfg.max_grad_norm > 0:
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.optimizer.step()
                    self._check_finite_parameters(lr)
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.global_step += 1
                    tokens_total += step_tokens
                    window_loss += loss
                    window_tokens += step_tokens
                    window_steps += 1
                    elapsed = time.perf_counter() - window_start
                    bar.update(1)
                    rate = window_tokens / max(elapsed, 1e-9)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
                    if cfg.logging_steps > 0 and self.global_step % cfg.logging_steps == 0 \
                            or self.global_step == self.total_steps:
                        last_loss = window_loss / window_steps
                        record = {"step": self.global_step, "epoch": self.epoch, "loss": last_loss, "lr": lr,
                                  "tokens_per_second": rate}
                        if grad_norm is not None:
                            record["grad_norm"] = grad_norm
                        record.update(self.namespaced_metrics(n_train, n_total))
                        record.update({"training_efficiency/tokens_per_second": rate,
                                       "training_efficiency/step_time_s": elapsed / window_steps,
                                       "training_efficiency/peak_memory_mb": self._peak_memory_mb()})
                        if self.orthogonality:  # way0: the task loss, the penalty and the loss minimised
                            ortho = window_ortho / window_steps
                            record.update(task_loss=last_loss, ortho_loss=ortho, total_loss=last_loss + ortho)
                            window_ortho = 0.0
                        self._log(record)
                        window_loss, window_tokens, window_steps, window_start = 0.0, 0, 0, time.perf_counter()
                    if cfg.eval_steps > 0 and self.global_step % cfg.eval_steps == 0:
                        ev = self.evaluate()
                        evaluated = (self.global_step, ev)
                        if ev is not None:
                            self.best_loss = min(self.best_loss, ev)
                            self._log(self._eval_record(ev))
                    if not self.dataset.validation:
                        self.best_loss = min(self.best_loss, loss)
                    if cfg.save_steps > 0 and self.global_step % cfg.save_steps == 0:
                        self.save_checkpoint(loss)
                    if self.on_step is not None:
                        self.on_step(self)
                    if self.global_step >= self.total_steps:
                        break
                else:
                    self.epoch += 1
        finally:
            bar.close()
            for close in self._closers:
                close()
        seconds = time.perf_counter() - started
        if evaluated is not None and evaluated[0] == self.global_step:  # validated at this very step already
            final_eval = evaluated[1]
        else:
            final_eval = self.evaluate()
            if final_eval is not None:
                self.best_loss = min(self.best_loss, final_eval)
                self._log(self._eval_record(final_eval))
        adapter_dir = self.output_dir / ("model" if self.full else "adapter")
        if self.writes:
            with atomic.directory(adapter_dir) as tmp:
                self._write_adapter(tmp)
            atomic.write_text(self.output_dir / INFO_NAME, json.dumps(self._info(last_loss), indent=2) + "\n")
            if cfg.plot:
                self.plot()
        distributed.finish(self.world)
        return TrainResult(self.output_dir, adapter_dir, self.global_step, self.epoch, last_loss, final_eval,
                           initial_eval, self.best_loss, tokens_total, seconds, n_train, n_total,
                           self.last_task_metrics, initial_task)


def train(config: TrainConfig | dict | str | os.PathLike, resume: bool = False, model=None, tokenizer=None,
          progress: bool = True) -> TrainResult:
    """Trains a LoRA adapter as ``config`` (a TrainConfig, a mapping, or a YAML path) says."""
    return Trainer(config, model=model, tokenizer=tokenizer, progress=progress).train(resume=resume)
