"""The LoRA checkpoint optimizer against the dense way, against the time to read the files, and its ``svd`` build
against PEFT's ``add_weighted_adapter(combination_type="svd")``, side by side in one process (CPU).

Part 1 writes four PEFT checkpoints shaped like StarCoder2-7B attention LoRA (32 layers × q, k, v, o; r = 8,
alpha 16, float32; A 8×4608; B 4608×8 for q and o, 512×8 for k and v): three sources and one target, with random
factors from a fixed seed. It then measures, on the same files (warm in the page cache after the first pass):

1. file read: every byte of the four ``adapter_model.safetensors`` files (``Path.read_bytes``), what any method
   must do at least; measured with the files in the page cache (warm) and evicted from it before each run with
   ``posix_fadvise(POSIX_FADV_DONTNEED)`` (cold: read from the disk);
2. optimize: ``lispetorch.combine.optimize`` end to end (open, read, fused Gram per module, exact solve, report),
   warm and cold as the read;
3. dense reference: the same files read the same way, then per module every ``ΔWᵢ = sᵢ Bᵢ Aᵢ`` formed in
   float64 and the Gram of the flattened deltas ``D Dᵀ`` (what the original optimizer computes, at the same
   precision). Its Gram is compared with the fused one (largest relative difference).

Part 2 builds a smaller Llama model (hidden 2048 as 1B-parameter models have, 2 layers, 8 heads, 2 key/value
heads; q, k, v, o adapted,
three adapters of rank 8) and combines the three adapters with weights (0.2, 0.5, 0.3) into a rank-8 adapter:

4. lispetorch: ``combine.build(mode="svd")`` end to end (read the three checkpoint files, factored SVD per
   module, write the PEFT directory);
5. PEFT: ``add_weighted_adapter(combination_type="svd", svd_rank=8)`` on a ``PeftModel`` holding the three
   adapters in memory (its default ``svd_full_matrices=True``, and ``False``); the new adapter is deleted between
   repetitions. Both results are compared with the exact truncated SVD of the dense weighted sum (relative
   Frobenius error over all modules; Eckart–Young says no rank-8 adapter does better).

With ``--against REV``, part 1 also runs optimize with the checkpoint reader of the git revision ``REV``
(``lispetorch/combine/reader.py`` as it was there, loaded beside the current one) on the same files, the two
alternating run by run, warm and cold, and prints each one's median and the ratio current / REV: one command
compares two readers on one machine at one time (``b75d751``: the reader whose factors were views of the mapped
files, before reads into buffers of the process).

Times are medians over ``--reps`` repetitions (the dense reference and PEFT: fewer, see the output), with
``time.perf_counter``. Ratios are printed as Markdown; ``--out`` also writes them to a file.

    python benchmarks/bench_combine.py            # full benchmark
    python benchmarks/bench_combine.py --quick    # smoke test: 2 layers, a small svd model, 2 repetitions
    python benchmarks/bench_combine.py --against b75d751 --reps 15 --only-readers   # the readers side by side
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import peft
import torch
import transformers

import lispetorch as lt
from lispetorch import combine

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
PREFIX = "base_model.model."
NAMES = ("singleline", "multiline", "annotated", "concatenationTrained")


def write_checkpoint(path: Path, shapes: dict[str, tuple[int, int]], rank: int, alpha: float, seed: int) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m, (out, inp) in shapes.items():
        tensors[f"{PREFIX}{m}.lora_A.weight"] = torch.randn(rank, inp, generator=g) / math.sqrt(inp)
        tensors[f"{PREFIX}{m}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.01
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "bias": "none", "use_rslora": False,
              "fan_in_fan_out": False, "base_model_name_or_path": None, "rank_pattern": {}, "alpha_pattern": {}}
    (path / "adapter_config.json").write_text(json.dumps(config))


def attention_shapes(layers: int, hidden: int, kv: int) -> dict[str, tuple[int, int]]:
    shapes = {}
    for i in range(layers):
        for name, out in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv), ("o_proj", hidden)):
            shapes[f"model.layers.{i}.self_attn.{name}"] = (out, hidden)
    return shapes


def timed(fn, reps: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def read_all(paths: list[Path]) -> int:
    """Reads every byte of the checkpoint files (the least any method must do)."""
    return sum(len((p / "adapter_model.safetensors").read_bytes()) for p in paths)


def evict(paths: list[Path]) -> None:
    """Drops the checkpoint files (only these) from the page cache, so the next read comes from the disk."""
    for p in paths:
        fd = os.open(p / "adapter_model.safetensors", os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold(fn, paths):
    def run():
        evict(paths)
        return fn()
    return run


def reader_at(rev: str):
    """``lispetorch/combine/reader.py`` as it was at the git revision ``rev``, loaded as a module of its own beside
    the current one (its relative imports resolve in the current package)."""
    root = Path(__file__).resolve().parent.parent
    text = subprocess.run(["git", "-C", str(root), "show", f"{rev}:lispetorch/combine/reader.py"], check=True,
                          capture_output=True, text=True).stdout
    name = f"lispetorch.combine.reader_{rev.replace('-', '_').replace('.', '_')}"
    with tempfile.TemporaryDirectory(prefix="bench_reader.") as tmp:
        path = Path(tmp) / "reader.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        module.__package__ = "lispetorch.combine"
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


def as_current(old_stream):
    """An older ``stream`` called as the current one is: ``mapped`` accepted (the older reader reads as it reads),
    and an iterator with a ``verify`` that checks nothing (the older reader checks what it checks as it reads)."""

    class Unverified:
        def __init__(self, it) -> None:
            self.it = it

        def __iter__(self):
            return iter(self.it)

        def verify(self) -> None:
            pass

    @contextlib.contextmanager
    def stream(*args, mapped: bool = False, **kwargs):
        with old_stream(*args, **kwargs) as it:
            yield Unverified(it)

    return stream


def readers_side_by_side(cfg: dict, paths: list[Path], rev: str, reps: int) -> list[tuple]:
    """optimize with the current reader and with the one at ``rev``, alternating run by run on the same files (in
    the page cache, then evicted before each run): medians and the ratio current / ``rev``."""
    optimize_module = sys.modules["lispetorch.combine.optimize"]
    readers = {"current": optimize_module.stream, rev: as_current(reader_at(rev).stream)}
    rows = []
    for where, prepare in (("in page cache", lambda: None), ("evicted first", lambda: evict(paths))):
        times: dict[str, list[float]] = {k: [] for k in readers}
        read_all(paths)
        try:
            for i in range(reps):
                for name in (list(readers) if i % 2 == 0 else list(readers)[::-1]):
                    optimize_module.stream = readers[name]
                    prepare()
                    t0 = time.perf_counter()
                    combine.optimize(cfg, NAMES[-1])
                    times[name].append(time.perf_counter() - t0)
        finally:
            optimize_module.stream = readers["current"]
        now, then = statistics.median(times["current"]), statistics.median(times[rev])
        print(f"  optimize, files {where}: current reader {now:.4f} s, reader at {rev} {then:.4f} s (medians of "
              f"{reps}, alternating), current / {rev} {now / then:.3f}")
        rows += [(f"optimize, files {where}, reader at {rev} (s)", then, None, None),
                 (f"optimize, files {where}, current reader (s)", now, now / then, f"current / {rev} ≈ 1")]
    return rows


def dense_gram(paths: list[Path], modules: list[str], scale: float) -> torch.Tensor:
    from safetensors import safe_open

    handles = [safe_open(str(p / "adapter_model.safetensors"), framework="pt") for p in paths]
    G = torch.zeros(len(paths), len(paths), dtype=torch.float64)
    for m in modules:
        D = torch.stack([
            (scale * h.get_tensor(f"{PREFIX}{m}.lora_B.weight").double()
             @ h.get_tensor(f"{PREFIX}{m}.lora_A.weight").double()).flatten()
            for h in handles])                                                  # (k, out·in)
        G += D @ D.T
        del D
    return G


def part1(root: Path, layers: int, reps: int, dense_reps: int, against: str | None = None,
          only_readers: bool = False) -> list[tuple]:
    shapes = attention_shapes(layers, 4608, 512)
    paths = [root / n for n in NAMES]
    for i, p in enumerate(paths):
        write_checkpoint(p, shapes, 8, 16, seed=i)
    cfg = {n: str(p) for n, p in zip(NAMES, paths, strict=True)}
    size = sum((p / "adapter_model.safetensors").stat().st_size for p in paths)
    elements = sum(o * i for o, i in shapes.values())
    print(f"part 1: {len(NAMES)} checkpoints x {len(shapes)} modules ({layers} layers x q,k,v,o), "
          f"{size / 2**20:.1f} MiB of safetensors, {elements:,} ΔW elements per checkpoint")
    readers = readers_side_by_side(cfg, paths, against, reps) if against else []
    if only_readers:
        return readers
    # cold: the files evicted from the page cache before each run (timing includes the eviction's few µs)
    t_read_cold, _ = timed(cold(lambda: read_all(paths), paths), reps)
    t_opt_cold, _ = timed(cold(lambda: combine.optimize(cfg, NAMES[-1]), paths), reps)
    read_all(paths)  # warm the page cache
    t_read, _ = timed(lambda: read_all(paths), reps)
    t_opt, result = timed(lambda: combine.optimize(cfg, NAMES[-1]), reps)
    t_dense, G_dense = timed(lambda: dense_gram(paths, list(shapes), 16 / 8), dense_reps)
    ours = torch.tensor(result["gram"]["G"], dtype=torch.float64)
    ref = G_dense[:-1, :-1]
    rel = float((ours - ref).abs().max() / ref.abs().max())
    t = result["timings"]
    print(f"  weights {[round(w, 6) for w in result['global_weights']]}, relative error "
          f"{result['evaluation']['relative_error']:.6f}, KKT {'ok' if result['kkt']['satisfied'] else 'FAILED'}")
    print(f"  fused vs dense Gram: largest relative difference {rel:.2e}")
    print(f"  optimize breakdown (last run): read {t['read_s']:.3f} s, Gram {t['gram_s']:.3f} s, "
          f"total {t['total_s']:.3f} s")
    return [
        ("optimize, end to end, files in page cache (s)", t_opt, None, None),
        ("dense reference: ΔW in float64, Gram of D Dᵀ (s)", t_dense, t_dense / t_opt, "dense / optimize ≥ 300"),
        ("read the files' bytes, in page cache (s)", t_read, t_opt / t_read, "optimize / read ≤ 2"),
        ("optimize, files evicted from the page cache first (s)", t_opt_cold, None, None),
        ("read the files' bytes, evicted first (s)", t_read_cold, t_opt_cold / t_read_cold, "optimize / read ≤ 2"),
        ("fused vs dense Gram, largest relative difference", rel, None, "≤ 1e-10"),
    ] + readers


def part2(root: Path, hidden: int, layers: int, reps: int, peft_reps: int) -> list[tuple]:
    kv = hidden // 4
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                                      max_position_embeddings=128)
    torch.manual_seed(0)
    model_dir = root / "svd_model"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    shapes = attention_shapes(layers, hidden, kv)
    names, weights, rank = ["a", "b", "c"], [0.2, 0.5, 0.3], 8
    alphas = [16, 8, 32]
    for i, n in enumerate(names):
        write_checkpoint(root / n, shapes, rank, alphas[i], seed=10 + i)
    cfg = {n: str(root / n) for n in names}
    print(f"part 2: Llama hidden {hidden}, {layers} layers, q,k,v,o ({len(shapes)} modules), 3 adapters r={rank}")

    t_ours, _ = timed(lambda: combine.build(cfg, dict(zip(names, weights, strict=True)), root / "ours",
                                            mode="svd", rank=rank, overwrite=True), reps)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, cfg["a"], adapter_name="a")
    for n in names[1:]:
        model.load_adapter(cfg[n], adapter_name=n)

    def peft_svd(full: bool):
        def run():
            model.add_weighted_adapter(names, weights, "svd", combination_type="svd", svd_rank=rank,
                                       svd_full_matrices=full)
        return run

    def cleanup_timed(full):
        times = []
        for _ in range(peft_reps):
            t0 = time.perf_counter()
            peft_svd(full)()
            times.append(time.perf_counter() - t0)
            if _ < peft_reps - 1:
                model.delete_adapter("svd")
        return statistics.median(times)

    t_peft_full = cleanup_timed(True)
    from safetensors.torch import load_file

    ours = load_file(str(root / "ours" / "adapter_model.safetensors"))
    e_ours = e_peft = e_opt = total = 0.0
    for name, mod in model.named_modules():
        if not isinstance(mod, peft.tuners.lora.LoraLayer):
            continue
        key = name.removeprefix(PREFIX)
        exact = sum(w * mod.get_delta_weight(n).detach().double() for n, w in zip(names, weights, strict=True))
        S = torch.linalg.svdvals(exact)
        e_opt += float(S[rank:].square().sum())
        total += float(S.square().sum())
        mine = ours[f"{PREFIX}{key}.lora_B.weight"].double() @ ours[f"{PREFIX}{key}.lora_A.weight"].double()
        e_ours += float((mine - exact).square().sum())
        e_peft += float((mod.get_delta_weight("svd").detach().double() - exact).square().sum())
    model.delete_adapter("svd")
    t_peft_thin = cleanup_timed(False)
    rel = {k: math.sqrt(v / total) for k, v in (("ours", e_ours), ("peft", e_peft), ("opt", e_opt))}
    print(f"  relative error of the rank-{rank} result vs the exact weighted sum: lispetorch {rel['ours']:.6f}, "
          f"PEFT {rel['peft']:.6f}, optimum (Eckart–Young) {rel['opt']:.6f}")
    return [
        ("svd build, lispetorch: files in, PEFT directory out (s)", t_ours, None, None),
        ("PEFT add_weighted_adapter svd, in memory (s)", t_peft_full, t_peft_full / t_ours, "PEFT / ours ≥ 100"),
        ("PEFT add_weighted_adapter svd, svd_full_matrices=False (s)", t_peft_thin, t_peft_thin / t_ours,
         "PEFT / ours ≥ 100"),
        ("svd relative error, lispetorch / optimum", rel["ours"], rel["ours"] / rel["opt"], "1"),
        ("svd relative error, PEFT / optimum", rel["peft"], rel["peft"] / rel["opt"], "1"),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: small sizes, 2 repetitions")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of the fast measurements (default 7)")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--against", metavar="REV", help="also run optimize with the checkpoint reader of this git "
                        "revision, alternating with the current one (b75d751: views of the mapped files)")
    parser.add_argument("--only-readers", action="store_true", help="with --against: only the readers side by side")
    args = parser.parse_args(argv)
    reps = args.reps or (2 if args.quick else 7)
    layers, svd_hidden, svd_layers = (2, 256, 2) if args.quick else (32, 2048, 2)
    dense_reps, peft_reps = (1, 1) if args.quick else (1, 3)
    header = (f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
              f"lispetorch {lt.__version__}; threads {torch.get_num_threads()}")
    print(header)
    with tempfile.TemporaryDirectory(prefix="bench_combine.") as tmp:
        rows = part1(Path(tmp), layers, reps, dense_reps, args.against, args.only_readers)
        if not args.only_readers:
            rows += part2(Path(tmp), svd_hidden, svd_layers, reps, peft_reps)
    lines = [header, "", "| measurement | value | ratio | goal |", "|---|---|---|---|"]
    for name, value, ratio, goal in rows:
        v = f"{value:.2e}" if value < 1e-3 else f"{value:.4f}" if value < 10 else f"{value:.1f}"
        r = "" if ratio is None else f"{ratio:.1f}" if ratio >= 10 else f"{ratio:.3f}"
        lines.append(f"| {name} | {v} | {r} | {goal or ''} |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
