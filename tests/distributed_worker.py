"""One process of a torchrun job started by tests/test_distributed.py: trains a config with lispetorch's Trainer
and, as its options say, records how much of the base weights it holds, or fails at a step (raises, or is killed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch

import lispetorch as lt
from lispetorch.train import Trainer, distributed


def merge_check(trainer, path: str) -> None:
    """Merges and unmerges the job's adapter while the job runs (every process takes part: the sharded weights are
    gathered), and writes what was seen to ``path``."""
    model = trainer.model
    was_training = model.training
    model.eval()
    ids = torch.arange(16).remainder(200).view(1, 16)
    before = [distributed.local(p).clone() for p in trainer.frozen]
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with lt.disabled(model):
            base = model(input_ids=ids).logits
        lt.merge(model)
        merged = model(input_ids=ids).logits
        lt.unmerge(model)
        again = model(input_ids=ids).logits
    model.train(was_training)
    exact = all(torch.equal(distributed.local(p), b) for p, b in zip(trainer.frozen, before, strict=True))
    Path(path).write_text(json.dumps({
        "merged_vs_adapted": float((merged - adapted).abs().max()), "scale": float(adapted.abs().max()),
        "unmerged_vs_adapted": float((again - adapted).abs().max()), "exact": exact,
        "adapted_vs_base": float((adapted - base).abs().max()),
        "logits": adapted.flatten()[:64].tolist()}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--rank1-config", help="rank 1 reads this config instead")
    parser.add_argument("--shares", help="a directory: each rank writes shares-RANK.json after its first step")
    parser.add_argument("--fail", nargs=3, metavar=("RANK", "STEP", "HOW"), help="HOW: raise or kill")
    parser.add_argument("--merge", help="after training: merge, unmerge, and write what was seen to this JSON file")
    args = parser.parse_args()
    rank = int(os.environ["RANK"])

    def on_step(trainer) -> None:
        if args.shares and trainer.global_step == 1:
            held = sum(distributed.local(p).numel() for p in trainer.frozen)
            whole = sum(p.numel() for p in trainer.frozen)
            Path(args.shares, f"shares-{rank}.json").write_text(json.dumps({"held": held, "whole": whole}))
        if args.merge and trainer.global_step == trainer.config.max_steps:
            merge_check(trainer, f"{args.merge}-{rank}.json")
        if args.fail and rank == int(args.fail[0]) and trainer.global_step == int(args.fail[1]):
            if args.fail[2] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure at step {trainer.global_step}")

    config = args.rank1_config if args.rank1_config and rank == 1 else args.config
    Trainer(config, progress=False, on_step=on_step).train(resume=args.resume)


if __name__ == "__main__":
    main()
