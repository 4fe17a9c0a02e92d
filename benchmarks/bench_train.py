"""Training throughput: lispetorch's engine against the same loop written on PEFT, in one process.

Both train a LoRA adapter (r=16, alpha=32, dropout 0.05 on q,k,v,o) on the embedded default model (built on
first use) over the same examples in the same order: real code from the standard library, tokenized with the
model's tokenizer and packed into windows of ``--seq`` tokens, batch ``--batch``, one micro-batch per
optimizer step, AdamW (lr 2e-4, weight decay 0.01), LispE's ``linear_warmup_cosine`` schedule, gradient-norm
clipping at 1.0, float32 on the CPU.

- lispetorch: ``lt.train.Trainer(config).train()``, the engine as users run it (progress bar off, no
  validation and no checkpoints so that both sides do the same work; it logs metrics every 10 steps).
- PEFT: ``peft.get_peft_model`` on its own copy of the base model, and a hand-written loop doing what the
  engine does per step: collate, forward, next-token cross-entropy summed and divided by the target count,
  backward, clip, optimizer step, scheduler step (``LambdaLR`` with the same multiplier), zero grads.

The two are interleaved step by step (the engine's ``on_step`` hook runs one PEFT step), so both see the same
machine load at the same moment; the first step of each is warm-up and not counted. An engine step is the time
between two hooks with the PEFT step taken out. Both process the same batches, so the tokens (non-padding
input tokens) are the same; tokens/s and the median per-step ratio are printed (ratio = lispetorch / PEFT;
above 1 means lispetorch trains faster).

A second table gives the engine's tokens/s by world size: the engine alone (no PEFT beside it), run as a plain
process, then under ``torchrun`` with 1 and 2 processes (``distributed: {strategy: ddp}``; the global batch stays
``--batch``, each process takes its share of it), each in its own processes one after the other. Its step times
are the intervals between optimizer steps on rank 0, the first step not counted.

    python benchmarks/bench_train.py            # 40 steps
    python benchmarks/bench_train.py --quick    # smoke test: 4 steps
    python benchmarks/bench_train.py --world-sizes 1,2,4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import peft
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lispetorch as lt
from lispetorch import default_model
from lispetorch.schedule import make_scheduler
from lispetorch.train import data as data_mod
from lispetorch.train.engine import loss_sum

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MODULES = ["argparse.py", "json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "functools.py",
           "dataclasses.py", "bisect.py", "heapq.py", "shlex.py"]


def corpus_dir(tmp: Path) -> Path:
    src = Path(sysconfig.get_paths()["stdlib"])
    d = tmp / "corpus"
    d.mkdir()
    for name in MODULES:
        (d / name.replace("/", "_")).write_text((src / name).read_text(encoding="utf-8"))
    return d


def engine_config(model_dir: Path, data: Path, out: Path, args) -> dict:
    return {"model": str(model_dir), "data": str(data), "output_dir": str(out), "max_steps": args.steps,
            "batch_size": args.batch, "gradient_accumulation_steps": 1, "max_seq_length": args.seq,
            "validation_split": 0.0, "eval_steps": 0, "save_steps": 0, "logging_steps": 10,
            "warmup_steps": max(1, args.steps // 10), "learning_rate": 2e-4, "weight_decay": 0.01,
            "max_grad_norm": 1.0, "scheduler_type": "linear_warmup_cosine", "min_lr": 1e-6, "seed": 0,
            "plot": False, "lora": {"rank": 16, "alpha": 32, "dropout": 0.05, "target_modules": TARGETS}}


class PeftLoop:
    """The engine's loop, written on PEFT: one call of :meth:`step` is one optimizer step."""

    def __init__(self, model_dir: Path, cfg: dict):
        tc = lt.train.TrainConfig.from_dict(cfg)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.dataset = data_mod.load_dataset(tc.data, tokenizer, tc.max_seq_length, validation_split=0.0,
                                             seed=tc.seed)
        self.pad = data_mod.pad_id(tokenizer)
        torch.manual_seed(tc.seed)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                               target_modules=TARGETS))
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
        self.sched = make_scheduler(self.opt, tc.scheduler_type, {
            "initial_lr": tc.learning_rate, "min_lr": tc.min_lr, "total_steps": tc.max_steps,
            "warmup_steps": tc.warmup_steps})
        self.batches = self.dataset.micro_batches(tc.seed, 0, tc.batch_size)
        self.max_grad_norm = tc.max_grad_norm
        self.n = 0
        self.loss = float("nan")

    def step(self) -> int:
        idx = self.batches[self.n % len(self.batches)]
        self.n += 1
        batch = data_mod.collate([self.dataset.train[j] for j in idx], self.pad)
        n = data_mod.target_tokens(batch)
        loss = loss_sum(self.model, batch)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = loss.item() / n
        return int(batch["attention_mask"].sum())


class Interleave:
    """The engine's ``on_step`` hook: after each engine step, one PEFT step. Engine step times are the
    intervals between hooks with the PEFT step taken out; the first step of each is warm-up, not counted."""

    def __init__(self, loop: PeftLoop):
        self.loop = loop
        self.engine: list[float] = []
        self.peft: list[float] = []
        self.tokens: list[int] = []
        self.last: float | None = None

    def __call__(self, trainer) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.engine.append(now - self.last)
        start = time.perf_counter()
        tokens = self.loop.step()
        elapsed = time.perf_counter() - start
        if self.last is not None:
            self.peft.append(elapsed)
            self.tokens.append(tokens)
        self.last = time.perf_counter()


