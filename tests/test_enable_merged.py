"""Enable/disable on a merged model, as PEFT does it: disabling unmerges exactly (the base model, bit for bit),
enabling merges back (the merged weights, bit for bit)."""

from __future__ import annotations

import pytest
import torch
from conftest import load, logits, randomize_adapters

import lispetorch as lt

peft = pytest.importorskip("peft")


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def same(model, snapshot):
    state = model.state_dict()
    return all(torch.equal(state[k], v) for k, v in snapshot.items())


def test_disabling_a_merged_model_gives_the_base_model_bit_for_bit(model_dirs, input_ids):
    model = load(model_dirs["llama"])
    base = logits(model, input_ids)
    lt.inject(model, lt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_adapters(model)
    adapted = logits(model, input_ids)
    unmerged = weights(model)
    lt.merge(model)
    merged = weights(model)
    merged_logits = logits(model, input_ids)
    assert not same(model, unmerged)
    lt.set_enabled(model, False)
    assert same(model, unmerged) and not lt.is_merged(model)
    assert torch.equal(logits(model, input_ids), base)
    lt.set_enabled(model, True)
    assert same(model, merged) and lt.is_merged(model)
    assert torch.equal(logits(model, input_ids), merged_logits)
    torch.testing.assert_close(merged_logits, adapted, rtol=1e-5, atol=1e-5)
    with lt.disabled(model):
        assert same(model, unmerged) and torch.equal(logits(model, input_ids), base)
    assert same(model, merged) and lt.is_merged(model)
    with pytest.raises(KeyError):
        with lt.disabled(model):
            raise KeyError("boom")
    assert same(model, merged)
    # unmerged on purpose while disabled: enabling does not merge it back
    lt.set_enabled(model, False)
    lt.unmerge(model)
    lt.set_enabled(model, True)
    assert not lt.is_merged(model) and same(model, unmerged)
    assert torch.equal(logits(model, input_ids), adapted)


def test_the_same_as_peft_disabling_its_merged_model(model_dirs, input_ids, tmp_path):
    model = load(model_dirs["qwen2"])
    base = logits(model, input_ids)
    lt.inject(model, lt.LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    randomize_adapters(model)
    lt.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(load(model_dirs["qwen2"]), tmp_path / "a")
    theirs.merge_adapter()
    lt.merge(model)
    theirs.base_model.disable_adapter_layers()
    lt.set_enabled(model, False)
    torch.testing.assert_close(logits(theirs, input_ids), logits(model, input_ids), rtol=1e-5, atol=1e-5)
    # PEFT unmerges a merged adapter to disable it (at its next forward)
    assert not any(m.merged for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert torch.equal(logits(model, input_ids), base)
