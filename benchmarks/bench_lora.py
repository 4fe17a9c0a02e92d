"""lispetorch against PEFT, side by side in one process, on a small Llama model (CPU, float32).

One base ``LlamaForCausalLM`` (hidden 512, intermediate 1376, 8 layers, 8 heads, vocabulary 32000, SDPA
attention) is built from a fixed seed; every model measured is a ``copy.deepcopy`` of it taken before
adapting: a frozen copy (no parameter requires grad), a lispetorch copy (``lt.inject``) and a PEFT copy
(``peft.get_peft_model``), both with r=16, alpha=32, dropout=0.05. lispetorch's randomly initialised A and a
small random B are copied into PEFT's layers, so both compute the same function (checked on the logits
before anything is timed). Inputs are random token ids (batch 4 x 256, fixed seed); labels are the inputs.

For each target set (q,k,v,o and all-linear) the script measures:

1. Training step: forward + backward + ``torch.optim.AdamW`` step (lr 1e-4) over the trainable parameters,
   in train mode. Two warm-up steps each, then lispetorch, PEFT and the frozen model take turns (A B C A B C
   ...) for ``--reps`` repetitions; the medians are compared (ratio lispetorch / PEFT). The frozen model's
   forward + backward (its input embeddings' output made to require grad, so that backward runs through every
   layer) is the floor no adapter implementation can go below; the time above it is the adapters' own cost,
   compared too (the median over turns of each turn's difference from the floor).
2. Adapter activation memory: during one train-mode forward, ``torch.autograd.graph.saved_tensors_hooks``
   records every tensor autograd saves for backward; each storage is counted once (keyed by its data pointer
   and device) by its ``nbytes``, and storages of model parameters are left out. A forward hook on the input
   embedding makes its output require grad, in every model alike, so that the frozen model saves what the
   gradient of its input needs. Adapter memory = saved(model) - saved(frozen). PEFT is measured with dropout
   0.05 and, on a separate copy, with dropout 0, its floor without dropout.
3. Unmerged inference: eval mode, ``torch.no_grad()``, forward only, in turn with the base model's (the
   floor), three times as many turns as training (it is cheaper and noisier), medians compared, and the time
   above the base model's too.
4. Merged inference: ``lt.merge`` on the lispetorch model, then its forward is timed against the frozen base
   model, alternated (ratio merged / base, ideally 1 within noise); ``lt.unmerge`` afterwards, and the base
   weights are checked to be bit-identical to the saved base state.
5. One adapted layer alone (a 512 → 512 linear, the same tokens, r, alpha, dropout): the adapters' own cost in
   training (forward + backward) and eval inference above the bare layer's, many alternated turns. In the whole
   model that cost is a few percent of a step, within this machine's noise; here it is measured precisely. Beside
   it, two references: the floor (the FLOPs of the adapter's products at the frozen layer's rate) and a pass over
   x (a copy of it, in the same turns), the unit of the memory traffic the skinny products cost. DoRA with
   ``lt.set_dora_recompute`` (LoRA's activations, one more base product in backward) takes turns of its own with
   our LoRA and the frozen layer, so that its extra product does not change the state the others meet.
6. DoRA (``--parts dora``): our DoRA's step above the frozen model against our LoRA's and PEFT's DoRA's, its
   adapter activations (also with ``lt.set_dora_recompute``) and its unmerged inference against PEFT's DoRA.

Times use ``time.perf_counter``. The results are printed as Markdown tables (ratio = lispetorch / PEFT) and,
with ``--out``, written to a file.

    python benchmarks/bench_lora.py            # full benchmark
    python benchmarks/bench_lora.py --quick    # smoke test: 2 layers, batch 2 x 64, 2 repetitions
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import peft
import torch
import transformers
from peft.helpers import DoraCaching

import lispetorch as lt

RANK, ALPHA, DROPOUT, LR = 16, 32, 0.05, 1e-4
B_STD = 0.01
TARGETS: dict[str, list[str] | str] = {
    "q,k,v,o": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all-linear": "all-linear",
}
MIB = 2**20

# PEFT 0.21 still calls transformers' deprecated is_gradient_checkpointing; the notice is noise here.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# --- models ------------------------------------------------------------------------------------------------
def build_base(layers: int, seed: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=512, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(torch.float32)


def make_frozen(base: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_lispetorch(base: torch.nn.Module, targets, seed: int, dora: bool = False) -> torch.nn.Module:
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    lt.inject(model, lt.LoraConfig(r=RANK, alpha=ALPHA, dropout=DROPOUT, target_modules=targets, use_dora=dora))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in lt.adapter_layers(model).values():
            B = layer.lora_B["default"]
            B.copy_(torch.randn(B.shape, generator=g) * B_STD)
    return model


def make_peft(base: torch.nn.Module, targets, dropout: float, source: torch.nn.Module,
              dora: bool = False) -> peft.PeftModel:
    """A PEFT copy of ``base`` whose adapters hold the factors (and DoRA magnitudes) of the lispetorch model
    ``source``."""
    model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=targets, use_dora=dora),
    )
    inner = model.get_base_model()
    ours = lt.adapter_layers(source)
    theirs = {n for n, m in inner.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    if set(ours) != theirs:
        raise RuntimeError(f"lispetorch and PEFT adapt different layers: {sorted(set(ours) ^ theirs)[:5]}")
    with torch.no_grad():
        for name, layer in ours.items():
            target = inner.get_submodule(name)
            theirs_s, ours_s = target.scaling["default"], layer.scaling["default"]
            if theirs_s != ours_s:
                raise RuntimeError(f"{name}: PEFT scaling {theirs_s} != lispetorch scaling {ours_s}")
            target.lora_A["default"].weight.copy_(layer.lora_A["default"])
            target.lora_B["default"].weight.copy_(layer.lora_B["default"])
            if dora:
                target.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector["default"])
    return model


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if isinstance(model, peft.PeftModel) else model


# --- measurements ------------------------------------------------------------------------------------------
def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one train-mode forward, each storage once, parameters excluded."""
    params = {(p.untyped_storage().data_ptr(), p.device) for p in model.parameters()}
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in params and key not in seen:
            seen[key] = storage.nbytes()
        return t

    def input_requires_grad(module, inputs, output):
        output.requires_grad_()

    handle = hf_model(model).get_input_embeddings().register_forward_hook(input_requires_grad)
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        del loss
    finally:
        handle.remove()
    return sum(seen.values())


