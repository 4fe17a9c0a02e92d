"""Mixed-adapter batches: one batch of 8 samples over 4 adapters, lispetorch's grouped call against PEFT's
mixed-batch inference and against running the 4 sub-batches one adapter at a time, side by side in one process.

One ``LlamaForCausalLM`` (hidden 512, intermediate 1376, 4 layers, 8 heads, vocabulary 32000, float32) is built
from a fixed seed; 4 LoRA adapters (r=16, q,k,v,o, random B) are saved as PEFT directories and loaded into a
lispetorch copy and a PEFT copy (the mixed outputs are checked equal first). Timed, in turns:

- inference (eval, ``no_grad``): lispetorch ``model(ids, adapter_names=…)``; PEFT ``model(ids, adapter_names=…)``;
  lispetorch sub-batches (``set_adapter`` then forward, per adapter, outputs put back in order);
- training (forward + backward of the 4 adapters together, lispetorch only; PEFT's mixed batches do not train):
  the mixed batch against the 4 sub-batches' forwards + backwards.

    python benchmarks/bench_mixed_batches.py            # full
    python benchmarks/bench_mixed_batches.py --quick    # 1 layer, sequences of 16, 3 repetitions
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from pathlib import Path

import peft
import torch
import transformers
from timing import medians

import lispetorch as lt

ADAPTERS = ["t0", "t1", "t2", "t3"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args(argv)
    layers, seq = (1, 16) if args.quick else (4, 128)
    reps = args.reps or (3 if args.quick else 15)
    print(f"torch {torch.__version__}, peft {peft.__version__}; threads {torch.get_num_threads()}; Llama hidden 512, "
          f"{layers} layers; batch 8 x {seq} over {len(ADAPTERS)} adapters (r 16, q,k,v,o); {reps} repetitions",
          flush=True)
    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=8, vocab_size=32000,
                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).float().eval()
    ids = torch.randint(0, 32000, (8, seq), generator=torch.Generator().manual_seed(1))
    names = [ADAPTERS[i % 4] for i in range(8)]
    with tempfile.TemporaryDirectory() as d:
        g = torch.Generator().manual_seed(2)
        for name in ADAPTERS:
            one = copy.deepcopy(base)
            lt.inject(one, lt.LoraConfig(r=16, alpha=32, target_modules=TARGETS))
            with torch.no_grad():
                for layer in lt.adapter_layers(one).values():
                    layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=g) * 0.01)
            lt.save_adapter(one, Path(d) / name)
        ours = copy.deepcopy(base)
        for name in ADAPTERS:
            lt.load_adapter(ours, Path(d) / name, adapter_name=name)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), Path(d) / ADAPTERS[0], adapter_name=ADAPTERS[0])
        for name in ADAPTERS[1:]:
            theirs.load_adapter(Path(d) / name, adapter_name=name)
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        diff = (ours(input_ids=ids, adapter_names=names).logits
                - theirs(input_ids=ids, adapter_names=names).logits).abs().max().item()
    print(f"max |logits lispetorch - PEFT| on the mixed batch = {diff:.2e}", flush=True)
    rows_of = {n: [i for i, m in enumerate(names) if m == n] for n in ADAPTERS}

    def ours_mixed():
        with torch.no_grad():
            ours(input_ids=ids, adapter_names=names)

    def peft_mixed():
        with torch.no_grad():
            theirs(input_ids=ids, adapter_names=names)

    def ours_sub():
        out = torch.empty(8, seq, cfg.vocab_size)
        with torch.no_grad():
            for n, rows in rows_of.items():
                lt.set_adapter(ours, n)
                out[rows] = ours(input_ids=ids[rows]).logits

    t = medians({"lispetorch mixed": ours_mixed, "PEFT mixed": peft_mixed, "lispetorch sub-batches": ours_sub},
                  warmup=1, reps=reps)
    ours.train()
    lt.set_trainable_adapters(ours, ADAPTERS)

    def train_mixed():
        ours.zero_grad(set_to_none=True)
        ours(input_ids=ids, labels=ids, adapter_names=names).loss.backward()

    def train_sub():
        ours.zero_grad(set_to_none=True)
        for n, rows in rows_of.items():
            lt.set_adapter(ours, n)
            lt.set_trainable_adapters(ours, ADAPTERS)
            (ours(input_ids=ids[rows], labels=ids[rows]).loss / 4).backward()

    tt = medians({"mixed": train_mixed, "sub-batches": train_sub}, warmup=1, reps=reps)
    print("\n| what | ms (median) | ratio |\n|---|---|---|")
    print(f"| inference, lispetorch mixed batch | {t['lispetorch mixed'] * 1e3:.1f} | — |")
    print(f"| inference, PEFT mixed batch | {t['PEFT mixed'] * 1e3:.1f} | lispetorch / PEFT "
          f"{t['lispetorch mixed'] / t['PEFT mixed']:.3f} |")
    print(f"| inference, lispetorch 4 sub-batches | {t['lispetorch sub-batches'] * 1e3:.1f} | mixed / sub-batches "
          f"{t['lispetorch mixed'] / t['lispetorch sub-batches']:.3f} |")
    print(f"| training step (forward + backward), mixed batch | {tt['mixed'] * 1e3:.1f} | — |")
    print(f"| training step, 4 sub-batches | {tt['sub-batches'] * 1e3:.1f} | mixed / sub-batches "
          f"{tt['mixed'] / tt['sub-batches']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
