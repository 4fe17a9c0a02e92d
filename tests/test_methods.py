"""SVD-family methods on the one operator: PiSSA and LoRA-GA inits, Rotational PiSSA, TinyLoRA."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import load, logits
from torch import nn

import lispetorch as lt
from lispetorch.hf import weight_out_in


def _train(model, ids, steps=3, lr=1e-2, extra=None):
    opt = torch.optim.Adam(lt.trainable_parameters(model), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        if extra is not None:
            loss = loss + extra(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, before):
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


# --- PiSSA ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_output_unchanged_at_init(model_dirs, input_ids, arch, init):
    model = load(model_dirs[arch])
    base = logits(model, input_ids)
    originals = {n: weight_out_in(m).detach().clone() for n, m in lt.match_modules(model, "all-linear").items()}
    cfg = lt.LoraConfig(r=4, alpha=8, init=init, target_modules="all-linear")
    layers = lt.inject(model, cfg)
    torch.testing.assert_close(logits(model, input_ids), base, atol=2e-5, rtol=0)
    s = cfg.scaling
    for name, layer in layers.items():
        W = originals[name]
        A, B, R = layer.factors("default")
        assert R is None and A.requires_grad and B.requires_grad
        # base + s·BA gives back the original weight, and s·BA is the rank-r truncated SVD of W
        torch.testing.assert_close(layer.base_weight() + s * (B @ A), W, atol=1e-5, rtol=0)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        best = (U[:, :4] * S[:4]) @ Vh[:4]
        tol = 1e-4 if init == "pissa" else 0.05 * S[0].item()
        torch.testing.assert_close(s * (B @ A), best, atol=tol, rtol=0)
        # A = √(S/s) Vᵀ and B = U √(S/s): both Grams are diag(S/s)
        if init == "pissa":
            torch.testing.assert_close(A @ A.t(), torch.diag(S[:4] / s), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(B.t() @ B, torch.diag(S[:4] / s), atol=1e-4, rtol=1e-4)


def test_deleting_an_svd_init_adapter_puts_the_base_back(model_dirs, input_ids):
    model = load(model_dirs["llama"])
    base = logits(model, input_ids)
    originals = {n: m.weight.detach().clone() for n, m in lt.match_modules(model, "all-linear").items()}
    lt.inject(model, lt.LoraConfig(r=4, init="pissa", target_modules="all-linear"))
    lt.inject(model, lt.RotationalPiSSAConfig(r=2, method="way3"), adapter_name="rot")
    _train(model, input_ids, steps=1)
    lt.delete_adapter(model, "rot")
    lt.delete_adapter(model, "default")
    assert not lt.adapter_layers(model)
    for name, module in lt.match_modules(model, "all-linear").items():
        torch.testing.assert_close(module.weight, originals[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, input_ids), base, atol=2e-5, rtol=0)


def test_svd_lowrank_matches_full_svd():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(96, 40, generator=g) @ torch.diag(torch.logspace(0, -3, 40)) @ torch.randn(40, 64, generator=g)
    U, S, Vh = lt.ops.svd_lowrank(W, 6, niter=6)
    S0 = torch.linalg.svdvals(W)[:6]
    torch.testing.assert_close(S, S0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(U.t() @ U, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh @ Vh.t(), torch.eye(6), atol=1e-5, rtol=0)
    # same seed, same result; more iterations, closer to the exact singular values
    assert torch.equal(lt.ops.svd_lowrank(W, 6, niter=6)[1], S)
    err0 = (lt.ops.svd_lowrank(W, 6, niter=0, oversample=0)[1] - S0).abs().max()
    err4 = (lt.ops.svd_lowrank(W, 6, niter=4, oversample=0)[1] - S0).abs().max()
    assert err4 < err0
    with pytest.raises(RuntimeError, match="rank must be in"):
        lt.ops.svd_lowrank(W, 100, 2)
    with pytest.raises(RuntimeError, match="floating point"):
        lt.ops.svd_lowrank(W.to(torch.int32), 2, 2)


def test_pissa_merge_and_training(model_dirs, input_ids):
    model = load(model_dirs["llama"])
    lt.inject(model, lt.LoraConfig(r=4, alpha=8, init="pissa", target_modules="all-linear"))
    _train(model, input_ids)
    out = logits(model, input_ids)
    lt.merge(model)
    torch.testing.assert_close(logits(model, input_ids), out, atol=2e-5, rtol=0)
    lt.unmerge(model)
    assert torch.equal(logits(model, input_ids), out)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_converts_to_plain_lora_that_peft_loads(model_dirs, input_ids, tmp_path, arch, use_rslora):
    from peft import PeftModel

    model = load(model_dirs[arch])
    lt.inject(model, lt.LoraConfig(r=4, alpha=8, init="pissa", target_modules="all-linear", use_rslora=use_rslora))
    _train(model, input_ids)
    adapted = logits(model, input_ids)
    out = lt.save_as_lora(model, tmp_path / "lora")
    import json

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == pytest.approx(8 * (math.sqrt(2) if use_rslora else 2))
    original = load(model_dirs[arch])
    peft_model = PeftModel.from_pretrained(original, str(out)).eval()
    torch.testing.assert_close(logits(peft_model, input_ids), adapted, atol=5e-5, rtol=0)
    ours = load(model_dirs[arch])
    lt.load_adapter(ours, out)
    torch.testing.assert_close(logits(ours, input_ids), adapted, atol=5e-5, rtol=0)


def _toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))


def test_svd_inits_reject_bad_input_and_leave_model_unchanged():
    model = _toy()
    before = _weights(model)
    bad = [
        (lt.LoraConfig(r=6, init="pissa", target_modules=["0", "2"]), ValueError, r"r = 6 exceeds min\(out, in\) = 5"),
        (lt.RotationalPiSSAConfig(r=7, target_modules=["0"]), ValueError, r"r = 7 exceeds min\(out, in\) = 6"),
        (lt.TinyLoraConfig(r=9, target_modules=["2"]), ValueError, "exceeds"),
        (lt.LoraConfig(r=3, init="lora_ga", target_modules=["2"]), ValueError, r"2·r = 6 exceeds"),
        (lt.LoraConfig(r=2, init="lora_ga", target_modules=["2"]), ValueError, "calibration batches"),
    ]
    for cfg, err, match in bad:
        with pytest.raises(err, match=match):
            lt.inject(model, cfg)
        assert not lt.adapter_layers(model) and _same_state(model, before)
    model[2].weight = nn.Parameter(torch.zeros(5, 6, dtype=torch.int32), requires_grad=False)
    before = _weights(model)
    for cfg in (lt.LoraConfig(r=2, init="pissa", target_modules=["0", "2"]),
                lt.TinyLoraConfig(r=2, target_modules=["0", "2"])):
        with pytest.raises(TypeError, match="floating-point weight, but '2' holds torch.int32"):
            lt.inject(model, cfg)
        assert not lt.adapter_layers(model) and _same_state(model, before)
    for kwargs, match in [(dict(u=0), "u must be a positive integer"), (dict(u=-3), "u must be"),
                          (dict(r=0), "r must be")]:
        with pytest.raises(ValueError, match=match):
            lt.TinyLoraConfig(**kwargs)
    with pytest.raises(ValueError, match="method must be one of"):
        lt.RotationalPiSSAConfig(method="way4")
    with pytest.raises(ValueError, match="init must be one of"):
        lt.LoraConfig(init="pissa_niter_")


# --- TinyLoRA ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tinylora_init_parameters_and_formula(model_dirs, input_ids, arch):
    model = load(model_dirs[arch])
    base = logits(model, input_ids)
    originals = {n: weight_out_in(m).detach().clone() for n, m in lt.match_modules(model, "all-linear").items()}
    layers = lt.inject(model, lt.TinyLoraConfig(r=2, u=5, seed=7))
    assert torch.equal(logits(model, input_ids), base)  # v = 0, base untouched
    params = lt.trainable_parameters(model)
    assert len(params) == 1 and params[0].numel() == 5
    _train(model, input_ids, steps=2, lr=1e-2)
    v = params[0].detach()
    assert v.abs().sum() > 0
    # ΔW = U_r diag(S_r) (Σ vᵢPᵢ) V_rᵀ with P drawn module after module from a generator seeded with `seed`
    g = torch.Generator().manual_seed(7)
    for name, layer in layers.items():
        W = originals[name]
        assert torch.equal(layer.base_weight(), W)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        P = torch.randn(5, 2, 2, generator=g)
        R = torch.einsum("u,uij->ij", v, P)
        expected = (U[:, :2] * S[:2]) @ R @ Vh[:2]
        A, B, R_ = layer.factors("default")
        torch.testing.assert_close(layer.scaling["default"] * B @ R_ @ A, expected, atol=1e-5, rtol=1e-5)
    out = logits(model, input_ids)
    assert not torch.allclose(out, base)
    lt.merge(model)
    torch.testing.assert_close(logits(model, input_ids), out, atol=2e-5, rtol=0)
    lt.unmerge(model)
    assert torch.equal(logits(model, input_ids), out)


def test_tinylora_groups_and_u1(model_dirs, input_ids):
    model = load(model_dirs["llama"])
    layers = lt.inject(model, lt.TinyLoraConfig(r=2, u=3, groups=4))
    params = lt.trainable_parameters(model)
    assert sum(p.numel() for p in params) == 3 * 4 and len(params) == 4
    cores = [layer.lora_R_fn["default"] for layer in layers.values()]
    assert len({id(c.v) for c in cores}) == 4
    model = load(model_dirs["llama"])
    base = logits(model, input_ids)
    lt.inject(model, lt.TinyLoraConfig(r=2, u=1))
    assert sum(p.numel() for p in lt.trainable_parameters(model)) == 1
    _train(model, input_ids, steps=2)
    assert not torch.allclose(logits(model, input_ids), base)


@pytest.mark.parametrize("groups", [1, 3])
def test_tinylora_save_restore_reproduces_logits(model_dirs, input_ids, tmp_path, groups):
    model = load(model_dirs["qwen2"])
    cfg = lt.TinyLoraConfig(r=2, u=4, seed=11, groups=groups, target_modules=["q_proj", "v_proj", "down_proj"])
    lt.inject(model, cfg)
    _train(model, input_ids, steps=2)
    out = logits(model, input_ids)
    path = lt.save_tinylora(model, tmp_path / "tiny_lora_v.pt", model_id="tiny/qwen2")
    state = torch.load(path, weights_only=True)
    assert set(state) == {"global_v", "u_value", "rank", "seed", "model_id", "total_replaced_layers"}
    assert state["u_value"] == 4 and state["rank"] == 2 and state["seed"] == 11
    assert state["model_id"] == "tiny/qwen2" and state["total_replaced_layers"] == 6
    assert state["global_v"].shape == ((4,) if groups == 1 else (groups, 4))
    fresh = load(model_dirs["qwen2"])
    with pytest.warns(UserWarning, match="written for model_id 'tiny/qwen2'"):
        lt.restore_tinylora(fresh, path, target_modules=cfg.target_modules)
    assert torch.equal(logits(fresh, input_ids), out)
    # into a model that already has the adapter: sets v
    other = load(model_dirs["qwen2"])
    lt.inject(other, cfg)
    with pytest.warns(UserWarning, match="model_id"):
        lt.restore_tinylora(other, path)
    assert torch.equal(logits(other, input_ids), out)


def test_tinylora_restore_rejects_bad_files(model_dirs, tmp_path):
    model = load(model_dirs["llama"])
    lt.inject(model, lt.TinyLoraConfig(r=2, u=4, target_modules=["q_proj"]))
    path = lt.save_tinylora(model, tmp_path / "tiny_lora_v.pt")
    state = torch.load(path, weights_only=True)
    fresh = load(model_dirs["llama"])
    before = _weights(fresh)
    del state["seed"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"missing field\(s\) \['seed'\]"):
        lt.restore_tinylora(fresh, tmp_path / "missing.pt", target_modules=["q_proj"])
    with pytest.raises(ValueError, match="written for 2 replaced layers.*selects 4 layers"):
        lt.restore_tinylora(fresh, path, target_modules=["q_proj", "v_proj"])
    assert not lt.adapter_layers(fresh) and _same_state(fresh, before)
    other = load(model_dirs["llama"])
    lt.inject(other, lt.TinyLoraConfig(r=2, u=5, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="u_value: file 4, model 5"):
        lt.restore_tinylora(other, path)


# --- Rotational PiSSA ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["way0", "way1", "way2", "way3"])
def test_rotational_pissa(model_dirs, input_ids, method):
    model = load(model_dirs["llama"])
    base = logits(model, input_ids)
    originals = {n: weight_out_in(m).detach().clone() for n, m in lt.match_modules(model, "all-linear").items()}
    cfg = lt.RotationalPiSSAConfig(r=4, lora_alpha=8, method=method, target_modules="all-linear")
    layers = lt.inject(model, cfg)
    torch.testing.assert_close(logits(model, input_ids), base, atol=2e-5, rtol=0)
    for layer in layers.values():  # A = V_rᵀ and B = U_r are frozen
        A, B, _ = layer.factors("default")
        assert not A.requires_grad and not B.requires_grad
    extra = (lambda m: lt.orthogonality_loss(m)) if method == "way0" else None
    _train(model, input_ids, steps=4, lr=5e-2, extra=extra)
    out = logits(model, input_ids)
    assert not torch.allclose(out, base, atol=1e-3)
    for name, layer in layers.items():
        core = layer.lora_R_fn["default"]
        R_U, R_V = core.rotations()
        if method != "way0":  # exactly orthogonal after training
            torch.testing.assert_close(R_U.t() @ R_U, torch.eye(4), atol=1e-5, rtol=0)
            torch.testing.assert_close(R_V.t() @ R_V, torch.eye(4), atol=1e-5, rtol=0)
            assert not torch.allclose(R_U, torch.eye(4), atol=1e-4)
        # W = W_res + U_r R_U diag(S) R_Vᵀ V_rᵀ, with S the trained singular values
        W = originals[name]
        U, S0, Vh = torch.linalg.svd(W, full_matrices=False)
        A, B, _ = layer.factors("default")
        torch.testing.assert_close(A, Vh[:4], atol=1e-5, rtol=0)
        S = core.S.detach() * cfg.scaling
        principal = U[:, :4] @ R_U @ torch.diag(S) @ R_V.t() @ Vh[:4]
        residual = W - (U[:, :4] * S0[:4]) @ Vh[:4]
        torch.testing.assert_close(layer.base_weight(), residual, atol=1e-5, rtol=0)
        lt.merge(model)
        torch.testing.assert_close(layer.base_weight(), residual + principal.detach(), atol=2e-5, rtol=0)
        lt.unmerge(model)
    lt.merge(model)
    torch.testing.assert_close(logits(model, input_ids), out, atol=2e-5, rtol=0)
    lt.unmerge(model)


def test_rotational_way0_penalty_value_and_gradient(model_dirs):
    model = load(model_dirs["llama"])
    layers = lt.inject(model, lt.RotationalPiSSAConfig(r=3, method="way0", orthogonality_reg_weight=0.25))
    assert lt.orthogonality_loss(model).item() == 0.0  # identity at init
    g = torch.Generator().manual_seed(5)
    mats = []
    with torch.no_grad():
        for layer in layers.values():
            core = layer.lora_R_fn["default"]
            for rot in (core.rot_U, core.rot_V):
                rot.weight.add_(torch.randn(3, 3, generator=g) * 0.2)
                mats.append(rot.weight)
    loss = lt.orthogonality_loss(model)
    eye = torch.eye(3)
    expected = 0.25 * sum(((M.t() @ M - eye) ** 2).sum() for M in mats)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    for M in mats:  # d/dM ‖MᵀM − I‖² = 4 M (MᵀM − I)
        torch.testing.assert_close(M.grad, 0.25 * 4 * M.detach() @ (M.detach().t() @ M.detach() - eye))
    assert lt.orthogonality_loss(model, weight=1.0).item() == pytest.approx(expected.item() / 0.25, rel=1e-5)


def test_cayley_is_exactly_orthogonal_where_first_order_is_not():
    from lispetorch.methods.rotational import CayleyRotation

    rot = CayleyRotation(6, 2, torch.Generator().manual_seed(0), identity=False)
    with torch.no_grad():
        rot.X.mul_(10)
        rot.Y.mul_(10)
    K = rot.X @ rot.Y.t() - rot.Y @ rot.X.t()
    first_order = torch.eye(6) + K
    assert (first_order.t() @ first_order - torch.eye(6)).abs().max() > 1e-2
    Q = rot()
    torch.testing.assert_close(Q.t() @ Q, torch.eye(6), atol=1e-5, rtol=0)


def test_rotational_freeze_singular_values(model_dirs):
    model = load(model_dirs["llama"])
    lt.inject(model, lt.RotationalPiSSAConfig(r=4, method="way3", freeze_singular_values=True))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("rot_" in n for n in names)
    n_layers = 4  # q_proj, v_proj in 2 layers
    assert sum(p.numel() for p in lt.trainable_parameters(model)) == n_layers * 2 * 16


# --- LoRA-GA -------------------------------------------------------------------------------------------------
def test_lora_ga(model_dirs):
    model = load(model_dirs["llama"])
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 128, (2, 10), generator=g) for _ in range(3)]
    ids = batches[0]
    base = logits(model, ids)
    targets = lt.match_modules(model, ["q_proj", "down_proj"])
    # reference: gradients of each W averaged over the batches, computed directly
    ref = copy.deepcopy(model)
    weights = {n: ref.get_submodule(n).weight for n in targets}
    for p in ref.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    for b in batches:
        ref(b, labels=b).loss.backward()
    grads = {n: w.grad / len(batches) for n, w in weights.items()}
    layers = lt.inject(model, lt.LoraConfig(r=2, alpha=4, init="lora_ga", target_modules=["q_proj", "down_proj"]),
                       calibration_batches=batches)
    torch.testing.assert_close(logits(model, ids), base, atol=2e-5, rtol=0)
    assert all(p.grad is None for p in model.parameters())
    for name, layer in layers.items():
        A, B, _ = layer.factors("default")
        U, S, Vh = torch.linalg.svd(grads[name], full_matrices=False)
        c = layer.base_weight().shape[0] ** 0.25 / 4.0  # stable scale, γ = 16
        # A's rows span the top-2 right singular vectors, B's columns the 3rd and 4th left ones
        torch.testing.assert_close(A.t() @ A, c**2 * Vh[:2].t() @ Vh[:2], atol=1e-4, rtol=0)
        torch.testing.assert_close(B @ B.t(), c**2 * U[:, 2:4] @ U[:, 2:4].t(), atol=1e-4, rtol=0)
    _train(model, ids, steps=2)
    out = logits(model, ids)
    lt.merge(model)
    torch.testing.assert_close(logits(model, ids), out, atol=2e-5, rtol=0)


@pytest.mark.parametrize("config", [
    lt.LoraConfig(r=4, init="pissa", target_modules="all-linear"),
    lt.RotationalPiSSAConfig(r=4, method="way1"),
    lt.TinyLoraConfig(r=2, u=3),
], ids=["pissa", "rotational", "tinylora"])
def test_methods_in_bfloat16(model_dirs, input_ids, config):
    model = load(model_dirs["llama"]).to(torch.bfloat16)
    base = logits(model, input_ids).float()
    lt.inject(model, config)
    out = logits(model, input_ids).float()
    assert (out - base).abs().max() <= 2 * 2**-8 * base.abs().max()  # bf16 rounding of the residual
    _train(model, input_ids, steps=1)
    trained = logits(model, input_ids)
    weights = {n: layer.base_weight().clone() for n, layer in lt.adapter_layers(model).items()}
    lt.merge(model)
    lt.unmerge(model)
    assert all(torch.equal(layer.base_weight(), weights[n]) for n, layer in lt.adapter_layers(model).items())
    assert torch.equal(logits(model, input_ids), trained)


@pytest.mark.parametrize("extra", [["--method", "way0"], ["--baseline", "lora_ga", "--sample_size", "4"]],
                         ids=["way0", "lora_ga"])
def test_rotational_pissa_example(tiny_default_model, tmp_path, capsys, extra):
    import importlib.util
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "rotational_pissa_train.py"
    spec = importlib.util.spec_from_file_location("rotational_pissa_train", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--steps", "3", "--log_every", "1", "--batch", "2", "--seq", "32", "--lora_rank", "4",
                         "--model_dir", str(tiny_default_model), "--output_dir", str(tmp_path), *extra]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"step +\d+  task_loss [\d.]+  ortho_loss \S+  total_loss [\d.]+", out)) == 3
    assert float(re.search(r"at init ([\d.e+-]+)", out).group(1)) < 1e-4
    assert float(re.search(r"merged vs unmerged: max \|diff\| ([\d.e+-]+)", out).group(1)) < 1e-4
    adapted = load(tiny_default_model)
    lt.load_adapter(adapted, tmp_path / "adapter")  # a plain LoRA on the original weights


def test_method_config_by_name(model_dirs, input_ids):
    from lispetorch.methods import method_config

    assert method_config("lora", 4, 8).init == "kaiming"
    assert method_config("pissa_niter_3", 4, 8, ["q_proj"]).init == "pissa_niter_3"
    rot = method_config("rotational_pissa", 4, 8, method="way2", skew_rank=1)
    assert isinstance(rot, lt.RotationalPiSSAConfig) and rot.method == "way2" and rot.lora_alpha == 8
    tiny = method_config("tinylora", 2, 1, u=3, seed=5)
    assert isinstance(tiny, lt.TinyLoraConfig) and (tiny.u, tiny.seed, tiny.r) == (3, 5, 2)
    with pytest.raises(ValueError, match="method must be one of"):
        method_config("dora", 4, 8)
    with pytest.raises(ValueError, match="method 'tinylora': .*unexpected keyword argument 'method'"):
        method_config("tinylora", 2, 1, method="way1")
    with pytest.raises(ValueError, match="u must be a positive integer"):
        method_config("tinylora", 2, 1, u=0)
    model = load(model_dirs["llama"])
    base = logits(model, input_ids)
    lt.inject(model, method_config("pissa", 4, 8, "all-linear"))
    torch.testing.assert_close(logits(model, input_ids), base, atol=2e-5, rtol=0)


@pytest.mark.parametrize("r", [1, 2, 5, 8])
def test_givens_product_matches_sequential_rotations(r):
    from lispetorch.methods.rotational import GivensRotation, _round_robin

    angles = torch.randn(r * (r - 1) // 2, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
    rot = GivensRotation(r, angles)
    Q = torch.eye(r, dtype=torch.float64)
    planes = [p for rnd in _round_robin(r) for p in rnd]
    assert sorted(planes) == [(i, j) for i in range(r) for j in range(i + 1, r)]
    for (i, j), theta in zip(planes, angles.tolist(), strict=True):  # one plane after another
        G = torch.eye(r, dtype=torch.float64)
        G[i, i] = G[j, j] = math.cos(theta)
        G[i, j], G[j, i] = -math.sin(theta), math.sin(theta)
        Q = G @ Q
    torch.testing.assert_close(rot().double(), Q, atol=1e-6, rtol=0)