def train_step(model: torch.nn.Module, params: list[torch.nn.Parameter], ids: torch.Tensor) -> Callable:
    """One AdamW step; for the frozen model (no parameters) the forward and backward alone, with the input
    embeddings' output made to require grad so that backward runs through every layer, as it must for the
    adapters below the top: the floor any adapter implementation starts from."""
    opt = torch.optim.AdamW(params, lr=LR) if params else None
    handle = None
    if not params:
        handle = hf_model(model).get_input_embeddings().register_forward_hook(
            lambda module, inputs, output: output.requires_grad_())

    def step() -> None:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        if opt is not None:
            opt.step()

    step.handle = handle
    return step


def forward_only(model: torch.nn.Module, ids: torch.Tensor) -> Callable:
    def run() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    return run


def alternate(*fns: Callable, warmup: int, reps: int) -> list[list[float]]:
    """Warm each up, then time them in turn (A B C A B C ...); seconds per run of each."""
    for _ in range(warmup):
        for f in fns:
            f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for f, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return times


def medians(ta: list[float], tb: list[float], tf: list[float]) -> tuple[tuple[float, ...], tuple[float, float]]:
    """The medians of the three, and the medians of the time each of the first two takes above the floor (the
    third) within the same turn: a difference taken turn by turn cancels the machine's slow drifts, which the
    difference of two medians keeps."""
    above = tuple(statistics.median(a - f for a, f in zip(t, tf, strict=True)) for t in (ta, tb))
    return (statistics.median(ta), statistics.median(tb), statistics.median(tf)), above


def above(times: list[float], floor: list[float]) -> float:
    """The median over turns of each turn's time above the floor's."""
    return statistics.median(a - f for a, f in zip(times, floor, strict=True))


def spread(times: list[float]) -> str:
    med, lo, hi = (f(times) * 1e3 for f in (statistics.median, min, max))
    return f"median {med:8.1f} ms [{lo:.1f} .. {hi:.1f}]"


@torch.no_grad()
def max_logit_diff(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor) -> float:
    a.eval()
    b.eval()
    diff = a(input_ids=ids, use_cache=False).logits - b(input_ids=ids, use_cache=False).logits
    return diff.abs().max().item()


# --- report ------------------------------------------------------------------------------------------------
def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def log(msg: str) -> None:
    print(msg, flush=True)


