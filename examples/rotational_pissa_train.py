"""Rotational PiSSA on the embedded default model, in the style of LoRA-GA's ``float_llama2-7b_metamath.py``.

Adapts every linear layer with ``RotationalPiSSAConfig`` (U_r, V_r and the residual frozen, the rotations
R_U, R_V and the singular values trained), trains on the standard library's source code, and logs the task
loss, the orthogonality loss (way0's penalty, added to the loss; zero for the exactly orthogonal way1-way3) and
their total. ``--baseline lora_ga`` trains LoRA-GA instead (gradients from ``--sample_size`` calibration
windows). At the end the adapter is merged (outputs checked unchanged) and written as a plain PEFT LoRA on the
original weights.

    python examples/rotational_pissa_train.py --lora_alpha=8 --lora_rank=32 --method=way0 --seed=31
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lispetorch as lt
from lispetorch import default_model


def windows(tokens: torch.Tensor, batch: int, length: int, g: torch.Generator):
    while True:
        starts = torch.randint(0, len(tokens) - length - 1, (batch,), generator=g)
        yield torch.stack([tokens[s : s + length] for s in starts.tolist()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--lora_alpha", type=float, default=16)
    parser.add_argument("--method", choices=lt.methods.ROTATION_METHODS, default="way0")
    parser.add_argument("--orthogonality_reg_weight", type=float, default=1e-3)
    parser.add_argument("--baseline", choices=["none", "lora_ga"], default="none")
    parser.add_argument("--sample_size", type=int, default=8, help="LoRA-GA calibration windows")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=31)
    parser.add_argument("--log_every", type=int, default=5)
    parser.add_argument("--model_dir", default=None, help="a model directory (default: the embedded default model)")
    parser.add_argument("--output_dir", default="out/rotational_pissa")
    args = parser.parse_args(argv)

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    directory = Path(args.model_dir) if args.model_dir else default_model.ensure()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    train_texts, held_out = default_model.read_corpus(400_000)
    tokens = torch.tensor(tokenizer("\n".join(train_texts))["input_ids"], dtype=torch.long)
    held = torch.tensor(tokenizer("\n".join(held_out))["input_ids"], dtype=torch.long)
    g = torch.Generator().manual_seed(args.seed)
    length = min(args.seq, model.config.max_position_embeddings)
    batches = windows(tokens, args.batch, length, g)
    evaluation = list(itertools.islice(windows(held, args.batch, length, torch.Generator().manual_seed(0)), 4))
    probe = evaluation[0]

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = sum(model(b, labels=b).loss.item() for b in evaluation) / len(evaluation)
        model.train()
        return loss

    with torch.no_grad():
        before = model(probe).logits

    if args.baseline == "lora_ga":
        calibration = [next(batches) for _ in range(max(1, args.sample_size // args.batch))]
        config = lt.LoraConfig(r=args.lora_rank, alpha=args.lora_alpha, init="lora_ga", target_modules="all-linear")
        lt.inject(model, config, calibration_batches=calibration)
    else:
        config = lt.RotationalPiSSAConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, method=args.method,
                                          orthogonality_reg_weight=args.orthogonality_reg_weight,
                                          target_modules="all-linear")
        lt.inject(model, config)
    rotational = isinstance(config, lt.RotationalPiSSAConfig)
    params = lt.trainable_parameters(model)
    with torch.no_grad():
        drift = (model(probe).logits - before).abs().max().item()
    print(f"{type(config).__name__}: {sum(p.numel() for p in params):,} trainable parameters; "
          f"max |logit change| at init {drift:.2e}")

    print(f"held-out loss before training: {eval_loss():.4f}")
    opt = torch.optim.AdamW(params, lr=args.lr)
    model.train()
    for step in range(1, args.steps + 1):
        ids = next(batches)
        task_loss = model(ids, labels=ids).loss
        ortho_loss = lt.orthogonality_loss(model) if rotational else task_loss.new_zeros(())
        total_loss = task_loss + ortho_loss
        opt.zero_grad()
        total_loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0 or step == 1:
            print(f"step {step:4d}  task_loss {task_loss.item():.4f}  ortho_loss {ortho_loss.item():.3e}  "
                  f"total_loss {total_loss.item():.4f}  ppl {math.exp(task_loss.item()):.1f}")
    print(f"held-out loss after training: {eval_loss():.4f}")
    model.eval()
    with torch.no_grad():
        unmerged = model(probe).logits
        lt.merge(model)
        merged = model(probe).logits
        lt.unmerge(model)
    print(f"merged vs unmerged: max |diff| {(merged - unmerged).abs().max().item():.2e}")
    out = lt.save_as_lora(model, Path(args.output_dir) / "adapter")
    print(f"wrote a plain PEFT LoRA on the original weights to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
