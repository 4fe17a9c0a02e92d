"""The Python API on real transformers models: inject, match, freeze, merge, enable, switch, memory."""

from __future__ import annotations

import pytest
import torch
from conftest import load, logits, randomize_adapters

import lispetorch as lt


def test_inject_freezes_all_but_adapters(model_dirs):
    model = load(model_dirs["llama"])
    layers = lt.inject(model, lt.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    assert sorted(layers) == [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    params = lt.trainable_parameters(model)
    assert len(params) == 8
    assert {id(p) for p in params} == {
        id(p) for layer in layers.values() for p in (layer.lora_A["default"], layer.lora_B["default"])
    }
    assert all(isinstance(model.get_submodule(n), lt.LoraLinear) for n in layers)


def test_adapted_model_equals_base_at_init_and_differs_after(model_dirs, input_ids):
    model = load(model_dirs["qwen2"])
    base = logits(model, input_ids)
    lt.inject(model, lt.LoraConfig(r=4, target_modules="all-linear"))
    assert torch.equal(logits(model, input_ids), base)  # B = 0
    randomize_adapters(model)
    assert not torch.allclose(logits(model, input_ids), base)


def test_all_linear_excludes_head_and_covers_conv1d(model_dirs):
    llama = load(model_dirs["llama"])
    names = lt.inject(llama, lt.LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in names and len(names) == 2 * 7
    gpt2 = load(model_dirs["gpt2"])
    names = lt.inject(gpt2, lt.LoraConfig(target_modules="all-linear"))
    assert sorted({n.rsplit(".", 1)[-1] for n in names}) == ["c_attn", "c_fc", "c_proj"]
    assert all(layer.fan_in_fan_out for layer in names.values())


def test_regex_and_exclude(model_dirs):
    model = load(model_dirs["llama"])
    names = lt.inject(model, lt.LoraConfig(target_modules=r".*layers\.1\.self_attn\.(q|k)_proj",
                                           exclude_modules=["k_proj"]))
    assert list(names) == ["model.layers.1.self_attn.q_proj"]


def test_no_match_lists_adaptable_names(model_dirs):
    model = load(model_dirs["llama"])
    with pytest.raises(ValueError, match=r"matches no adaptable module.*'down_proj'.*'q_proj'"):
        lt.inject(model, lt.LoraConfig(target_modules=["c_attn"]))
    assert not lt.adapter_layers(model)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"r": -3}, "r must be a positive integer, got -3"),
        ({"alpha": 0}, "alpha must be a positive number, got 0"),
        ({"alpha": -1.5}, "alpha must be a positive number, got -1.5"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\), got -0.1"),
        ({"init": "xavier"}, "init must be one of"),
        ({"target_modules": []}, "target_modules must be a non-empty list"),
        ({"target_modules": "(unclosed"}, "not a valid regular expression"),
    ],
)
def test_config_rejects_bad_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lt.LoraConfig(**kwargs)