class StepClock:
    """The engine's ``on_step`` hook timing its steps (the first is warm-up) and counting their input tokens."""

    def __init__(self):
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.last: float | None = None

    def __call__(self, trainer) -> None:
        now = time.perf_counter()
        cfg = trainer.config
        micro = trainer.dataset.micro_batches(cfg.seed, trainer.epoch, cfg.batch_size)
        idx = micro[(trainer.global_step - 1) % len(micro)]
        if self.last is not None:
            self.times.append(now - self.last)
            self.tokens.append(sum(trainer.dataset.train[j].input_ids.numel() for j in idx))
        self.last = time.perf_counter()


def worker(args) -> int:
    """One process of a world-size run in the directory ``args.worker`` (its corpus made there, every process
    training the same config): trains, and rank 0 writes its step times to ``times.json`` there."""
    model_dir = Path(args.model) if args.model else default_model.ensure()
    work = Path(args.worker)
    cfg = engine_config(model_dir, work / "corpus", work / "run", args)
    if "WORLD_SIZE" in os.environ:
        cfg["distributed"] = {"strategy": "ddp"}
    clock = StepClock()
    lt.train.Trainer(cfg, progress=False, on_step=clock).train()
    if int(os.environ.get("RANK", "0")) == 0:
        (work / "times.json").write_text(json.dumps({"tokens": sum(clock.tokens), "seconds": sum(clock.times),
                                                 "median": statistics.median(clock.times)}))
    return 0


def world_size_rows(args, model_dir: Path) -> list[str]:
    """The engine's tokens/s as a plain process and under torchrun at each of ``args.world_sizes``."""
    rows = []
    common = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--model",
              str(model_dir)]
    runs = [("1 (plain process)", [])] + [(f"{n} (torchrun, ddp)", ["-m", "torch.distributed.run", "--standalone",
                                                                    "--nproc-per-node", str(n)])
                                          for n in args.world_sizes]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    for label, launcher in runs:
        with tempfile.TemporaryDirectory() as tmp:
            corpus_dir(Path(tmp))
            subprocess.run([sys.executable, *launcher, __file__, "--worker", tmp, *common], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            r = json.loads((Path(tmp) / "times.json").read_text())
            rows.append(f"| {label} | {r['tokens'] / r['seconds']:.0f} | {1000 * r['median']:.0f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 steps (smoke test)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--model", default=None, help="a model directory (default: the embedded default model)")
    parser.add_argument("--out", default=None, help="also write the Markdown table to this file")
    parser.add_argument("--world-sizes", default="1,2", help="the torchrun process counts of the world-size table "
                        "(comma-separated; each must divide --batch; empty: no such table)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one process of a world-size run
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 4
    if args.worker:
        return worker(args)
    args.world_sizes = [int(n) for n in args.world_sizes.split(",") if n.strip()]
    model_dir = Path(args.model) if args.model else default_model.ensure()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = engine_config(model_dir, corpus_dir(tmp), tmp / "run", args)
        hook = Interleave(PeftLoop(model_dir, cfg))
        trainer = lt.train.Trainer(cfg, progress=False, on_step=hook)
        result = trainer.train()
    tokens = sum(hook.tokens)
    ours, theirs = tokens / sum(hook.engine), tokens / sum(hook.peft)
    step_ratios = [p / e for e, p in zip(hook.engine, hook.peft, strict=True)]
    info = default_model.info(model_dir) if (model_dir / default_model.INFO_NAME).exists() else None
    name = info["spec"]["name"] if info else model_dir.name
    params = f"{info['parameters']:,} parameters, " if info else ""
    ms = lambda xs: f"{1000 * statistics.median(xs):.0f}"  # noqa: E731
    table = "\n".join([
        f"Training throughput on {name} ({params}LoRA r=16 on q,k,v,o, dropout 0.05, batch {args.batch} x "
        f"{args.seq}, {len(hook.engine)} measured steps each, interleaved step by step; torch {torch.__version__}, "
        f"peft {peft.__version__}, {torch.get_num_threads()} threads)",
        "",
        "| system | tokens/s | median step (ms) | final train loss |",
        "| --- | ---: | ---: | ---: |",
        f"| lispetorch engine | {ours:.0f} | {ms(hook.engine)} | {result.train_loss:.4f} |",
        f"| PEFT, same loop | {theirs:.0f} | {ms(hook.peft)} | {hook.loop.loss:.4f} |",
        "",
        f"ratio lispetorch / PEFT: **{ours / theirs:.2f}x** tokens/s (median of the per-step ratios "
        f"{statistics.median(step_ratios):.2f}x)",
    ])
    if args.world_sizes:
        table += "\n\n" + "\n".join([
            f"The engine alone by world size (global batch {args.batch} x {args.seq}, {args.steps - 1} measured "
            f"steps, gloo on the CPU)", "",
            "| processes | tokens/s | median step (ms) |", "| --- | ---: | ---: |", *world_size_rows(args, model_dir)])
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    if not (math.isfinite(result.train_loss) and math.isfinite(hook.loop.loss)):
        print("a loss was not finite", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
