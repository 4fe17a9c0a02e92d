"""Merged export of a model of several shards, lispetorch's streaming ``lt.export_merged`` against PEFT's
``merge_and_unload`` + ``save_pretrained`` (CPU, float32).

A ``LlamaForCausalLM`` (hidden 1024, intermediate 2816, 8 layers, vocabulary 32000: about 680 MB; ``--quick``:
hidden 512, 4 layers, vocabulary 16000: about 100 MB) is built from a fixed seed and saved in 8 safetensors shards
(``save_pretrained(max_shard_size=…)``); a PEFT LoRA adapter (r=16, all linear layers, random B) is saved beside
it. Each side then runs in its own child process, which only imports the libraries, does the export and
reports its time (``time.perf_counter``; ``--threads N`` sets torch's threads in both) and the peak resident
memory its export added (``VmHWM``, reset after the imports through ``/proc/self/clear_refs``, less the RSS
before the export); the parent reads the process's whole peak from ``os.wait4`` (``ru_maxrss``); a child that
imports the same libraries and does nothing shows the floor.

- lispetorch: ``lt.export_merged(adapter, model, out)``;
- PEFT: ``AutoModelForCausalLM.from_pretrained(model)``, ``PeftModel.from_pretrained(…, adapter)``,
  ``merge_and_unload()``, ``save_pretrained(out, max_shard_size=…)`` (the same shard size).

The two outputs are checked to hold the same tensors (within 1e-5). Goals: the peak lispetorch's export adds
≤ 1.5 × the largest shard + the adapter file, and ≤ 0.5 × PEFT's.

    python benchmarks/bench_merged_export.py
    python benchmarks/bench_merged_export.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

MIB = 1 << 20

CHILD = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import torch, transformers, peft, lispetorch as lt
side, adapter, model, out, shard, threads = sys.argv[1:7]
if int(threads):
    torch.set_num_threads(int(threads))
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
start = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # the peak so far (the imports') forgotten: VmHWM restarts here
    f.write("5")
t0 = time.perf_counter()
if side == "ours":
    lt.export_merged(adapter, model, out)
elif side == "peft":
    base = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(out, max_shard_size=shard)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "added": status("VmHWM") - start}))
"""


def build(quick: bool, directory: Path) -> tuple[Path, Path, str]:
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=512 if quick else 1024, intermediate_size=1408 if quick else 2816,
        num_hidden_layers=4 if quick else 8, num_attention_heads=8, num_key_value_heads=8,
        vocab_size=16000 if quick else 32000, max_position_embeddings=256)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    shard = f"{max(1, total // 8 // 1000)}KB"
    model_dir = directory / "model"
    model.save_pretrained(model_dir, max_shard_size=shard)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                    init_lora_weights=False))
    adapter = directory / "adapter"
    pm.save_pretrained(adapter)
    return model_dir, adapter, shard


def run_child(side: str, adapter: Path, model: Path, out: Path, shard: str, threads: int) -> tuple[float, float, float]:
    """``(seconds, peak RSS, peak RSS added by the export)`` of one side in a fresh process, in MiB: the process's
    ``ru_maxrss``, and its ``VmHWM`` (reset after the imports through ``/proc/self/clear_refs``) less its RSS
    before the export."""
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, side, str(adapter), str(model), str(out), shard,
                             str(threads)], stdout=subprocess.PIPE, env=env)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed with exit code {proc.returncode}")
    report = json.loads(stdout.decode().strip().splitlines()[-1])
    return report["seconds"], usage.ru_maxrss * 1024 / MIB, report["added"] / MIB


def same_tensors(a: Path, b: Path) -> float:
    """The largest difference between the tensors of two model directories (which must hold the same keys)."""
    from safetensors import safe_open

    def tensors(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out

    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        raise RuntimeError(f"the outputs hold different tensors: {sorted(set(ta) ^ set(tb))[:5]}")
    return max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each side's process (0: default)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, adapter, shard = build(args.quick, tmp)
        shards = sorted(model_dir.glob("*.safetensors"))
        biggest = max(f.stat().st_size for f in shards) / MIB
        model_size = sum(f.stat().st_size for f in shards) / MIB
        adapter_size = (adapter / "adapter_model.safetensors").stat().st_size / MIB
        _, floor, _ = run_child("none", adapter, model_dir, tmp / "none", shard, args.threads)
        t_ours, rss_ours, added_ours = run_child("ours", adapter, model_dir, tmp / "ours", shard, args.threads)
        t_peft, rss_peft, added_peft = run_child("peft", adapter, model_dir, tmp / "peft", shard, args.threads)
        diff = same_tensors(tmp / "ours", tmp / "peft")
        if diff > 1e-5:
            raise RuntimeError(f"the merged outputs differ by {diff:.2e}")
    bound = 1.5 * biggest + adapter_size
    print(f"model {model_size:.1f} MiB in {len(shards)} shards (largest {biggest:.1f} MiB), adapter "
          f"{adapter_size:.1f} MiB; a process with the libraries imported peaks at {floor:.0f} MiB; "
          f"max |ours - PEFT| {diff:.1e}\n")
    print("| side | time (s) | peak RSS of the process (MiB) | peak added by the export (MiB) | in largest shards |")
    print("| --- | --- | --- | --- | --- |")
    for name, t, rss, added in (("lispetorch export_merged", t_ours, rss_ours, added_ours),
                                ("PEFT merge_and_unload + save_pretrained", t_peft, rss_peft, added_peft)):
        print(f"| {name} | {t:.2f} | {rss:.0f} | {added:.1f} | {added / biggest:.2f} |")
    print(f"| lispetorch / PEFT | {t_ours / t_peft:.2f} | {rss_ours / rss_peft:.2f} | {added_ours / added_peft:.2f} "
          "| |")
    print(f"\npeak added ≤ 1.5 shards + adapter ({bound:.1f} MiB): {'met' if added_ours <= bound else 'not met'}"
          f"; ≤ 0.5 × PEFT's: {'met' if added_ours <= 0.5 * added_peft else 'not met'}")


if __name__ == "__main__":
    main()
