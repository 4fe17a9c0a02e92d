"""The SVD-family methods against plain LoRA, side by side in one process, on one small Llama model (CPU, float32).

One base ``LlamaForCausalLM`` (hidden 512, intermediate 1376, 4 layers, 8 heads, vocabulary 32000, SDPA
attention) is built from a fixed seed; every model measured is a ``copy.deepcopy`` of it, adapted on all linear
layers but the head: LoRA (r=16, alpha=32), PiSSA init (r=16), LoRA-GA init (r=16, one calibration batch),
Rotational PiSSA way0–way3 (r=16), TinyLoRA (r=2, u=32) and LoRA over an NF4-quantised base (r=16). Inputs
are random token ids (batch 4 x 128, fixed seed); labels are the inputs.

For each method:

1. Trainable parameters (``lt.trainable_parameters``), and their ratio to LoRA's.
2. Training step: forward + backward + ``torch.optim.AdamW`` step over the trainable parameters, in train
   mode, no dropout. After two warm-up steps each, all methods take turns (A B C ... A B C ...) for ``--reps``
   repetitions; medians are compared to LoRA's (ratio method / LoRA).
3. Bytes saved for backward: during one train-mode forward, ``torch.autograd.graph.saved_tensors_hooks``
   records every tensor autograd saves, each storage once, parameters left out (``bench_lora.saved_bytes``);
   the adapter's share is saved(model) − saved(frozen base), compared to LoRA's.

And NF4 memory: the bytes of the adapted linear weights stored in NF4 (codes + absmax, plain and double
quantised) against the same weights in bf16, from the buffers' sizes.

    python benchmarks/bench_methods.py            # full benchmark
    python benchmarks/bench_methods.py --quick    # smoke test: 2 layers, batch 2 x 32, 2 repetitions
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import alternate, build_base, log, markdown, ratio, saved_bytes, train_step  # noqa: E402

import lispetorch as lt  # noqa: E402

RANK, ALPHA = 16, 32


def methods(ids: torch.Tensor) -> dict:
    """name → function adapting a copy of the base in place."""
    def lora_nf4(model):
        lt.quantize_nf4(model)
        lt.inject(model, lt.LoraConfig(r=RANK, alpha=ALPHA, target_modules="all-linear"))

    out = {
        "LoRA": lambda m: lt.inject(m, lt.LoraConfig(r=RANK, alpha=ALPHA, target_modules="all-linear")),
        "PiSSA": lambda m: lt.inject(m, lt.LoraConfig(r=RANK, alpha=ALPHA, init="pissa_niter_4",
                                                      target_modules="all-linear")),
        "LoRA-GA": lambda m: lt.inject(m, lt.LoraConfig(r=RANK, alpha=ALPHA, init="lora_ga",
                                                        target_modules="all-linear"), calibration_batches=[ids]),
    }
    for way in ("way0", "way1", "way2", "way3"):
        out[f"Rotational PiSSA {way}"] = (lambda w: lambda m: lt.inject(m, lt.RotationalPiSSAConfig(
            r=RANK, lora_alpha=ALPHA, method=w, target_modules="all-linear")))(way)
    out["TinyLoRA (r=2, u=32)"] = lambda m: lt.inject(m, lt.TinyLoraConfig(r=2, u=32))
    out["LoRA on NF4 base"] = lora_nf4
    return out


def nf4_memory(base: torch.nn.Module) -> list[list[str]]:
    weights = [m.weight for m in lt.match_modules(base, "all-linear").values()]
    bf16 = sum(w.numel() * 2 for w in weights)
    rows = [["bf16", f"{bf16 / 2**20:.2f}", "1.000"]]
    for label, double in (("NF4", False), ("NF4 + double quantisation", True)):
        nbytes = sum(lt.nf4.NF4Weight(w, double_quant=double).nbytes() for w in weights)
        rows.append([label, f"{nbytes / 2**20:.2f}", f"{ratio(nbytes, bf16):.3f}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, batch 2 x 32, 2 repetitions")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per method (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the Markdown tables to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    layers, batch, seq = (2, 2, 32) if args.quick else (4, 4, 128)
    reps = args.reps or (2 if args.quick else 10)
    base = build_base(layers, args.seed)
    ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(args.seed))
    frozen = copy.deepcopy(base)
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen_saved = saved_bytes(frozen, ids)
    models, steps, counts, saved = {}, [], {}, {}
    for name, adapt in methods(ids).items():
        log(f"adapting: {name}")
        model = copy.deepcopy(base)
        adapt(model)
        models[name] = model
        params = lt.trainable_parameters(model)
        counts[name] = sum(p.numel() for p in params)
        saved[name] = saved_bytes(model, ids) - frozen_saved
        steps.append(train_step(model, params, ids))
    log(f"timing {len(steps)} methods, {reps} repetitions each, interleaved")
    times = alternate(*steps, warmup=2, reps=reps)
    medians = {name: statistics.median(t) for name, t in zip(models, times, strict=True)}
    rows = []
    for name in models:
        rows.append([
            name, f"{counts[name]:,}", f"{ratio(counts[name], counts['LoRA']):.4f}",
            f"{medians[name] * 1e3:.1f}", f"{ratio(medians[name], medians['LoRA']):.2f}",
            f"{saved[name] / 2**20:.2f}", f"{ratio(saved[name], saved['LoRA']):.2f}",
        ])
    header = ["method", "trainable params", "÷ LoRA", "step ms (median)", "step ÷ LoRA",
              "adapter saved-for-backward MiB", "saved ÷ LoRA"]
    setting = (f"Llama hidden 512, {layers} layers, all-linear targets, batch {batch} x {seq}, float32, CPU "
               f"({torch.get_num_threads()} threads), {reps} interleaved repetitions")
    text = f"{setting}\n\n{markdown(header, rows)}\n\nNF4 memory of the adapted linear weights:\n\n" + \
        markdown(["storage", "MiB", "÷ bf16"], nf4_memory(base)) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
