"""``torch.compile`` with adapters: lispetorch compiled against lispetorch eager and PEFT compiled, side by side.

One ``LlamaForCausalLM`` (hidden 512, intermediate 1376, 4 layers, 8 heads, vocabulary 32000, float32) is built
from a fixed seed; lispetorch and PEFT adapt q,k,v,o with r=16, alpha=32 on copies of it, PEFT holding
lispetorch's factors (the logits are checked equal before timing). Each model is compiled with
``torch.compile(fullgraph=True)`` (inductor) for training (forward + backward + AdamW step, dropout 0.05 on the
adapters' input) and, separately, for inference (eval mode, ``no_grad``). After the timed runs, the adapter is
switched (a second adapter loaded beside the first, activated and back), disabled and enabled, and its weights
hot-swapped from a file; the recompiles this causes are counted from ``torch._dynamo``'s counters
(``stats.unique_graphs``) before and after. PEFT fullgraph may fail to compile; that is reported, not hidden.

Times: warm-up (compilation included) excluded, then the models take turns for ``--reps`` repetitions, medians
compared (ratio compiled / eager and lispetorch / PEFT).

    python benchmarks/bench_compile.py            # full benchmark
    python benchmarks/bench_compile.py --quick    # smoke test: 1 layer, batch 2 x 32, 2 repetitions
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings

import peft
import torch
import torch._dynamo
import transformers
from timing import alternate

import lispetorch as lt

RANK, ALPHA, DROPOUT, LR = 16, 32, 0.05, 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def build(layers: int, seed: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=layers,
                                      num_attention_heads=8, num_key_value_heads=8, vocab_size=32000,
                                      max_position_embeddings=512, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).float()


def adapted(base: torch.nn.Module, seed: int) -> tuple[torch.nn.Module, peft.PeftModel]:
    ours = copy.deepcopy(base)
    torch.manual_seed(seed)
    lt.inject(ours, lt.LoraConfig(r=RANK, alpha=ALPHA, dropout=DROPOUT, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in lt.adapter_layers(ours).values():
            layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=g) * 0.01)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                                       target_modules=TARGETS))
    inner = theirs.get_base_model()
    with torch.no_grad():
        for name, layer in lt.adapter_layers(ours).items():
            inner.get_submodule(name).lora_A["default"].weight.copy_(layer.lora_A["default"])
            inner.get_submodule(name).lora_B["default"].weight.copy_(layer.lora_B["default"])
    return ours, theirs


def train_step(model, compiled, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        compiled(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
    return step


def infer(compiled, ids):
    def run():
        with torch.no_grad():
            compiled(input_ids=ids, use_cache=False)
    return run


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 layer, batch 2 x 32, 2 repetitions")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    layers, batch, seq = (1, 2, 32) if args.quick else (4, 4, 128)
    reps = args.reps or (2 if args.quick else 10)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; threads "
          f"{torch.get_num_threads()}; Llama hidden 512, {layers} layers, batch {batch} x {seq}; q,k,v,o r {RANK}, "
          f"dropout {DROPOUT}; {reps} repetitions", flush=True)
    base = build(layers, args.seed)
    ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(args.seed))
    ours, theirs = adapted(base, args.seed)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    print(f"max |logits lispetorch - PEFT| = {diff:.2e}", flush=True)
    rows = []
    for mode in ("train", "inference"):
        torch._dynamo.reset()
        models = {"lispetorch eager": ours, "lispetorch compiled": ours, "PEFT eager": theirs,
                  "PEFT compiled": theirs}
        fns, failed = {}, {}
        for label, model in models.items():
            model.train(mode == "train")
            runner = torch.compile(model, fullgraph=True) if "compiled" in label else model
            fn = train_step(model, runner, ids) if mode == "train" else infer(runner, ids)
            try:
                t0 = time.perf_counter()
                fn()  # compiles here
                print(f"{mode}: {label} first call {time.perf_counter() - t0:.1f} s", flush=True)
                fns[label] = fn
            except Exception as e:  # PEFT's fullgraph may break: reported in the table
                failed[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
                print(f"{mode}: {label} failed: {failed[label]}", flush=True)
        times = alternate(fns, warmup=1, reps=reps)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k in models:
            rows.append([mode, k, f"{med[k] * 1e3:.1f}" if k in med else f"failed ({failed[k]})"])
        if "lispetorch compiled" in med:
            rows.append([mode, "lispetorch compiled / eager",
                         f"{med['lispetorch compiled'] / med['lispetorch eager']:.3f}"])
        if "lispetorch compiled" in med and "PEFT compiled" in med:
            rows.append([mode, "lispetorch compiled / PEFT compiled",
                         f"{med['lispetorch compiled'] / med['PEFT compiled']:.3f}"])

    # recompiles caused by adapter changes, inference mode
    torch._dynamo.reset()
    ours.eval()
    compiled = torch.compile(ours, fullgraph=True)
    run = infer(compiled, ids)
    run()
    before = graphs()
    with tempfile.TemporaryDirectory() as d:
        lt.save_adapter(ours, d)
        lt.load_adapter(ours, d, adapter_name="second")
        lt.set_adapter(ours, "second")
        run()
        lt.set_adapter(ours, "default")
        run()
        with lt.disabled(ours):
            run()
        run()
        lt.hotswap_adapter(ours, d)
        run()
    rows.append(["adapter changes", "recompiles (switch, disable/enable, hotswap)", str(graphs() - before)])
    print("\n| mode | what | ms per step (median) / ratio / count |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