def bench_targets(label: str, targets, base, frozen, base_state, ids, args, rows, mem_rows) -> None:
    log(f"\n## targets {label}")
    ltm = make_lispetorch(base, targets, args.seed)
    pm = make_peft(base, targets, DROPOUT, ltm)
    pm0 = make_peft(base, targets, 0.0, ltm)
    n_lt = sum(p.numel() for p in lt.trainable_parameters(ltm))
    n_peft = sum(p.numel() for p in lt.trainable_parameters(pm))
    if n_lt != n_peft:
        raise RuntimeError(f"trainable parameters differ: lispetorch {n_lt}, PEFT {n_peft}")
    log(f"adapted layers {len(lt.adapter_layers(ltm))}, trainable parameters {n_lt:,}")
    log(f"max |logits lispetorch - PEFT| = {max_logit_diff(ltm, pm, ids):.2e}, "
        f"max |logits lispetorch - base| = {max_logit_diff(ltm, frozen, ids):.2e}")

    # activation memory, first, on the untouched copies
    torch.manual_seed(args.seed)
    models = {"frozen": frozen, "lt": ltm, "peft": pm, "peft0": pm0}
    saved = {name: saved_bytes(m, ids) for name, m in models.items()}
    del models, pm0
    gc.collect()
    adapter = {k: saved[k] - saved["frozen"] for k in ("lt", "peft", "peft0")}
    log("saved for backward (MiB): " + ", ".join(f"{k} {v / MIB:.2f}" for k, v in saved.items()))
    mem_rows.append([label] + [f"{saved[k] / MIB:.2f} ({adapter[k] / MIB:+.2f})" if k != "frozen"
                               else f"{saved[k] / MIB:.2f}" for k in ("frozen", "lt", "peft", "peft0")])

    # training step, with the frozen model's forward + backward as the floor
    frozen.train()
    floor_step = train_step(frozen, [], ids)
    ta, tb, tf = alternate(train_step(ltm, lt.trainable_parameters(ltm), ids),
                           train_step(pm, lt.trainable_parameters(pm), ids), floor_step,
                           warmup=args.warmup, reps=args.reps)
    floor_step.handle.remove()
    log(f"train step   lispetorch {spread(ta)}   PEFT {spread(tb)}   frozen {spread(tf)}")
    train, train_above = medians(ta, tb, tf)
    gc.collect()

    # unmerged inference, with the base model's as the floor
    ltm.eval()
    pm.eval()
    frozen.eval()
    ia, ib, ifl = alternate(forward_only(ltm, ids), forward_only(pm, ids), forward_only(frozen, ids),
                            warmup=args.warmup, reps=3 * args.reps)
    log(f"inference    lispetorch {spread(ia)}   PEFT {spread(ib)}   base {spread(ifl)}")
    infer, infer_above = medians(ia, ib, ifl)
    del pm
    gc.collect()

    # merged inference against the frozen base
    frozen.eval()
    lt.merge(ltm)
    ma, mb = alternate(forward_only(ltm, ids), forward_only(frozen, ids), warmup=args.warmup, reps=args.reps)
    log(f"merged       lispetorch {spread(ma)}   base {spread(mb)}")
    merged = (statistics.median(ma), statistics.median(mb))
    lt.unmerge(ltm)
    exact = all(torch.equal(layer.base_layer.weight, base_state[name + ".weight"])
                for name, layer in lt.adapter_layers(ltm).items())
    log(f"unmerge restores the base weights bit for bit: {'yes' if exact else 'NO'}")
    del ltm
    gc.collect()

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.1f}"

    def mib(nbytes: int) -> str:
        return f"{nbytes / MIB:.2f}"

    rows += [
        ["train step (ms)", label, ms(train[0]), ms(train[1]), f"{ratio(*train[:2]):.3f}", "≤ 0.85"],
        ["train step above the frozen model's (ms)", label, *map(ms, train_above), f"{ratio(*train_above):.3f}",
         "—"],
        ["adapter activations (MiB), PEFT without dropout", label, mib(adapter["lt"]), mib(adapter["peft0"]),
         f"{ratio(adapter['lt'], adapter['peft0']):.3f}", "≤ 1.10"],
        ["adapter activations (MiB), PEFT with dropout", label, mib(adapter["lt"]), mib(adapter["peft"]),
         f"{ratio(adapter['lt'], adapter['peft']):.3f}", "—"],
        ["unmerged inference (ms)", label, ms(infer[0]), ms(infer[1]), f"{ratio(*infer[:2]):.3f}", "≤ 0.9"],
        ["unmerged inference above the base model's (ms)", label, *map(ms, infer_above),
         f"{ratio(*infer_above):.3f}", "—"],
        ["merged inference (ms), PEFT column: frozen base", label, ms(merged[0]), ms(merged[1]),
         f"{ratio(*merged):.3f}", "≈ 1.0 (noise)"],
    ]


