"""LoRA on MoE experts: lispetorch's expert adapters (one native call over the routed tokens per projection)
against PEFT's ``target_parameters`` (its ParamWrapper adds the delta of every expert to the weight stack at every
forward) and against the experts without an adapter, side by side in one process.

One Mixtral sparse-MoE block (hidden 512, expert intermediate 1024, 8 experts, top-2, float32) from a fixed seed,
both expert weights adapted (``gate_up_proj``, ``down_proj``, r=16, random B); the same adapter in both systems
(saved by lispetorch, loaded by PEFT; outputs checked equal first). Input: 1024 tokens. Timed, in turns:

- inference (``no_grad``): the block's forward;
- training: forward + backward to the adapter factors (and the input, as inside a model).

Ratios: lispetorch / PEFT, and each against the block without an adapter (transformers' own forward, its default
experts implementation).

    python benchmarks/bench_experts.py            # full
    python benchmarks/bench_experts.py --quick    # 256 tokens, 3 repetitions
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

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
TARGETS = ["gate_up_proj", "down_proj"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args(argv)
    tokens = 256 if args.quick else 1024
    reps = args.reps or (3 if args.quick else 15)
    cfg = transformers.MixtralConfig(hidden_size=512, intermediate_size=1024, num_local_experts=8,
                                     num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=8,
                                     num_key_value_heads=8, vocab_size=128)
    print(f"torch {torch.__version__}, peft {peft.__version__}; threads {torch.get_num_threads()}; Mixtral MoE block "
          f"(hidden 512, experts 8 x 1024, top-2), {tokens} tokens, r 16 on gate_up_proj and down_proj; "
          f"{reps} repetitions", flush=True)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).float()
    block = model.model.layers[0].mlp.eval()  # MixtralSparseMoeBlock: router + experts
    wrapper = torch.nn.Module()
    wrapper.mlp = block
    frozen = copy.deepcopy(wrapper)
    for p in frozen.parameters():
        p.requires_grad_(False)
    ours = copy.deepcopy(wrapper)
    lt.inject(ours, lt.LoraConfig(r=16, alpha=32, target_modules=[], target_parameters=TARGETS))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in lt.adapter_layers(ours).values():
            for B in layer.lora_B["default"].values():
                B.copy_(torch.randn(B.shape, generator=g) * 0.01)
    with tempfile.TemporaryDirectory() as d:
        lt.save_adapter(ours, Path(d))
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(wrapper), d, is_trainable=True)
    for m in (frozen, ours, theirs):
        m.eval()
    x = torch.randn(1, tokens, 512, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_ours, y_peft = ours.mlp(x), theirs.base_model.model.mlp(x)
    y_ours = y_ours[0] if isinstance(y_ours, tuple) else y_ours
    y_peft = y_peft[0] if isinstance(y_peft, tuple) else y_peft
    diff = (y_ours - y_peft).abs().max().item()
    print(f"outputs: lispetorch vs PEFT max |diff| {diff:.2e}")
    if diff > 1e-4:
        print("outputs differ: not timing", file=sys.stderr)
        return 1
    blocks = {"frozen": frozen.mlp, "lispetorch": ours.mlp, "PEFT": theirs.base_model.model.mlp}

    def infer(b):
        def run():
            with torch.no_grad():
                b(x)
        return run

    def train(b):
        def run():
            xi = x.clone().requires_grad_(True)
            out = b(xi)
            out = out[0] if isinstance(out, tuple) else out
            out.square().mean().backward()
            for p in b.parameters():
                p.grad = None
        return run

    results = {}
    for what, make in (("inference", infer), ("training step", train)):
        t = medians({k: make(b) for k, b in blocks.items()}, warmup=2, reps=reps)
        results[what] = t
    print()
    print("| | no adapter (ms) | lispetorch (ms) | PEFT (ms) | lispetorch / PEFT | lispetorch / no adapter | "
          "PEFT / no adapter |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for what, t in results.items():
        f, o, p = t["frozen"] * 1e3, t["lispetorch"] * 1e3, t["PEFT"] * 1e3
        print(f"| {what} | {f:.2f} | {o:.2f} | {p:.2f} | {o / p:.2f}× | {o / f:.2f}× | {p / f:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
