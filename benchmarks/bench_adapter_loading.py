"""Loading many adapters onto one model, lispetorch against PEFT, side by side in one process (CPU, float32).

One small ``LlamaForCausalLM`` (hidden 512, intermediate 1376, 8 layers; ``--quick``: hidden 128, 2 layers) is
built from a fixed seed and saved; 50 PEFT LoRA adapter directories (r=16, all linear layers, random B) are
written once. Then, on one lispetorch model and one PEFT model, the adapters are loaded one after another under
new names (``lt.load_adapter(model, dir, name)``; PEFT: ``PeftModel.from_pretrained`` for the first,
``model.load_adapter(dir, adapter_name=name)`` for the others), the two sides alternating adapter by adapter, each
load timed with ``time.perf_counter``. Reported: the time of the 1st, 10th, 25th and 50th load of each side (the
median of the loads around it, ±2), the ratio of the last to the first (flat is 1), and lispetorch / PEFT at each
point. The adapter loaded last is checked to give the same logits on both sides.

    python benchmarks/bench_adapter_loading.py
    python benchmarks/bench_adapter_loading.py --quick     # hidden 128, 2 layers, 20 adapters
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import peft
import torch
import transformers

import lispetorch as lt

warnings.filterwarnings("ignore", category=FutureWarning)


def build(quick: bool, directory: Path, n: int) -> tuple[Path, list[Path]]:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=128 if quick else 512, intermediate_size=344 if quick else 1376,
        num_hidden_layers=2 if quick else 8, num_attention_heads=4 if quick else 8, num_key_value_heads=4 if quick
        else 8, vocab_size=1000 if quick else 32000, max_position_embeddings=256)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model_dir = directory / "model"
    model.save_pretrained(model_dir)
    adapters = []
    pm = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                    init_lora_weights=False))
    for i in range(n):
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        d = directory / f"adapter{i}"
        pm.save_pretrained(d)
        adapters.append(d)
    return model_dir, adapters


def load_model(model_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def around(times: list[float], i: int) -> float:
    return statistics.median(times[max(0, i - 2):i + 3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--adapters", type=int, default=None)
    args = parser.parse_args()
    n = args.adapters or (20 if args.quick else 50)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, adapters = build(args.quick, Path(tmp), n)
        ours = load_model(model_dir)
        theirs = None
        t_ours, t_theirs = [], []
        for i, d in enumerate(adapters):
            name = f"a{i}"
            gc.collect()
            t0 = time.perf_counter()
            lt.load_adapter(ours, d, name)
            t_ours.append(time.perf_counter() - t0)
            gc.collect()
            if theirs is None:
                base = load_model(model_dir)
                t0 = time.perf_counter()
                theirs = peft.PeftModel.from_pretrained(base, d, adapter_name=name)
            else:
                t0 = time.perf_counter()
                theirs.load_adapter(d, adapter_name=name)
            t_theirs.append(time.perf_counter() - t0)
        theirs.set_adapter(f"a{n - 1}")
        lt.set_adapter(ours, f"a{n - 1}")
        ids = torch.randint(0, ours.config.vocab_size, (1, 16))
        with torch.no_grad():
            diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
        if diff > 1e-4:
            raise RuntimeError(f"the last adapter gives different logits: max diff {diff:.2e}")
    points = sorted({0, min(9, n - 1), min(24, n - 1), n - 1})
    print(f"loading {n} adapters one after another (max |logits diff| of the last: {diff:.1e})\n")
    print("| load # | lispetorch (ms) | PEFT (ms) | lispetorch / PEFT |")
    print("| --- | --- | --- | --- |")
    for i in points:
        a, b = around(t_ours, i) * 1e3, around(t_theirs, i) * 1e3
        print(f"| {i + 1} | {a:.2f} | {b:.2f} | {a / b:.2f} |")
    lo, lp = around(t_ours, n - 1) / around(t_ours, 0), around(t_theirs, n - 1) / around(t_theirs, 0)
    below = all(around(t_ours, i) < around(t_theirs, i) for i in range(n))
    print(f"\nlast / first: lispetorch {lo:.2f} (goal ≤ 1.2: {'met' if lo <= 1.2 else 'not met'}), PEFT {lp:.2f}; "
          f"lispetorch below PEFT at every load: {'met' if below else 'not met'}")


if __name__ == "__main__":
    main()
