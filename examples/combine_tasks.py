"""The checkpoint optimizer's experiment at small scale, on the embedded default model.

Three task adapters are trained on code-completion tasks cut from the Python standard library's own source —
``singleline`` (finish a line), ``multiline`` (continue a function for a few lines) and ``annotated`` (functions
that carry comments or docstrings, learned whole) — and a fourth, ``concatenationTrained``, on the three data
sets together. The optimizer then finds the convex combination of the three task adapters closest to the fourth
(Frobenius norm of the weight deltas, summed over modules), builds it as a PEFT adapter (exact ``cat`` mode),
and every adapter's held-out loss on each task is reported.

    python examples/combine_tasks.py [--steps 80] [--out runs/combine] [--model DIR]
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lispetorch as lt
from lispetorch import combine, default_model
from lispetorch.train import data as data_mod
from lispetorch.train.engine import loss_sum

TASKS = ("singleline", "multiline", "annotated")
TARGET = "concatenationTrained"
MODULES = ["argparse.py", "textwrap.py", "string.py", "functools.py", "dataclasses.py", "shlex.py", "heapq.py",
           "bisect.py", "fnmatch.py", "glob.py", "json/encoder.py", "json/decoder.py", "csv.py", "base64.py",
           "calendar.py", "difflib.py", "pprint.py", "statistics.py", "fractions.py", "ipaddress.py"]


def functions() -> list[str]:
    """Source of every function in the listed standard-library modules, in file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in MODULES:
        source = (root / name).read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                segment = ast.get_source_segment(source, node)
                if segment and 4 <= segment.count("\n") <= 60:
                    out.append(segment)
    return out


def task_records(funcs: list[str], rng: random.Random) -> dict[str, list[dict]]:
    tasks: dict[str, list[dict]] = {t: [] for t in TASKS}
    for src in funcs:
        lines = src.split("\n")
        long = [i for i, line in enumerate(lines[1:], 1) if len(line.strip()) >= 24]
        if long:
            i = rng.choice(long)
            cut = len(lines[i]) // 2
            tasks["singleline"].append({"instruction": "Complete the line.",
                                        "input": "\n".join(lines[max(0, i - 6):i] + [lines[i][:cut]]),
                                        "response": lines[i][cut:]})
        if len(lines) >= 6:
            k = rng.randint(1, min(4, len(lines) - 5))
            tasks["multiline"].append({"instruction": "Continue the code.", "input": "\n".join(lines[:k]),
                                       "response": "\n".join(lines[k:k + 5])})
        if '"""' in src or "#" in src:
            tasks["annotated"].append({"text": src})
    return tasks


def split(records: list[dict], rng: random.Random, held_out: float = 0.15) -> tuple[list[dict], list[dict]]:
    records = records[:]
    rng.shuffle(records)
    n = max(1, int(len(records) * held_out))
    return records[n:], records[:n]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@torch.no_grad()
def held_out_loss(model, tokenizer, records: list[dict], seq_len: int) -> float:
    """Mean next-token loss over the learned tokens (responses; whole text for plain records)."""
    docs = [data_mod.record_document(r, "held-out") for r in records]
    examples = data_mod.truncate(data_mod.tokenize(tokenizer, [d for d in docs if d], mask_prompt=True), seq_len)
    pad = data_mod.pad_id(tokenizer)
    total, count = 0.0, 0
    for i in range(0, len(examples), 8):
        batch = data_mod.collate(examples[i:i + 8], pad)
        total += loss_sum(model, batch).item()
        count += data_mod.target_tokens(batch)
    return total / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps per adapter")
    parser.add_argument("--out", default="runs/combine", help="where the adapters and results go")
    parser.add_argument("--model", default=None, help="a model directory (default: the embedded default model)")
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model_dir = Path(args.model) if args.model else default_model.ensure()
    out = Path(args.out)
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    tasks = task_records(functions(), rng)
    train, held = {}, {}
    for t in TASKS:
        train[t], held[t] = split(tasks[t], rng)
        print(f"{t}: {len(train[t])} training records, {len(held[t])} held out")
    files = {t: write_jsonl(data_dir / f"{t}.jsonl", train[t]) for t in TASKS}

    checkpoints = {}
    for name in (*TASKS, TARGET):
        run_dir = out / name
        data = [str(files[name])] if name in files else [str(files[t]) for t in TASKS]
        cfg = {"model": str(model_dir), "data": data, "output_dir": str(run_dir), "max_steps": args.steps,
               "batch_size": 4, "gradient_accumulation_steps": 1, "max_seq_length": args.seq, "packing": False,
               "mask_prompt": True, "validation_split": 0.0, "eval_steps": 0, "save_steps": 0,
               "logging_steps": 10, "warmup_steps": args.steps // 10, "learning_rate": 2e-3, "seed": 0,
               "plot": False, "lora": {"rank": 8, "alpha": 16, "dropout": 0.05}}
        if (run_dir / "adapter" / "adapter_model.safetensors").exists():
            print(f"{name}: adapter already trained in {run_dir}")
        else:
            print(f"training {name} ({args.steps} steps)")
            lt.train.train(cfg)
        checkpoints[name] = str(run_dir / "adapter")

    result = combine.optimize(checkpoints, target=TARGET, log=lambda *a: None)
    (out / "optimization_results.json").write_text(json.dumps(result, indent=2) + "\n")
    weights = result["weights"]
    ev = result["evaluation"]
    print("\noptimal convex weights: " + ", ".join(f"{n} {w:.3f}" for n, w in weights.items()))
    print(f"relative error {ev['relative_error']:.4f}, R² {ev['r_squared']:.4f}")
    built = combine.build(checkpoints, result, out / "combined", mode="cat", overwrite=True,
                          log=lambda *a: None)
    print(f"combined adapter (cat, rank {built['rank']}): {built['output_dir']}")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    adapters = {"base model": None, **{n: checkpoints[n] for n in (*TASKS, TARGET)},
                "combined": str(out / "combined")}
    rows = []
    for label, path in adapters.items():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        if path is not None:
            lt.load_adapter(model, path)
        losses = [held_out_loss(model, tokenizer, held[t], args.seq) for t in TASKS]
        rows.append((label, losses, sum(losses) / len(losses)))
    print("\nheld-out loss (nats per learned token)\n")
    print("| adapter | " + " | ".join(TASKS) + " | mean |")
    print("| --- |" + " ---: |" * (len(TASKS) + 1))
    for label, losses, mean in rows:
        print(f"| {label} | " + " | ".join(f"{x:.3f}" for x in losses) + f" | {mean:.3f} |")
    ok = all(math.isfinite(m) for _, _, m in rows)
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
