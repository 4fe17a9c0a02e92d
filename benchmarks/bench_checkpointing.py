"""Gradient checkpointing, lispetorch against PEFT, side by side in one process (CPU, float32).

The model, adapters and inputs of ``bench_lora.py`` (a Llama of hidden 512, 8 layers, vocabulary 32000; r=16,
alpha=32, dropout 0.05 on q,k,v,o; the same factors on both sides, checked on the logits; batch 4 x 256;
``--quick``: 2 layers, batch 2 x 64). Each side is measured without and with transformers' gradient
checkpointing (``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``, as
the training engine's ``gradient_checkpointing: true``; PEFT's model gets the same call):

1. saved-for-backward bytes of one train-mode forward (``torch.autograd.graph.saved_tensors_hooks``, each
   storage once, parameters left out: ``bench_lora.saved_bytes``);
2. the time of a training step (forward + backward + AdamW), the four models taking turns, medians.

    python benchmarks/bench_checkpointing.py
    python benchmarks/bench_checkpointing.py --quick
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings

import torch
from bench_lora import (
    MIB,
    alternate,
    build_base,
    hf_model,
    make_lispetorch,
    make_peft,
    markdown,
    max_logit_diff,
    saved_bytes,
    train_step,
)

import lispetorch as lt

warnings.filterwarnings("ignore", category=FutureWarning)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def checkpointed(model: torch.nn.Module) -> torch.nn.Module:
    hf = hf_model(model)
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.config.use_cache = False
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    layers, batch, seq = (2, 2, 64) if args.quick else (8, 4, 256)
    reps = args.reps or (2 if args.quick else 7)
    base = build_base(layers, 0)
    ours = make_lispetorch(base, TARGETS, 0)
    theirs = make_peft(base, TARGETS, 0.05, ours)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    diff = max_logit_diff(ours, theirs, ids[:1])
    if diff > 1e-4:
        raise RuntimeError(f"lispetorch and PEFT differ by {diff:.2e} on the logits")
    models = {
        ("lispetorch", "off"): ours, ("PEFT", "off"): theirs,
        ("lispetorch", "on"): checkpointed(copy.deepcopy(ours)), ("PEFT", "on"): checkpointed(copy.deepcopy(theirs)),
    }
    saved = {k: saved_bytes(m, ids) for k, m in models.items()}
    steps = [train_step(m, lt.trainable_parameters(m), ids) for m in models.values()]
    for m in models.values():
        m.train()
    times = dict(zip(models, alternate(*steps, warmup=1, reps=reps), strict=True))
    med = {k: statistics.median(t) * 1e3 for k, t in times.items()}
    rows = []
    for side in ("lispetorch", "PEFT"):
        off, on = (side, "off"), (side, "on")
        rows.append([side, f"{saved[off] / MIB:.1f}", f"{saved[on] / MIB:.1f}", f"{saved[on] / saved[off]:.2f}",
                     f"{med[off]:.1f}", f"{med[on]:.1f}", f"{med[on] / med[off]:.2f}"])
    rows.append(["lispetorch / PEFT", f"{saved[('lispetorch', 'off')] / saved[('PEFT', 'off')]:.2f}",
                 f"{saved[('lispetorch', 'on')] / saved[('PEFT', 'on')]:.2f}", "",
                 f"{med[('lispetorch', 'off')] / med[('PEFT', 'off')]:.2f}",
                 f"{med[('lispetorch', 'on')] / med[('PEFT', 'on')]:.2f}", ""])
    print(f"gradient checkpointing: {layers} layers, batch {batch} x {seq}, q,k,v,o r=16, dropout 0.05, "
          f"{reps} repetitions (medians){' [quick]' if args.quick else ''}; max |logits diff| {diff:.1e}\n")
    print(markdown(["side", "saved off (MiB)", "saved on (MiB)", "on / off", "step off (ms)", "step on (ms)",
                    "on / off"], rows))


if __name__ == "__main__":
    main()
