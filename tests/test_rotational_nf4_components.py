"""Rotational PiSSA's quantize_base_components: U_r and V_r (the frozen B and A) held in NF4 only, the memory
measured; the adapted model, its training, merge, export and deletion unchanged by it."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load, logits

import lispetorch as lt
from lispetorch import ops
from lispetorch.nf4 import NF4Weight

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def nf4_bytes(numel, blocksize=64):
    return math.ceil(numel / 2) + 4 * math.ceil(numel / blocksize)


def test_u_and_v_are_stored_in_nf4_and_memory_is_saved(model_dirs, input_ids, tmp_path):
    base = logits(load(model_dirs["llama"]), input_ids)
    r = 8
    dense = load(model_dirs["llama"])
    lt.inject(dense, lt.RotationalPiSSAConfig(r=r, lora_alpha=8, method="way0", target_modules=TARGETS))
    quant = load(model_dirs["llama"])
    layers = lt.inject(quant, lt.RotationalPiSSAConfig(r=r, lora_alpha=8, method="way0", target_modules=TARGETS,
                                                        quantize_base_components=True))
    # the saving, exactly: each layer's A and B, and the base offset's copies of them, become one NF4 pair
    saved = 0
    for layer in layers.values():
        a, b = r * layer.in_features, layer.out_features * r
        saved += 2 * 4 * (a + b) - nf4_bytes(a) - nf4_bytes(b)
    assert lt.memory_usage(dense) - lt.memory_usage(quant) == saved
    assert saved > 0.8 * sum(2 * 4 * r * (la.in_features + la.out_features) for la in layers.values())
    # the factors are the NF4 rounding of the SVD factors; the residual absorbs it: the base model's output at init
    for name, layer in layers.items():
        A, B, _ = layer.factors("default")
        w = load(model_dirs["llama"]).get_submodule(name).weight
        U, S, Vh = ops.svd_factors(w, r)
        assert torch.equal(A, NF4Weight(Vh).dequantize()) and torch.equal(B, NF4Weight(U).dequantize())
        assert layer.lora_A["default"].numel() == 0 and not layer.lora_A["default"].requires_grad
    torch.testing.assert_close(logits(quant, input_ids), base, rtol=1e-4, atol=1e-4)
    # it trains (the cores), merges and unmerges exactly, and exports to PEFT
    opt = torch.optim.SGD(lt.trainable_parameters(quant), lr=0.05)
    for _ in range(2):
        quant(input_ids, labels=input_ids).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = logits(quant, input_ids)
    assert not torch.allclose(trained, base, atol=1e-4)
    before = {k: v.clone() for k, v in quant.state_dict().items()}
    lt.merge(quant)
    torch.testing.assert_close(logits(quant, input_ids), trained, rtol=1e-4, atol=1e-4)
    lt.unmerge(quant)
    assert all(torch.equal(quant.state_dict()[k], v) for k, v in before.items())
    lt.save_as_lora(quant, tmp_path / "plain")
    theirs = peft.PeftModel.from_pretrained(load(model_dirs["llama"]), tmp_path / "plain")
    torch.testing.assert_close(logits(theirs, input_ids), trained, rtol=1e-4, atol=1e-4)
    # deleted: the base weights back (to rounding), the NF4 storage gone
    lt.delete_adapter(quant, "default")
    torch.testing.assert_close(logits(quant, input_ids), base, rtol=1e-4, atol=1e-4)


def test_only_frozen_factors_go_to_nf4(model_dirs):
    model = load(model_dirs["llama"])
    layers = lt.inject(model, lt.LoraConfig(r=4, target_modules=["q_proj"]))
    layer = next(iter(layers.values()))
    A, B, _ = layer.factors("default")
    with pytest.raises(lt.AdapterStateError, match="only frozen A and B"):
        layer.store_factors_nf4("default", NF4Weight(A.detach()), NF4Weight(B.detach()))