def bench_dora(label: str, targets, base, frozen, ids, args, rows, mem_rows) -> None:
    """DoRA, whole model: our DoRA against our LoRA (its cost: training step above the frozen model, adapter
    activations) and against PEFT's DoRA (unmerged inference above the base model), all with dropout 0.05."""
    log(f"\n## DoRA, targets {label}")
    lora = make_lispetorch(base, targets, args.seed)
    dora = make_lispetorch(base, targets, args.seed, dora=True)
    recompute = make_lispetorch(base, targets, args.seed, dora=True)
    lt.set_dora_recompute(recompute)
    pd = make_peft(base, targets, DROPOUT, dora, dora=True)
    log(f"max |logits lispetorch DoRA - PEFT DoRA| = {max_logit_diff(dora, pd, ids):.2e}")
    torch.manual_seed(args.seed)
    saved = {name: saved_bytes(m, ids) for name, m in (("frozen", frozen), ("lora", lora), ("dora", dora),
                                                          ("recompute", recompute), ("peft", pd))}
    adapter = {k: saved[k] - saved["frozen"] for k in ("lora", "dora", "recompute", "peft")}
    del recompute
    log("saved for backward (MiB): " + ", ".join(f"{k} {v / MIB:.2f}" for k, v in saved.items()))
    mem_rows.append([f"{label}, DoRA"] + [f"{saved[k] / MIB:.2f} ({adapter[k] / MIB:+.2f})" if k != "frozen"
                                          else f"{saved[k] / MIB:.2f}" for k in ("frozen", "dora", "peft")] + ["—"])
    gc.collect()
    frozen.train()
    floor_step = train_step(frozen, [], ids)
    tl, td, tp, tf = alternate(train_step(lora, lt.trainable_parameters(lora), ids),
                               train_step(dora, lt.trainable_parameters(dora), ids),
                               train_step(pd, lt.trainable_parameters(pd), ids), floor_step,
                               warmup=args.warmup, reps=args.reps)
    floor_step.handle.remove()
    log(f"train step   LoRA {spread(tl)}   DoRA {spread(td)}   PEFT DoRA {spread(tp)}   frozen {spread(tf)}")
    t_lora, t_dora, t_peft = (above(t, tf) for t in (tl, td, tp))
    for m in (dora, pd, frozen):
        m.eval()
    ia, ib, ifl = alternate(forward_only(dora, ids), forward_only(pd, ids), forward_only(frozen, ids),
                            warmup=args.warmup, reps=3 * args.reps)
    log(f"inference    DoRA {spread(ia)}   PEFT DoRA {spread(ib)}   base {spread(ifl)}")
    i_dora, i_peft = above(ia, ifl), above(ib, ifl)
    del lora, dora, pd
    gc.collect()

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.1f}"

    rows += [
        ["DoRA train step above the frozen model's (ms); PEFT column: our LoRA", label, ms(t_dora), ms(t_lora),
         f"{ratio(t_dora, t_lora):.3f}", "≤ 1.2"],
        ["DoRA train step above the frozen model's (ms); PEFT DoRA", label, ms(t_dora), ms(t_peft),
         f"{ratio(t_dora, t_peft):.3f}", "—"],
        ["DoRA adapter activations (MiB); PEFT column: our LoRA", label, f"{adapter['dora'] / MIB:.2f}",
         f"{adapter['lora'] / MIB:.2f}", f"{ratio(adapter['dora'], adapter['lora']):.3f}", "≤ 1.1"],
        ["DoRA adapter activations with set_dora_recompute (MiB); PEFT column: our LoRA", label,
         f"{adapter['recompute'] / MIB:.2f}", f"{adapter['lora'] / MIB:.2f}",
         f"{ratio(adapter['recompute'], adapter['lora']):.3f}", "≤ 1.1"],
        ["DoRA adapter activations (MiB); PEFT DoRA", label, f"{adapter['dora'] / MIB:.2f}",
         f"{adapter['peft'] / MIB:.2f}", f"{ratio(adapter['dora'], adapter['peft']):.3f}", "—"],
        ["DoRA unmerged inference above the base model's (ms); PEFT DoRA", label, ms(i_dora), ms(i_peft),
         f"{ratio(i_dora, i_peft):.3f}", "≤ 0.5"],
    ]


