"""``lispetorch train CONFIG.yaml [--resume] [--nproc N]``; also run by ``torchrun -m lispetorch train``."""

from __future__ import annotations

import subprocess
import sys

from ..errors import ConfigError
from . import distributed
from .engine import Trainer


def configure(parser) -> None:
    parser.add_argument("config", help="a YAML training config (the LispeTorch guide's keys; see docs/training.md)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in output_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="train in N processes on this machine (starts torchrun --nproc-per-node N); for "
                             "several machines run torchrun yourself (see docs/scaling.md)")


def launch_command(args) -> list[str]:
    """The torchrun command that ``--nproc N`` runs: N processes of ``lispetorch train`` on this machine, the
    rendezvous on a free local port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node",
           str(args.nproc), "-m", "lispetorch", "train", str(args.config)]
    return cmd + [flag for flag, on in (("--resume", args.resume), ("--no-progress", args.no_progress)) if on]


def main(args) -> int:
    if args.nproc is not None:
        if args.nproc < 1 or args.nproc > 4096:
            raise ConfigError(f"--nproc must be a number of processes from 1 to 4096, got {args.nproc}")
        if distributed.launched():
            raise ConfigError("--nproc starts torchrun itself: drop it when running under torchrun")
        return subprocess.run(launch_command(args), check=False).returncode
    trainer = Trainer(args.config, progress=not args.no_progress)
    try:
        result = trainer.train(resume=args.resume)
    except distributed.DistributedError as e:  # another process failed: its message, without this one's traceback
        print(f"lispetorch train: rank {trainer.world.rank}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        saved = f"checkpoints in {trainer.output_dir}; continue with --resume" if trainer.config.save_steps else \
            "no checkpoint was written (save_steps is 0)"
        print(f"\ninterrupted at step {trainer.global_step}: {saved}")
        raise
    if not trainer.writes:
        return 0
    parts = [f"{result.global_step} steps", f"train loss {result.train_loss:.4f}"]
    if result.initial_eval_loss is not None:
        parts.append(f"validation loss {result.initial_eval_loss:.4f} -> {result.eval_loss:.4f}")
    elif result.eval_loss is not None:
        parts.append(f"validation loss {result.eval_loss:.4f}")
    parts.append(f"{result.tokens_per_second:.0f} tokens/s")
    if trainer.world is not None and trainer.world.size > 1:
        parts.append(f"{trainer.world.size} processes ({trainer.world.strategy})")
    print("done: " + ", ".join(parts))
    print(f"adapter: {result.adapter_dir}")
    return 0