def test_injecting_twice_is_an_error_and_changes_nothing(model_dirs):
    model = load(model_dirs["llama"])
    cfg = lt.LoraConfig(r=4, target_modules=["q_proj"])
    lt.inject(model, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="already injected"):
        lt.inject(model, cfg)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert not isinstance(layer.base_layer, lt.LoraLinear) and list(layer.lora_A) == ["default"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_matches_unmerged_and_unmerge_restores(model_dirs, input_ids, arch):
    model = load(model_dirs[arch])
    lt.inject(model, lt.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(model)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    unmerged = logits(model, input_ids)
    lt.merge(model)
    lt.merge(model)  # idempotent: merging twice is merging once
    assert lt.is_merged(model)
    torch.testing.assert_close(logits(model, input_ids), unmerged, rtol=1e-5, atol=1e-5)
    lt.unmerge(model)
    lt.unmerge(model)
    state = model.state_dict()
    assert all(torch.equal(state[k], w) for k, w in weights.items())
    torch.testing.assert_close(logits(model, input_ids), unmerged, rtol=0, atol=0)


def test_bf16_model_merge_cycles_are_exact(model_dirs, input_ids):
    model = load(model_dirs["llama"]).to(torch.bfloat16)
    lt.inject(model, lt.LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    randomize_adapters(model, std=0.2)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    for _ in range(50):
        lt.merge(model)
        lt.unmerge(model)
    assert all(torch.equal(model.state_dict()[k], w) for k, w in weights.items())


def test_unmerge_after_change_falls_back_to_subtraction(model_dirs):
    model = load(model_dirs["llama"])
    layers = lt.inject(model, lt.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(model)
    layer = next(iter(layers.values()))
    w0 = layer.base_layer.weight.clone()
    lt.merge(model)
    with torch.no_grad():
        layer.lora_B["default"].zero_()
    with pytest.warns(UserWarning, match="changed while merged"):
        lt.unmerge(model)
    assert not torch.equal(layer.base_layer.weight, w0)  # the subtraction used the new (zero) delta


def test_failed_merge_leaves_model_unchanged(model_dirs):
    model = load(model_dirs["llama"])
    layers = lt.inject(model, lt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    with torch.no_grad():
        list(layers.values())[-1].lora_B["default"].fill_(1e30)
        list(layers.values())[-1].lora_A["default"].fill_(1e30)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    with pytest.raises(RuntimeError, match="merge refused"):
        lt.merge(model)
    assert not lt.is_merged(model)
    assert all(torch.equal(model.state_dict()[k], w) for k, w in weights.items())


def test_set_enabled_and_context_manager(model_dirs, input_ids):
    model = load(model_dirs["llama"])
    base = logits(model, input_ids)
    lt.inject(model, lt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    adapted = logits(model, input_ids)
    lt.set_enabled(model, False)
    assert torch.equal(logits(model, input_ids), base)
    lt.set_enabled(model, True)
    assert torch.equal(logits(model, input_ids), adapted)
    with pytest.raises(KeyError):
        with lt.disabled(model):
            assert torch.equal(logits(model, input_ids), base)
            raise KeyError("boom")
    assert torch.equal(logits(model, input_ids), adapted)


def test_named_adapters_switch(model_dirs, input_ids):
    model = load(model_dirs["llama"])
    lt.inject(model, lt.LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="a")
    randomize_adapters(model, "a")
    out_a = logits(model, input_ids)
    lt.inject(model, lt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), adapter_name="b")
    randomize_adapters(model, "b", std=0.1)
    assert lt.active_adapter(model) == "b"
    out_b = logits(model, input_ids)
    assert not torch.allclose(out_a, out_b)
    assert all(p.shape[0] == 2 or p.shape[1] == 2 for p in lt.trainable_parameters(model))
    lt.set_adapter(model, "a")
    assert torch.equal(logits(model, input_ids), out_a)
    assert len(lt.trainable_parameters(model)) == 4
    with pytest.raises(ValueError, match=r"no adapter named 'c'; the model has \['a', 'b'\]"):
        lt.set_adapter(model, "c")
    lt.delete_adapter(model, "b")
    assert lt.adapter_names(model) == ["a"]
    assert isinstance(model.get_submodule("model.layers.0.self_attn.v_proj"), torch.nn.Linear)


def test_training_step_changes_only_adapters(model_dirs, input_ids):
    model = load(model_dirs["gpt2"])
    lt.inject(model, lt.LoraConfig(r=4, dropout=0.1, target_modules="all-linear"))
    model.train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW(lt.trainable_parameters(model), lr=1e-2)
    for _ in range(3):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert any(state[k].abs().sum() > 0 for k in state if "lora_B" in k)


def test_memory_usage_counts_adapters_and_merge_state(model_dirs):
    model = load(model_dirs["llama"])
    base = lt.memory_usage(model)
    assert base == sum(p.numel() * 4 for p in model.parameters()) - (0 if not model.config.tie_word_embeddings else
                                                                     model.lm_head.weight.numel() * 4) + sum(
        b.untyped_storage().nbytes() for b in model.buffers())
    lt.inject(model, lt.LoraConfig(r=4, target_modules=["q_proj"]))
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    adapter = (q.lora_A["default"].numel() + q.lora_B["default"].numel()) * 4
    assert lt.memory_usage(model) == base + 2 * adapter
    lt.merge(model)
    assert lt.memory_usage(model) >= base + 2 * adapter + 2 * q.base_layer.weight.numel()  # int8 state
