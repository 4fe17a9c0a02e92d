"""Adapters written here load in the real PEFT package with the same logits, and the other way round; bad
adapter directories give errors that name the file, and leave the model as it was."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import ARCHS, load, logits, randomize_adapters

import lispetorch as lt

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": "all-linear", "gpt2": ["c_attn", "c_proj"]}


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_here_loads_in_peft(model_dirs, input_ids, tmp_path, arch):
    model = load(model_dirs[arch])
    lt.inject(model, lt.LoraConfig(r=4, alpha=12, dropout=0.05, target_modules=TARGETS[arch]))
    randomize_adapters(model)
    ours = logits(model, input_ids)
    lt.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 12
    assert config["base_model_name_or_path"] == str(model_dirs[arch])
    assert config["fan_in_fan_out"] == (arch == "gpt2")

    theirs = peft.PeftModel.from_pretrained(load(model_dirs[arch]), tmp_path / "adapter")
    theirs.eval()
    torch.testing.assert_close(logits(theirs, input_ids), ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(load(model_dirs[arch]), input_ids), ours, atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rslora", [False, True])
def test_saved_by_peft_loads_here(model_dirs, input_ids, tmp_path, arch, rslora):
    theirs = peft.get_peft_model(
        load(model_dirs[arch]),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False, use_rslora=rslora,
                        rank_pattern={"q_proj": 2, "c_attn": 2}, alpha_pattern={"v_proj": 3}),
    )
    theirs.eval()
    expected = logits(theirs, input_ids)
    theirs.save_pretrained(tmp_path / "peft")
    model = load(model_dirs[arch])
    layers = lt.load_adapter(model, tmp_path / "peft")
    assert layers
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=1e-5, atol=1e-5)
    # and it round-trips through our writer into PEFT again
    lt.save_adapter(model, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(load(model_dirs[arch]), tmp_path / "again")
    again.eval()
    torch.testing.assert_close(logits(again, input_ids), expected, rtol=1e-5, atol=1e-5)


def test_starcoder2_round_trip(model_dirs, input_ids, tmp_path):
    model = load(model_dirs["starcoder2"])
    lt.inject(model, lt.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    lt.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(load(model_dirs["starcoder2"]), tmp_path / "a").eval()
    torch.testing.assert_close(logits(theirs, input_ids), logits(model, input_ids), rtol=1e-5, atol=1e-5)


def test_partial_layers_get_an_exact_target_expression(model_dirs, input_ids, tmp_path):
    model = load(model_dirs["llama"])
    lt.inject(model, lt.LoraConfig(r=2, target_modules=r"model\.layers\.1\.self_attn\.q_proj"))
    randomize_adapters(model)
    lt.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(load(model_dirs["llama"]), tmp_path / "a").eval()
    lora_layers = [n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(lora_layers) == 1
    torch.testing.assert_close(logits(theirs, input_ids), logits(model, input_ids), rtol=1e-5, atol=1e-5)


def test_load_replaces_same_named_adapter(model_dirs, input_ids, tmp_path):
    model = load(model_dirs["llama"])
    lt.inject(model, lt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    expected = logits(model, input_ids)
    lt.save_adapter(model, tmp_path / "a")
    other = load(model_dirs["llama"])
    lt.inject(other, lt.LoraConfig(r=8, target_modules=["k_proj"]))
    lt.load_adapter(other, tmp_path / "a")
    assert sorted(n.rsplit(".", 1)[-1] for n in lt.adapter_layers(other)) == ["k_proj", "k_proj", "q_proj",
                                                                              "q_proj", "v_proj", "v_proj"]
    assert not lt.adapter_layers(other)["model.layers.0.self_attn.k_proj"].lora_A  # stale adapter removed
    torch.testing.assert_close(logits(other, input_ids), expected, rtol=1e-6, atol=1e-6)


# --- bad input ---------------------------------------------------------------------------------------------
@pytest.fixture
def saved(model_dirs, tmp_path):
    model = load(model_dirs["llama"])
    lt.inject(model, lt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    lt.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snap):
    state = model.state_dict()
    assert state.keys() == snap.keys() and all(torch.equal(state[k], v) for k, v in snap.items())


def test_shape_mismatch_names_key_and_shapes_and_leaves_model(model_dirs, saved):
    from safetensors.torch import load_file, save_file

    path = saved / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = torch.zeros(40, 4)
    save_file(tensors, path)
    model = load(model_dirs["llama"])
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"v_proj\.lora_B\.weight has shape \(40, 4\) but the model needs \(32, 4\)"):
        lt.load_adapter(model, saved)
    assert_unchanged(model, snap)
    assert not lt.adapter_layers(model)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: os.remove(d / "adapter_model.safetensors"), r"adapter_model\.safetensors: missing"),
        (lambda d: os.remove(d / "adapter_config.json"), r"adapter_config\.json: missing"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:100]),
         r"adapter_model\.safetensors: not a readable safetensors file"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 64),
         r"adapter_model\.safetensors: not a readable safetensors file"),
        (lambda d: (d / "adapter_config.json").write_text('{"r": 4,\n "lora_alpha": }'),
         r"adapter_config\.json: not valid JSON \(line 2"),
        (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "IA3"}'), "only LORA adapters"),
    ],
)
def test_damaged_directory_names_the_file(model_dirs, saved, damage, message):
    damage(saved)
    model = load(model_dirs["llama"])
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        lt.load_adapter(model, saved)
    assert_unchanged(model, snap)


def test_key_for_missing_module(model_dirs, saved):
    from safetensors.torch import load_file, save_file

    path = saved / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"names module 'model\.layers\.9\.self_attn\.q_proj'"):
        lt.load_adapter(load(model_dirs["llama"]), saved)


def test_missing_directory(model_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lt.load_adapter(load(model_dirs["llama"]), tmp_path / "nope")


def test_crash_during_save_keeps_previous_adapter(model_dirs, input_ids, saved, monkeypatch):
    import safetensors.torch

    model = load(model_dirs["llama"])
    lt.load_adapter(model, saved)
    expected = logits(model, input_ids)
    randomize_adapters(model, std=0.3)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        lt.save_adapter(model, saved)
    monkeypatch.undo()
    assert sorted(p.name for p in saved.parent.iterdir()) == ["adapter"]  # no temporary left behind
    fresh = load(model_dirs["llama"])
    lt.load_adapter(fresh, saved)
    torch.testing.assert_close(logits(fresh, input_ids), expected, rtol=0, atol=0)


def test_overwriting_save_replaces_whole_directory(model_dirs, input_ids, saved):
    (saved / "stale.txt").write_text("old")
    model = load(model_dirs["llama"])
    lt.inject(model, lt.LoraConfig(r=2, target_modules=["k_proj"]))
    randomize_adapters(model)
    lt.save_adapter(model, saved)
    assert sorted(p.name for p in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = load(model_dirs["llama"])
    lt.load_adapter(fresh, saved)
    torch.testing.assert_close(logits(fresh, input_ids), logits(model, input_ids), rtol=0, atol=0)