class OneLayer(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x)


def adapter_flops(tokens: int, width: int, dora: bool) -> tuple[int, int]:
    """FLOPs of the adapter's own products in one training step (forward x Aᵀ and h Bᵀ; backward G B, dL/dh A,
    dL/dhᵀ x and Gᵀ h: six products of 2·N·d·r) and in one inference forward (the first two); DoRA adds W Aᵀ for the
    row norms (2·out·in·r) to each."""
    product = 2 * tokens * width * RANK
    norms = 2 * width * width * RANK if dora else 0
    return 6 * product + norms, 2 * product + norms


def bench_layer(tokens: int, reps: int, seed: int, rows: list[list[str]], shape: tuple[int, ...]) -> None:
    """One adapted layer alone (512 → 512, r 16, dropout 0.05): the adapters' own cost, which in the whole model
    is a few percent of a step and below the machine's noise, measured without the model around it. Train:
    forward + backward with the input requiring grad (as inside a model), against the frozen layer's; eval:
    forward under no_grad, against the plain layer's. Turns alternate, medians of the per-turn differences.

    The floor: the FLOPs of the adapter's own products (:func:`adapter_flops`) at the rate the frozen layer
    reaches in the same turns (its forward and input gradient, 4·N·in·out FLOPs; in eval 2·N·in·out)."""
    torch.manual_seed(seed)
    base = OneLayer(512)
    models = {}
    for dora in (False, True):
        ours = copy.deepcopy(base)
        lt.inject(ours, lt.LoraConfig(r=RANK, alpha=ALPHA, dropout=DROPOUT, target_modules=["q_proj"],
                                      use_dora=dora))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=["q_proj"], use_dora=dora))
        models["DoRA" if dora else "LoRA"] = (ours, theirs)
    frozen = make_frozen(base)
    recompute = copy.deepcopy(models["DoRA"][0])  # DoRA keeping nothing beyond LoRA's activations
    lt.set_dora_recompute(recompute)
    x = torch.randn(*shape)
    label = "×".join(map(str, shape))

    def train(m):
        def run() -> None:
            xi = x.clone().requires_grad_()
            y = m(xi)
            y.backward(torch.ones_like(y))
        return run

    def infer(m):
        def run() -> None:
            with torch.no_grad():
                m(x)
        return run

    def one_pass() -> None:  # a copy of x: one read and one write of the tall operand, at memory speed
        x.clone()

    fns = [m for pair in models.values() for m in pair]
    for m in (*fns, recompute):
        m.train()
    times = alternate(*map(train, fns), train(frozen), one_pass, warmup=10, reps=reps)
    t_pass = statistics.median(times.pop())
    t_floor = times[-1]
    for m in (*fns, frozen):
        m.eval()
    itimes = alternate(*map(infer, fns), infer(frozen), warmup=10, reps=reps)
    i_floor = itimes[-1]
    rate_train = 4 * tokens * 512 * 512 / statistics.median(t_floor)  # FLOP/s of the frozen layer
    rate_infer = 2 * tokens * 512 * 512 / statistics.median(i_floor)
    log(f"one layer {label}: frozen train {spread(t_floor)} ({rate_train / 1e9:.0f} GFLOP/s), "
        f"eval {spread(i_floor)} ({rate_infer / 1e9:.0f} GFLOP/s); a pass over x (a copy of its "
        f"{x.numel() * x.element_size() / MIB:.0f} MiB) {t_pass * 1e6:.0f} µs")

    def us(seconds: float) -> str:
        return f"{seconds * 1e6:.0f}"

    above_train = {}
    for k, kind in enumerate(models):
        flops_train, flops_infer = adapter_flops(tokens, 512, kind == "DoRA")
        floor_train, floor_infer = flops_train / rate_train, flops_infer / rate_infer
        ours_t, theirs_t = above(times[2 * k], t_floor), above(times[2 * k + 1], t_floor)
        ours_i, theirs_i = above(itimes[2 * k], i_floor), above(itimes[2 * k + 1], i_floor)
        above_train[kind] = ours_t
        log(f"one layer {label} {kind}: train above frozen ours {us(ours_t)} µs ({ours_t / t_pass:.1f} passes "
            f"over x), PEFT {us(theirs_t)} µs, floor {us(floor_train)} µs ({flops_train / 1e6:.0f} MFLOP); eval "
            f"above ours {us(ours_i)} µs, PEFT {us(theirs_i)} µs, floor {us(floor_infer)} µs")
        rows += [
            [f"one layer {label}, {kind} train step above the frozen layer's {us(statistics.median(t_floor))} µs "
             "(µs)", "q_proj", us(ours_t), us(theirs_t), f"{ratio(ours_t, theirs_t):.3f}", "—"],
            [f"one layer {label}, {kind} train: ours / floor {us(floor_train)} µs", "q_proj", us(ours_t),
             us(floor_train), f"{ratio(ours_t, floor_train):.2f}", "≤ 1.5" if kind == "LoRA" else "—"],
            [f"one layer {label}, {kind} train above the frozen layer, in passes over x (a copy of x: "
             f"{us(t_pass)} µs)", "q_proj", us(ours_t), us(t_pass), f"{ratio(ours_t, t_pass):.1f}", "—"],
            [f"one layer {label}, {kind} eval forward above the plain layer's {us(statistics.median(i_floor))} µs "
             "(µs)", "q_proj", us(ours_i), us(theirs_i), f"{ratio(ours_i, theirs_i):.3f}", "—"],
            [f"one layer {label}, {kind} eval: ours / floor {us(floor_infer)} µs", "q_proj", us(ours_i),
             us(floor_infer), f"{ratio(ours_i, floor_infer):.2f}", "—"],
        ]
    rows.append([f"one layer {label}, DoRA train step above the frozen layer, ours DoRA / ours LoRA", "q_proj",
                 us(above_train["DoRA"]), us(above_train["LoRA"]),
                 f"{ratio(above_train['DoRA'], above_train['LoRA']):.2f}", "≤ 1.2"])
    # DoRA keeping LoRA's activations, in turns of its own (with our LoRA and the frozen layer): in the turns above
    # its extra product and buffers would change the cache and the allocator's state the others meet
    lora_rc, rc, frozen_rc = alternate(train(models["LoRA"][0]), train(recompute), train(frozen), warmup=10,
                                       reps=reps // 2)
    t_lora_rc, t_recompute = above(lora_rc, frozen_rc), above(rc, frozen_rc)
    rows.append([f"one layer {label}, DoRA with set_dora_recompute, train step above the frozen layer / ours LoRA",
                 "q_proj", us(t_recompute), us(t_lora_rc), f"{ratio(t_recompute, t_lora_rc):.2f}", "—"])


def bench_decode(width: int, reps: int, seed: int, rows: list[list[str]]) -> None:
    """Decoding one token through one DoRA layer (``width`` → ``width``, r 16), eval mode, no_grad: our DoRA and
    PEFT's, each with the norms computed at every call and with them kept (``lt.dora_caching``, PEFT's
    ``DoraCaching``), in turns with the plain layer; medians of the per-turn times above it."""
    torch.manual_seed(seed)
    base = OneLayer(width)
    ours = copy.deepcopy(base)
    lt.inject(ours, lt.LoraConfig(r=RANK, alpha=ALPHA, dropout=DROPOUT, target_modules=["q_proj"], use_dora=True))
    with torch.no_grad():
        ours.q_proj.lora_B["default"].normal_(0, B_STD)
    theirs = make_peft(base, ["q_proj"], DROPOUT, ours, dora=True)
    cached = copy.deepcopy(ours)
    lt.dora_caching(cached)
    theirs_cached = copy.deepcopy(theirs)  # PEFT clears a layer's cache at every forward made without caching
    for m in (ours, theirs, cached, theirs_cached, base):
        m.eval()
    token = torch.randn(1, 1, width)
    with torch.no_grad():
        torch.testing.assert_close(ours(token), theirs(token), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cached(token), theirs(token), rtol=1e-4, atol=1e-5)
        with DoraCaching():
            torch.testing.assert_close(theirs_cached(token), theirs(token), rtol=1e-4, atol=1e-5)

    def infer(m):
        def run() -> None:
            with torch.no_grad():
                m(token)
        return run

    def infer_peft_cached() -> None:
        with torch.no_grad(), DoraCaching():
            theirs_cached(token)

    t_ours, t_cached, t_theirs, t_theirs_cached, t_base = alternate(
        infer(ours), infer(cached), infer(theirs), infer_peft_cached, infer(base), warmup=20, reps=reps)
    a_ours, a_cached, a_theirs, a_theirs_cached = (above(t, t_base) for t in (t_ours, t_cached, t_theirs,
                                                                               t_theirs_cached))
    log(f"decode one token, DoRA {width}: plain layer {statistics.median(t_base) * 1e6:.1f} µs; above it ours "
        f"{a_ours * 1e6:.1f}, cached {a_cached * 1e6:.1f}, PEFT {a_theirs * 1e6:.1f}, PEFT DoraCaching "
        f"{a_theirs_cached * 1e6:.1f} µs")
    label = f"one layer {width}, DoRA decoding one token, above the plain layer's {statistics.median(t_base) * 1e6:.0f}"
    rows += [
        [f"{label} µs: ours / PEFT DoRA (norms at every call)", "q_proj", f"{a_ours * 1e6:.1f}",
         f"{a_theirs * 1e6:.1f}", f"{ratio(a_ours, a_theirs):.2f}", "—"],
        [f"{label} µs: ours with dora_caching / PEFT with DoraCaching", "q_proj", f"{a_cached * 1e6:.1f}",
         f"{a_theirs_cached * 1e6:.1f}", f"{ratio(a_cached, a_theirs_cached):.2f}", "—"],
        [f"{label} µs: ours with dora_caching / ours without", "q_proj", f"{a_cached * 1e6:.1f}",
         f"{a_ours * 1e6:.1f}", f"{ratio(a_cached, a_ours):.2f}", "—"],
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 layers, batch 2 x 64, 2 repetitions")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions of each (default 7, quick 2)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="warm-up runs of each before timing (default 2)")
    parser.add_argument("--targets", choices=list(TARGETS), nargs="+", default=list(TARGETS),
                        help="target sets to measure (default all)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the Markdown tables to this file")
    parser.add_argument("--parts", choices=["model", "dora", "layer"], nargs="+", default=["model", "dora", "layer"],
                        help="what to measure: the whole model with LoRA, with DoRA, one layer (default all)")
    args = parser.parse_args(argv)
    layers, batch, seq = (2, 2, 64) if args.quick else (8, 4, 256)
    if args.reps is None:
        args.reps = 2 if args.quick else 7
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    header = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"lispetorch {lt.__version__}; threads {torch.get_num_threads()}\n"
        f"LlamaForCausalLM hidden 512, intermediate 1376, layers {layers}, heads 8/8, vocab 32000, "
        f"float32, sdpa; "
        f"batch {batch} x {seq}; LoRA r {RANK}, alpha {ALPHA}, dropout {DROPOUT}; AdamW lr {LR}; "
        f"warm-up {args.warmup}, repetitions {args.reps} (medians){' [quick]' if args.quick else ''}"
    )
    log(header)

    base = build_base(layers, args.seed)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    frozen = make_frozen(base)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=g)

    rows: list[list[str]] = []
    mem_rows: list[list[str]] = []
    for label in args.targets:
        if "model" in args.parts:
            bench_targets(label, TARGETS[label], base, frozen, base_state, ids, args, rows, mem_rows)
        if "dora" in args.parts:
            bench_dora(label, TARGETS[label], base, frozen, ids, args, rows, mem_rows)
    if "layer" in args.parts:
        log("\n## one adapted layer")
        for shape in ((batch * seq, 512), (batch, seq, 512)):  # as the benchmark fed it, and as inside a model
            bench_layer(batch * seq, 20 if args.quick else 300, args.seed, rows, shape)
        for width, reps in ((512, 2000), (2048, 200)):
            bench_decode(width, 20 if args.quick else reps, args.seed, rows)

    table = markdown(["metric", "targets", "lispetorch", "PEFT", "ratio", "goal"], rows)
    mem_table = markdown(
        ["targets", "frozen", "lispetorch", f"PEFT, dropout {DROPOUT}", "PEFT, dropout 0"], mem_rows)
    report = (f"{header}\n\n{table}\n\nSaved for backward, MiB (in brackets: minus the frozen model's, i.e. "
              f"the adapters' share)\n\n{mem_table}\n")
    print("\n" + report, end="", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
