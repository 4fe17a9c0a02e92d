"""``lispetorch validate [MODEL_DIR]``: the checks a researcher runs before trusting a LoRA setup, on a model (the
embedded default model by default), as a pass/fail table.

Checks: adapters applied and counted; the trainable share (adapter parameters only); the base frozen (no base
parameter requires or receives a gradient); the loss decreasing over a few steps; a save/load round trip giving the
same logits; merging giving the same logits; and, when PEFT is installed, PEFT loading the adapter with the same
logits.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import tempfile
from pathlib import Path

import torch

from . import default_model
from .adapters import adapter_layers, merge, trainable_parameters, unmerge
from .config import LoraConfig
from .dispatch import inject
from .peft_io import load_adapter, save_adapter

LOSS_STEPS = 5
MERGE_TOLERANCE = 1e-4  # max |logit difference|, relative to the largest logit, float32
ROUND_TRIP_TOLERANCE = 1e-6


@dataclasses.dataclass
class Check:
    name: str
    passed: bool
    detail: str


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model


def _batch(path: Path, model) -> torch.Tensor:
    """Two sequences of real text (this module's source) in the model's tokenizer, else seeded random ids."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        ids = tok(inspect.getsource(inspect.getmodule(Check)), add_special_tokens=False)["input_ids"][:64]
        if len(ids) >= 32:
            return torch.tensor([ids[:32], ids[32:64] if len(ids) >= 64 else ids[:32]])
    except (OSError, ValueError):
        pass
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


def run_checks(model_dir: str | os.PathLike | None = None, rank: int = 8, targets: str | list[str] = "standard",
               progress: bool = False) -> list[Check]:
    """Every check on the model in ``model_dir`` (the default model when None), with a LoRA of ``rank`` on
    ``targets`` (a preset or module names)."""
    path = Path(model_dir) if model_dir is not None else default_model.ensure(progress=progress)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    checks: list[Check] = []
    torch.manual_seed(0)
    model = _load(path)
    ids = _batch(path, model)
    base_params = {id(p) for p in model.parameters()}
    layers = inject(model, LoraConfig(r=rank, alpha=2 * rank, target_modules=targets))
    n_layers = len(adapter_layers(model))
    checks.append(Check("adapters applied", n_layers > 0 and n_layers == len(layers),
                        f"{n_layers} layers ({', '.join(sorted({n.rsplit('.', 1)[-1] for n in layers}))})"))
    params = trainable_parameters(model)
    n_train = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    expected = sum(layer.lora_A["default"].numel() + layer.lora_B["default"].numel() for layer in layers.values())
    checks.append(Check("trainable share", n_train == expected and n_train > 0,
                        f"{n_train:,} of {n_total:,} parameters ({100 * n_train / n_total:.3f} %), all adapter "
                        "factors"))
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(LOSS_STEPS + 1):
        loss = _loss(model, ids)
        losses.append(float(loss.detach()))
        if len(losses) > LOSS_STEPS:
            break
        loss.backward()
        if len(losses) == 1:
            with_grad = [p for p in model.parameters() if id(p) in base_params and
                         (p.requires_grad or p.grad is not None)]
            checks.append(Check("base frozen", not with_grad, f"{len(with_grad)} base parameters with a gradient"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    checks.append(Check("loss decreases", losses[-1] < losses[0],
                        f"{losses[0]:.4f} → {losses[-1]:.4f} over {LOSS_STEPS} AdamW steps"))
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        scale = float(adapted.abs().max())
        with tempfile.TemporaryDirectory() as tmp:
            save_adapter(model, tmp)
            fresh = _load(path)
            load_adapter(fresh, tmp)
            diff = float((fresh(input_ids=ids).logits - adapted).abs().max())
            checks.append(Check("save/load round trip", diff <= ROUND_TRIP_TOLERANCE * max(scale, 1.0),
                                f"max |logit difference| {diff:.2e}"))
            merge(model)
            merged = model(input_ids=ids).logits
            unmerge(model)
            diff = float((merged - adapted).abs().max())
            checks.append(Check("merge equivalence", diff <= MERGE_TOLERANCE * max(scale, 1.0),
                                f"max |logit difference| {diff:.2e} (logits up to {scale:.1f})"))
            try:
                from peft import PeftModel
            except ImportError:
                checks.append(Check("PEFT loads the adapter", True, "skipped: peft is not installed"))
            else:
                peft_model = PeftModel.from_pretrained(_load(path), tmp)
                diff = float((peft_model(input_ids=ids).logits - adapted).abs().max())
                checks.append(Check("PEFT loads the adapter", diff <= MERGE_TOLERANCE * max(scale, 1.0),
                                    f"max |logit difference| {diff:.2e}"))
    return checks


def table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  result  detail", f"{'-' * width}  ------  ------"]
    lines += [f"{c.name:<{width}}  {'pass' if c.passed else 'FAIL':<6}  {c.detail}" for c in checks]
    passed = sum(c.passed for c in checks)
    lines.append(f"{passed}/{len(checks)} checks passed")
    return "\n".join(lines)


def configure(parser) -> None:
    parser.add_argument("model", nargs="?", help="a Hugging Face model directory (default: the embedded default model)")
    parser.add_argument("--rank", type=int, default=8, help="the LoRA rank (default 8)")
    parser.add_argument("--targets", default="standard",
                        help="target modules: a preset (standard, extended, all-linear) or a regular expression")


def main(args) -> int:
    checks = run_checks(args.model, args.rank, args.targets, progress=True)
    print(table(checks))
    return 0 if all(c.passed for c in checks) else 1
