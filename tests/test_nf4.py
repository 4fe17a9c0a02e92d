"""NF4 against the published table and layout (QLoRA / bitsandbytes), round-trip error, and NF4 bases under
adapters."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import load, logits, saved_bytes

import lispetorch as lt
from lispetorch.nf4 import NF4Weight, dynamic_map

# bitsandbytes' NF4 table (QLoRA, appendix E), typed in from the publication.
NF4_TABLE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


def _unpack(packed, n):
    return torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[:n].long()


def test_nf4_codes_and_nibble_order():
    x = NF4_TABLE.clone() * 3.0  # one block whose absmax is 3: the codes are 0..15 in order
    packed, absmax = lt.ops.nf4_quantize(x)
    assert packed.dtype == torch.uint8 and absmax.dtype == torch.float32
    assert packed.tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]  # first element in the high nibble
    assert absmax.tolist() == [3.0]
    torch.testing.assert_close(lt.ops.nf4_dequantize(packed, absmax, 16), x, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(64, 128), (7, 33)])
def test_nf4_nearest_code_and_round_trip_error(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    packed, absmax = lt.ops.nf4_quantize(x, 64)
    n = x.numel()
    assert packed.shape == ((n + 1) // 2,) and absmax.shape == ((n + 63) // 64,)
    flat = x.reshape(-1)
    blocks = torch.nn.functional.pad(flat, (0, absmax.numel() * 64 - n)).view(-1, 64)
    torch.testing.assert_close(absmax, blocks.abs().amax(1), rtol=0, atol=0)
    scale = absmax.repeat_interleave(64)[:n]
    # each code is the nearest table entry to x / absmax (brute force)
    expected = (flat[:, None] / scale[:, None] - NF4_TABLE[None, :]).abs().argmin(1)
    assert torch.equal(_unpack(packed, n), expected)
    y = lt.ops.nf4_dequantize(packed, absmax, n, 64).view(shape)
    assert torch.equal(y.reshape(-1), NF4_TABLE[expected] * scale)
    half_gap = (NF4_TABLE[1:] - NF4_TABLE[:-1]).max() / 2
    assert ((y - x).abs().reshape(-1) <= half_gap * scale + 1e-7).all()
    rel = ((y - x).norm() / x.norm()).item()
    assert 0.01 < rel < 0.15  # 4 bits on Gaussian data
    for dtype in (torch.bfloat16, torch.float16):
        assert lt.ops.nf4_dequantize(packed, absmax, n, 64, dtype).dtype == dtype


def test_nf4_double_quant():
    code = dynamic_map()
    assert code.shape == (256,) and torch.equal(code, code.unique()) and code.abs().max() == 1 and (code == 0).any()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 256, generator=g) * torch.rand(300, 1, generator=g)
    plain, double = NF4Weight(w), NF4Weight(w, double_quant=True)
    assert double.absmax_index.dtype == torch.uint8 and double.absmax2.shape == (5,)  # 1200 blocks / 256
    # each absmax is off by at most half the code's widest gap times its block's scale (absmax2)
    err = (double.absmax_values() - plain.absmax_values()).abs()
    half_gap = ((dynamic_map()[1:] - dynamic_map()[:-1]).max() / 2).item()
    assert (err <= half_gap * double.absmax2.repeat_interleave(256)[:1200] + 1e-6).all()
    assert err.max() > 0
    assert double.nbytes() < plain.nbytes()
    err_plain = (plain.dequantize() - w).norm() / w.norm()
    err_double = (double.dequantize() - w).norm() / w.norm()
    assert err_double < err_plain * 1.05


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_nf4_matches_bitsandbytes():
    import bitsandbytes.functional as bnbf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(128, 96, device=device)
    q, state = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4")
    packed, absmax = lt.ops.nf4_quantize(x, 64)
    assert torch.equal(q.reshape(-1).cpu(), packed.cpu())
    torch.testing.assert_close(state.absmax.float().cpu(), absmax.cpu(), rtol=0, atol=0)
    assert torch.equal(bnbf.create_dynamic_map(signed=True).float().cpu(), dynamic_map())
    ours = lt.ops.nf4_dequantize(packed, absmax, x.numel(), 64).view_as(x).cpu()
    # bitsandbytes' codes, decoded by the published table: what its dequantisation is defined to give.
    decoded = (NF4_TABLE[_unpack(q.reshape(-1).cpu(), x.numel())].view(-1, 64) * state.absmax.float().cpu()[:, None])
    torch.testing.assert_close(ours, decoded.view_as(x), rtol=0, atol=0)
    if device == "cuda":
        # (bitsandbytes 0.50's CPU dequantize_4bit does not invert its own quantize_4bit: max error about 2 on
        # N(0, 1) data against 0.45 for the table; on CUDA its dequantisation is compared directly.)
        deq = bnbf.dequantize_4bit(q, state, quant_type="nf4")
        torch.testing.assert_close(ours, deq.float().cpu())


def test_nf4_base_trains_under_an_adapter(model_dirs, input_ids):
    model = load(model_dirs["llama"])
    dense = {n: m.weight.detach().clone() for n, m in lt.match_modules(model, "all-linear").items()}
    before = lt.memory_usage(model)
    lt.quantize_nf4(model)
    assert lt.memory_usage(model) < before
    for name, layer in lt.match_modules(model, "all-linear").items():
        assert isinstance(layer, lt.NF4Linear)
        torch.testing.assert_close(layer.weight, NF4Weight(dense[name]).dequantize(), rtol=0, atol=0)
    base = logits(model, input_ids)
    lt.inject(model, lt.LoraConfig(r=4, target_modules="all-linear"))
    assert torch.allclose(logits(model, input_ids), base, atol=1e-5)
    opt = torch.optim.Adam(lt.trainable_parameters(model), lr=1e-2)
    loss0 = None
    model.train()
    for _ in range(3):
        loss = model(input_ids, labels=input_ids).loss
        loss0 = loss0 if loss0 is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < loss0
    with pytest.raises(RuntimeError, match="quantised"):
        lt.merge(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="PiSSA changes the base weight, but .* is quantised"):
        lt.inject(model, lt.LoraConfig(r=2, init="pissa", target_modules="all-linear"), adapter_name="pissa")
    assert lt.adapter_names(model) == ["default"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    lt.inject(model, lt.TinyLoraConfig(r=2, u=2), adapter_name="tiny")  # leaves the base as it is: allowed


@pytest.mark.parametrize("with_R", [False, True])
def test_adapter_over_nf4_keeps_no_dequantised_weight_for_backward(with_R):
    # Same outputs and gradients as the operator over the dequantised weight, and backward keeps what it keeps
    # over a dense base: the input and the r-wide intermediate, not the (out, in) weight.
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 48)
    layer = lt.LoraLinear(lt.NF4Linear.from_linear(dense))
    R = torch.eye(4) + 0.1 * torch.randn(4, 4) if with_R else None
    layer.set_factors("a", torch.randn(4, 64) / 8, torch.randn(48, 4), alpha=8, dropout=0.2, R=R)
    layer.train()
    x = torch.randn(3, 5, 64, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    g = torch.randn_like(y)
    leaves = [x, layer.lora_A["a"], layer.lora_B["a"]] + ([layer.lora_R["a"]] if with_R else [])
    got = torch.autograd.grad(y, leaves, g)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    W = layer.base_layer.qweight.dequantize()
    R_ = layer.lora_R["a"] if with_R else None
    y_ref = lt.ops.lora_linear(x, W, layer.base_layer.bias, layer.lora_A["a"], layer.lora_B["a"], R_, 2.0, 0.2, seed)
    want = torch.autograd.grad(y_ref, leaves, g)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

    params = sum(p.numel() * 4 for p in leaves[1:])
    ours = saved_bytes(lambda: layer(x)) - params
    dense_op = saved_bytes(lambda: lt.ops.lora_linear(x, W, None, *leaves[1:3], R_, 2.0, 0.2, 1)) - params
    assert ours == x.numel() * 4 + 15 * 4 * 4  # x and hr (N, r), as over a dense base
    assert dense_op == ours + W.numel() * 4  # the dense operator keeps the weight too


def test_rotational_pissa_quantized_residual(model_dirs, input_ids):
    model = load(model_dirs["llama"])
    reference = load(model_dirs["llama"])
    layers = lt.inject(model, lt.RotationalPiSSAConfig(r=4, method="way3", quantize_residual=True))
    lt.inject(reference, lt.RotationalPiSSAConfig(r=4, method="way3"))
    for name, layer in layers.items():
        assert isinstance(layer.base_layer, lt.NF4Linear)
        residual = lt.adapter_layers(reference)[name].base_weight()
        torch.testing.assert_close(layer.base_weight(), NF4Weight(residual).dequantize(), rtol=0, atol=0)
    # the principal part stays exact and only the (smaller) residual is rounded: closer to the unquantised
    # model than NF4 applied to the whole weights
    out, ref = logits(model, input_ids), logits(reference, input_ids)
    whole = load(model_dirs["llama"])
    lt.quantize_nf4(whole, ["q_proj", "v_proj"])
    assert (out - ref).norm() < (logits(whole, input_ids) - ref).norm()


def test_opcheck_native_svd_and_quantisation_ops():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(40, 24, generator=g)
    torch.library.opcheck(torch.ops.lispetorch.svd_lowrank.default, (W, 4, 2, 4, 0))
    torch.library.opcheck(torch.ops.lispetorch.nf4_quantize.default, (W, 64))
    packed, absmax = lt.ops.nf4_quantize(W, 64)
    torch.library.opcheck(torch.ops.lispetorch.nf4_dequantize.default, (packed, absmax, W.numel(), 64, torch.bfloat16))
    code = dynamic_map()
    torch.library.opcheck(torch.ops.lispetorch.blockwise_quantize.default, (absmax, code, 256))
    index, absmax2 = lt.ops.blockwise_quantize(absmax, code, 256)
    torch.library.opcheck(torch.ops.lispetorch.blockwise_dequantize.default,
                          (index, absmax2, code, 256, torch.float32))
    with pytest.raises(RuntimeError, match="10 values need 5 bytes, got 6"):
        lt.ops.nf4_dequantize(torch.zeros(6, dtype=torch.uint8), torch.ones(1), 10, 64)
    with pytest.raises(RuntimeError, match="need absmax"):
        lt.ops.blockwise_dequantize(index, absmax2[:0], code, 256)
