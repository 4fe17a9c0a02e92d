"""``lispetorch train CONFIG.yaml [--resume]``."""

from __future__ import annotations

from .engine import Trainer


def configure(parser) -> None:
    parser.add_argument("config", help="a YAML training config (the LispeTorch guide's keys; see docs/training.md)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in output_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    trainer = Trainer(args.config, progress=not args.no_progress)
    try:
        result = trainer.train(resume=args.resume)
    except KeyboardInterrupt:
        saved = f"checkpoints in {trainer.output_dir}; continue with --resume" if trainer.config.save_steps else \
            "no checkpoint was written (save_steps is 0)"
        print(f"\ninterrupted at step {trainer.global_step}: {saved}")
        raise
    parts = [f"{result.global_step} steps", f"train loss {result.train_loss:.4f}"]
    if result.initial_eval_loss is not None:
        parts.append(f"validation loss {result.initial_eval_loss:.4f} -> {result.eval_loss:.4f}")
    elif result.eval_loss is not None:
        parts.append(f"validation loss {result.eval_loss:.4f}")
    parts.append(f"{result.tokens_per_second:.0f} tokens/s")
    print("done: " + ", ".join(parts))
    print(f"adapter: {result.adapter_dir}")
    return 0
