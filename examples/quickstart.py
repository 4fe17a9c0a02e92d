"""A tour of the Python API on a small Llama-architecture model built locally.

Builds a model from a config and saves it (no hub needed), adapts q/k/v/o with LoRA, trains a few steps on
real text (this file's own standard library), merges, checks merged == unmerged, saves a PEFT adapter
directory and loads it back.

    python examples/quickstart.py
"""

from __future__ import annotations

import inspect
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lispetorch as lt


def byte_batches(text: str, batch: int, length: int, steps: int, seed: int = 0):
    """Random windows of the text's UTF-8 bytes as token ids (vocabulary 256)."""
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - length - 1, (batch,), generator=g)
        yield torch.stack([data[s : s + length] for s in starts.tolist()])


def main() -> None:
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="lispetorch-quickstart-"))
    config = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=256, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(work / "base")
    model = LlamaForCausalLM.from_pretrained(work / "base")
    print(f"base model: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{lt.memory_usage(model) / 2**20:.1f} MiB")

    cfg = lt.LoraConfig(r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    layers = lt.inject(model, cfg)
    params = lt.trainable_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    print(f"adapted {len(layers)} layers: {sum(p.numel() for p in params):,} trainable parameters "
          f"({100 * sum(p.numel() for p in params) / total:.2f}%)")

    text = inspect.getsource(json) + inspect.getsource(tempfile)
    opt = torch.optim.AdamW(params, lr=2e-3)
    model.train()
    start, losses = time.perf_counter(), []
    for step, ids in enumerate(byte_batches(text, batch=8, length=128, steps=40)):
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {time.perf_counter() - start:.1f} s")

    model.eval()
    ids = next(byte_batches(text, batch=2, length=64, steps=1, seed=1))
    with torch.no_grad():
        unmerged = model(ids).logits
        with lt.disabled(model):
            base = model(ids).logits
        lt.merge(model)
        merged = model(ids).logits
        lt.unmerge(model)
    print(f"max |merged - unmerged| = {(merged - unmerged).abs().max():.2e}; "
          f"adapter effect |adapted - base| = {(unmerged - base).abs().max():.2e}")

    out = lt.save_adapter(model, work / "adapter")
    fresh = LlamaForCausalLM.from_pretrained(work / "base")
    lt.load_adapter(fresh, out)
    fresh.eval()
    with torch.no_grad():
        same = torch.equal(fresh(ids).logits, unmerged)
    print(f"saved {sorted(p.name for p in out.iterdir())} to {out}; reloaded logits identical: {same}")


if __name__ == "__main__":
    main()
