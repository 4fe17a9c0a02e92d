"""A model loaded by transformers with bitsandbytes 4-bit NF4 layers (the TinyLoRA trainer's setup) is adapted
as it is: its layers become NF4Linear holding the very same codes and absmax; a tiny_lora_v.pt written by the
trainer's procedure on such a model is restored on another one with the same logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import load, logits
from torch import nn

import lispetorch as lt
from lispetorch.layer import base_of
from lispetorch.nf4 import NF4Linear

bnb = pytest.importorskip("bitsandbytes")
SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_4bit(model_dir, double_quant=True):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                           bnb_4bit_compute_dtype=torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, device_map="cpu",
                                                     dtype=torch.float32)
    except Exception as e:  # a bitsandbytes build without 4-bit support on this machine
        pytest.skip(f"bitsandbytes cannot load a 4-bit model here: {e}")
    return model.eval()


def dequantized(layer):
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def dense_twin(model_dir, quantized):
    """The float32 model whose linear weights are the 4-bit model's, dequantised by bitsandbytes (before any
    forward of the 4-bit model: on the CPU its first forward converts the weights for its own kernel)."""
    model = load(model_dir)
    with torch.no_grad():
        for name, mod in quantized.named_modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                model.get_submodule(name).weight.copy_(dequantized(mod))
    return model


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_layers_are_read_exactly_and_adapted(model_dirs, input_ids, double_quant):
    model = load_4bit(model_dirs["qwen2"], double_quant)
    before = logits(dense_twin(model_dirs["qwen2"], model), input_ids)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    w = dequantized(layer)
    nf4 = NF4Linear.from_bitsandbytes(layer)
    assert torch.equal(nf4.weight, w) and nf4.qweight.nbytes() < w.numel()  # about half a byte a value
    layers = lt.inject(model, lt.LoraConfig(r=4, target_modules="all-linear"))  # every 4-bit layer: ours alone
    assert len(layers) == 14 and all(isinstance(base_of(m), NF4Linear) for m in layers.values())
    assert torch.equal(base_of(layers["model.layers.0.self_attn.q_proj"]).weight, w)
    torch.testing.assert_close(logits(model, input_ids), before, rtol=1e-5, atol=1e-5)  # B = 0: the 4-bit model
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    assert all(p.grad is not None for p in lt.trainable_parameters(model))
    # quantize_nf4 takes them as they are too
    other = load_4bit(model_dirs["qwen2"], double_quant)
    done = lt.quantize_nf4(other)
    assert len(done) == 14 and torch.equal(done["model.layers.0.self_attn.q_proj"].weight, w)


def test_a_trainer_file_restores_on_a_4bit_model(model_dirs, tmp_path, input_ids):
    model = load_4bit(model_dirs["qwen2"])
    u, r, seed = 4, 2, 42
    torch.manual_seed(seed)
    deltas = {}
    v = (torch.randn(u, generator=torch.Generator().manual_seed(5)) * 0.5).to(torch.bfloat16)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in SUFFIXES:
            U, S, Vh = torch.linalg.svd(dequantized(mod).cpu(), full_matrices=False)
            bf = torch.bfloat16
            P = torch.randn(u, r, dtype=bf) / r ** 0.5
            c = S[:r].to(bf) * (v @ P)
            deltas[name] = U[:, :r].to(bf).float() @ torch.diag(c.float()) @ Vh[:r].to(bf).float()
    torch.save({"global_v": v, "u_value": u, "rank": r, "seed": seed, "total_replaced_layers": len(deltas)},
               tmp_path / "tiny_lora_v.pt")
    twin = dense_twin(model_dirs["qwen2"], model)
    for n, d in deltas.items():
        twin.get_submodule(n).register_forward_hook(lambda m, i, o, d=d: o + F.linear(i[0], d))
    expected = logits(twin, input_ids)
    fresh = load_4bit(model_dirs["qwen2"])
    layers = lt.restore_tinylora(fresh, tmp_path / "tiny_lora_v.pt")
    assert len(layers) == 14 and all(isinstance(base_of(m), NF4Linear) for m in layers.values())
    torch.testing.assert_close(logits(fresh, input_ids), expected, rtol=1e-5, atol=1e-5)
