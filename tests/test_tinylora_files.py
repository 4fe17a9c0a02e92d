"""TinyLoRA's ``tiny_lora_v.pt`` as the TinyLoRA-Qwen-Coder trainer writes it: a file built here by that trainer's
procedure (seeded bfloat16 projections P (u, r), ΔW = U_r diag(S_r ⊙ (v P)) V_rᵀ) on tiny Qwen2 and Llama models,
restored with nothing but the model and compared by logits; the files this package writes (with the modules and
convention beside them); every malformed field named."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load, logits
from torch import nn

import lispetorch as lt

SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def trainer_file(model, path, u=5, rank=2, seed=42, v_seed=3, optional=True):
    """A tiny_lora_v.pt made as the trainer makes it, and its ΔW per layer (float32 from the bfloat16 parts)."""
    torch.manual_seed(seed)
    parts = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in SUFFIXES:
            U, S, Vh = torch.linalg.svd(mod.weight.detach().float().cpu(), full_matrices=False)
            bf = torch.bfloat16
            P = torch.randn(u, rank, device=mod.weight.device, dtype=bf) / rank ** 0.5
            parts[name] = (U[:, :rank].to(bf), S[:rank].to(bf), Vh[:rank].to(bf), P)
    v = (torch.randn(u, generator=torch.Generator().manual_seed(v_seed)) * 0.5).to(torch.bfloat16)  # "trained"
    state = {"global_v": v, "u_value": u, "rank": rank, "seed": seed}
    if optional:
        state.update(model_id="qwen/Qwen2.5-Coder-3B-Instruct", total_replaced_layers=len(parts))
    torch.save(state, path)
    deltas = {}
    for name, (U, S, Vh, P) in parts.items():
        c = S * (v @ P)  # bfloat16, as the trainer computes it
        deltas[name] = U.float() @ torch.diag(c.float()) @ Vh.float()
    return deltas


def merged(model_dir, deltas):
    model = load(model_dir)
    with torch.no_grad():
        for name, d in deltas.items():
            model.get_submodule(name).weight += d
    return model


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("optional", [True, False])
def test_a_trainer_file_is_restored_exactly_with_nothing_but_the_model(model_dirs, tmp_path, input_ids, arch,
                                                                       optional):
    path = tmp_path / "tiny_lora_v.pt"
    deltas = trainer_file(load(model_dirs[arch]), path, optional=optional)
    assert len(deltas) == 2 * 7
    expected = logits(merged(model_dirs[arch], deltas), input_ids)
    model = load(model_dirs[arch])
    rng = torch.get_rng_state()
    if optional:
        with pytest.warns(UserWarning, match="written for model_id"):
            layers = lt.restore_tinylora(model, path)
    else:
        layers = lt.restore_tinylora(model, path)
    assert torch.equal(torch.get_rng_state(), rng)  # the projections came from generators of their own
    assert sorted(layers) == sorted(deltas)
    for name, layer in layers.items():
        A, B, R = layer.factors("default")
        torch.testing.assert_close((B @ R @ A).float(), deltas[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=1e-5, atol=1e-5)
    base = logits(load(model_dirs[arch]), input_ids)
    assert (logits(model, input_ids) - base).abs().max() > 1e-3  # the adapter does change the output
    # written back by this package: the trainer's fields and dtype, the convention beside them; restored again
    out = lt.save_tinylora(model, tmp_path / "again" / "tiny_lora_v.pt", model_id="tiny")
    state = torch.load(out, weights_only=True)
    assert state["global_v"].dtype == torch.bfloat16 and torch.equal(state["global_v"],
                                                                      torch.load(path, weights_only=True)["global_v"])
    side = json.loads((tmp_path / "again" / "tiny_lora_v.json").read_text())
    assert side["convention"] == "qwen-coder" and len(side["target_modules"]) == 14
    fresh = load(model_dirs[arch])
    lt.restore_tinylora(fresh, out)
    assert torch.equal(logits(fresh, input_ids), logits(model, input_ids))


def test_the_qwen_coder_convention_trains_and_saves_and_restores(model_dirs, tmp_path, input_ids):
    model = load(model_dirs["qwen2"])
    cfg = lt.TinyLoraConfig(r=2, u=3, seed=5, convention="qwen-coder", target_modules=["q_proj", "down_proj"])
    lt.inject(model, cfg)
    base = logits(load(model_dirs["qwen2"]), input_ids)
    assert torch.equal(logits(model, input_ids), base)  # v starts at zero
    params = list(lt.trainable_parameters(model))
    assert sum(p.numel() for p in params) == 3
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(3):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(logits(model, input_ids), base)
    path = lt.save_tinylora(model, tmp_path / "tiny_lora_v.pt")
    fresh = load(model_dirs["qwen2"])
    lt.restore_tinylora(fresh, path)
    assert torch.equal(logits(fresh, input_ids), logits(model, input_ids))
    with pytest.raises(ValueError, match="groups"):
        lt.TinyLoraConfig(convention="qwen-coder", groups=2)
    with pytest.raises(ValueError, match="convention must be one of"):
        lt.TinyLoraConfig(convention="other")


def test_files_we_write_need_nothing_but_the_model(model_dirs, tmp_path, input_ids):
    model = load(model_dirs["llama"])
    lt.inject(model, lt.TinyLoraConfig(r=2, u=4, seed=3, groups=2, target_modules=["v_proj", "up_proj"]))
    with torch.no_grad():
        for p in lt.trainable_parameters(model):
            p.copy_(torch.randn(p.shape))
    path = lt.save_tinylora(model, tmp_path / "tiny_lora_v.pt")
    side = json.loads((tmp_path / "tiny_lora_v.json").read_text())
    assert side["convention"] == "paper" and side["groups"] == 2 and len(side["target_modules"]) == 4
    fresh = load(model_dirs["llama"])
    lt.restore_tinylora(fresh, path)
    assert torch.equal(logits(fresh, input_ids), logits(model, input_ids))
    # a sidecar of another checkpoint is refused, naming both files
    state = torch.load(path, weights_only=True)
    state["seed"] = 4
    torch.save(state, path)
    with pytest.raises(lt.TinyLoraFormatError, match=r"tiny_lora_v.json does not belong to .*tiny_lora_v.pt: its "
                                                     r"'seed' is 3"):
        lt.restore_tinylora(load(model_dirs["llama"]), path)


class Unsafe:
    pass


@pytest.mark.parametrize("change, message", [
    ({"u_value": "5"}, "field 'u_value' must be an integer, got str '5'"),
    ({"rank": 0}, "field 'rank' must be >= 1, got 0"),
    ({"seed": 1.5}, "field 'seed' must be an integer"),
    ({"global_v": torch.zeros(4)}, r"field 'global_v' must be .* u_value = 5, got a torch.float32 tensor of shape "
                                   r"\(4,\)"),
    ({"global_v": torch.zeros(5, dtype=torch.int64)}, "field 'global_v' must be a floating-point tensor"),
    ({"global_v": [0.0] * 5}, "field 'global_v' must be .* got a list"),
    ({"global_v": torch.tensor([0.0, float("nan"), 0.0, float("inf"), 0.0])}, "'global_v' holds 2 non-finite"),
    ({"model_id": 7}, "field 'model_id' must be a string, got int 7"),
    ({"total_replaced_layers": 0}, "field 'total_replaced_layers' must be >= 1"),
    ({"total_replaced_layers": True}, "field 'total_replaced_layers' must be an integer, got bool"),
    ({"is_quantized": "yes"}, "field 'is_quantized' must be bool"),
])
def test_every_field_is_checked_and_named(model_dirs, tmp_path, change, message):
    path = tmp_path / "tiny_lora_v.pt"
    trainer_file(load(model_dirs["qwen2"]), path)
    state = torch.load(path, weights_only=True)
    state.update(change)
    torch.save(state, path)
    model = load(model_dirs["qwen2"])
    with pytest.raises(lt.TinyLoraFormatError, match=f"{path}: .*{message}" if "field" not in message[:6]
                       else f"{path}: {message}"):
        lt.restore_tinylora(model, path)
    assert not lt.adapter_layers(model)


def test_code_in_a_file_does_not_run_and_extra_trainer_fields_are_read(model_dirs, tmp_path, input_ids):
    path = tmp_path / "tiny_lora_v.pt"
    deltas = trainer_file(load(model_dirs["qwen2"]), path)
    state = torch.load(path, weights_only=True)
    torch.save({**state, "obj": Unsafe()}, tmp_path / "unsafe.pt")
    with pytest.raises(lt.TinyLoraFormatError, match="unsafe.pt: not a readable TinyLoRA checkpoint"):
        lt.restore_tinylora(load(model_dirs["qwen2"]), tmp_path / "unsafe.pt")
    # the trainer's best-checkpoint file carries is_quantized, validation_score and step
    torch.save({**state, "is_quantized": True, "validation_score": 0.25, "step": 100}, tmp_path / "best.pt")
    model = load(model_dirs["qwen2"])
    with pytest.warns(UserWarning, match="model_id"):
        lt.restore_tinylora(model, tmp_path / "best.pt")
    torch.testing.assert_close(logits(model, input_ids), logits(merged(model_dirs["qwen2"], deltas), input_ids),
                               rtol=1e-5, atol=1e-5)
