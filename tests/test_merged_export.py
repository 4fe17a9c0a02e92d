"""The streaming merged export (`lt.export_merged`, `lispetorch export`) against the real PEFT package and real
transformers checkpoints of several shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import load, logits, tiny_config

import lispetorch as lt

peft = pytest.importorskip("peft")


def sharded(tmp_path, arch, shard="60KB", tie=None):
    """A tiny model saved in several safetensors shards, with a tokenizer-like extra file."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    config = tiny_config(arch)
    if tie is not None:
        config.tie_word_embeddings = tie
    model = AutoModelForCausalLM.from_config(config)
    d = tmp_path / f"{arch}-model"
    model.save_pretrained(d, max_shard_size=shard)
    (d / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    return d


def peft_adapter(model_dir, out, **config):
    torch.manual_seed(3)
    model = peft.get_peft_model(load(model_dir), peft.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    return out


CASES = [
    ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"q_proj": 2},
                   alpha_pattern={r"layers\.1\.mlp\.down_proj": 3}, modules_to_save=["lm_head"]), False),
    ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=True), None),
    ("gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True,
                  rank_pattern={r"h\.0\.attn\.c_proj": 2}, modules_to_save=["ln_f"]), None),
]


@pytest.mark.parametrize(("arch", "config", "tie"), CASES)
def test_export_gives_the_merged_models_logits(tmp_path, input_ids, arch, config, tie):
    from transformers import AutoModelForCausalLM

    model_dir = sharded(tmp_path, arch, tie=tie)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    adapter = peft_adapter(model_dir, tmp_path / "adapter", **config)
    out = lt.export_merged(adapter, model_dir, tmp_path / "merged")
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == shards
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == index["weight_map"]
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}\n'
    theirs = peft.PeftModel.from_pretrained(load(model_dir), adapter).merge_and_unload()
    ours = load(model_dir)
    lt.load_adapter(ours, adapter)
    adapted = logits(ours, input_ids)
    lt.merge_and_unload(ours)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = logits(exported, input_ids)
    assert not torch.allclose(got, logits(load(model_dir), input_ids), atol=1e-3)
    torch.testing.assert_close(got, logits(theirs, input_ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, logits(ours, input_ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, adapted, rtol=1e-5, atol=1e-5)


def test_export_of_a_single_file_model_and_a_dtype(model_dirs, tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    adapter = peft_adapter(model_dirs["llama"], tmp_path / "adapter", r=4, target_modules=["q_proj", "o_proj"])
    out = lt.export_merged(adapter, model_dirs["llama"], tmp_path / "merged", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    theirs = peft.PeftModel.from_pretrained(load(model_dirs["llama"]), adapter).merge_and_unload()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.dtype == torch.bfloat16
    torch.testing.assert_close(logits(exported.float(), input_ids), logits(theirs, input_ids), rtol=0.05, atol=0.05)


def _snapshot(path: Path) -> dict:
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_existing_output_refused_unless_overwrite(model_dirs, tmp_path):
    adapter = peft_adapter(model_dirs["gpt2"], tmp_path / "adapter", r=2, target_modules=["c_attn"])
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="merged.*overwrite"):
        lt.export_merged(adapter, model_dirs["gpt2"], out)
    assert _snapshot(out) == {Path("keep.txt"): b"mine"}
    lt.export_merged(adapter, model_dirs["gpt2"], out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(lt.ConfigError, match="input directory"):
        lt.export_merged(adapter, model_dirs["gpt2"], model_dirs["gpt2"], overwrite=True)


def test_an_adapter_for_another_model_is_refused_and_nothing_written(model_dirs, tmp_path):
    adapter = peft_adapter(model_dirs["llama"], tmp_path / "adapter", r=2, target_modules=["q_proj"])
    with pytest.raises(lt.AdapterFormatError, match="q_proj.*no tensor"):
        lt.export_merged(adapter, model_dirs["gpt2"], tmp_path / "merged")
    assert list(tmp_path.iterdir()) == [tmp_path / "adapter"]


def test_shape_mismatch_names_the_key(model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = peft_adapter(model_dirs["llama"], tmp_path / "adapter", r=2, target_modules=["q_proj"])
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, 2)
    save_file(tensors, str(path))
    with pytest.raises(lt.ShapeError, match="q_proj.*do not fit"):
        lt.export_merged(adapter, model_dirs["llama"], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_command_line(model_dirs, tmp_path, input_ids):
    adapter = peft_adapter(model_dirs["gpt2"], tmp_path / "adapter", r=2, target_modules=["c_attn"])
    cmd = [sys.executable, "-m", "lispetorch.cli", "export", str(adapter), "--model", str(model_dirs["gpt2"]),
           "--out", str(tmp_path / "merged")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists" in again.stderr and "--overwrite" in again.stderr
    done = subprocess.run([*cmd, "--overwrite", "--dtype", "float16"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "float16"


_SLOW_EXPORT = """
import sys, time
import lispetorch.merged_export as me
write = me._write_shard
def slow(*a, **k):
    n = write(*a, **k)
    print("shard", flush=True)
    time.sleep(30)
    return n
me._write_shard = slow
me.export_merged(sys.argv[1], sys.argv[2], sys.argv[3])
"""


def test_kill_9_leaves_no_output_that_looks_complete(tmp_path):
    model_dir = sharded(tmp_path, "llama")
    adapter = peft_adapter(model_dir, tmp_path / "adapter", r=2, target_modules=["q_proj"])
    out = tmp_path / "merged"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_EXPORT, str(adapter), str(model_dir), str(out)],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"})
    try:
        assert proc.stdout.readline().strip() == "shard"  # one shard written, the export under way
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.1)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    visible = [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert sorted(visible) == ["adapter", "llama-model"]
