"""DoRA in the fused operator: against a plain-PyTorch reference, against the real PEFT package (files both ways,
training gradients, merged export), exact merge/unmerge, and bad input."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import lispetorch as lt
from lispetorch import ops
from lispetorch.combine.reader import open_checkpoint
from lispetorch.errors import AdapterFormatError, AdapterStateError, ShapeError
from lispetorch.train import engine
from lispetorch.train.config import TrainConfig

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def reference(x, W, b, A, B, R, m, s, p=0.0, seed=0):
    """DoRA written out in plain PyTorch: the norm of W + s·B R A formed densely and detached, dropout on the
    low-rank branch's input with the operator's mask."""
    C = B @ R if R is not None else B
    n = (W + s * C @ A).norm(dim=1).detach()
    xd = x
    if p > 0:
        xd = x * ops.dropout_mask(x.reshape(-1, x.shape[-1]), p, seed).view(x.shape) / (1 - p)
    h = xd @ A.T
    if R is not None:
        h = h @ R.T
    y = (m / n) * (x @ W.T + s * h @ B.T)
    return y if b is None else y + b


# batches of 8 rows and of 3: at least the input's 5 features, g folds into W's rows; fewer, into the output's
BATCHES = [(2, 4), (1, 3)]


def tensors(out=7, inp=5, r=3, dtype=torch.float64, with_R=False, seed=0, batch=(2, 4)):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    m = (torch.rand(out, generator=g, dtype=dtype) + 0.5).requires_grad_()
    return rnd(*batch, inp), rnd(out, inp), rnd(out), rnd(r, inp), rnd(out, r), (rnd(r, r) if with_R else None), m


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("with_R", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_forward_and_gradients_match_the_reference(with_R, p, batch):
    x, W, b, A, B, R, m = tensors(with_R=with_R, batch=batch)
    y = ops.dora_linear(x, W, b, A, B, R, m, 0.7, p, 123)
    y_ref = reference(x, W, b, A, B, R, m, 0.7, p, 123)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    inputs = [t for t in (x, W, b, A, B, R, m) if t is not None]
    gy = torch.randn_like(y)
    for ours, theirs in zip(torch.autograd.grad(y, inputs, gy), torch.autograd.grad(y_ref, inputs, gy), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_in_float64(p, batch):
    # the norm is a constant in backward: x, b and m are the inputs it does not depend on, checked numerically;
    # A, B, R and W are checked against the reference's autograd above
    x, W, b, A, B, R, m = tensors(with_R=True, batch=batch)
    assert torch.autograd.gradcheck(lambda x, b, m: ops.dora_linear(x, W, b, A, B, R, m, 0.7, p, 5), (x, b, m))


@pytest.mark.parametrize("batch", BATCHES)
def test_zero_magnitude_rows_keep_their_gradient(batch):
    x, W, _, A, B, _, m = tensors(batch=batch)
    with torch.no_grad():
        m[1] = 0.0
        m[4] = 0.0
    assert torch.autograd.gradcheck(lambda x, m: ops.dora_linear(x, W, None, A, B, None, m, 0.5, 0.0, 0), (x, m))
    y = ops.dora_linear(x, W, None, A, B, None, m, 0.5, 0.0, 0)
    (gm,) = torch.autograd.grad(y.sum(), [m])
    (gm_ref,) = torch.autograd.grad(reference(x, W, None, A, B, None, m, 0.5).sum(), [m])
    torch.testing.assert_close(gm, gm_ref)
    assert gm[1] != 0 and gm[4] != 0


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_without_the_output_kept_the_gradients_are_the_same(p, batch):
    """keep_output=False: the magnitude's gradient from z computed again in backward, the others as before; checked
    against the reference's autograd and numerically, with zero magnitude rows among the others."""
    x, W, b, A, B, R, m = tensors(with_R=True, batch=batch)
    with torch.no_grad():
        m[2] = 0.0
    y = ops.dora_linear(x, W, b, A, B, R, m, 0.7, p, 9, keep_output=False)
    y_ref = reference(x, W, b, A, B, R, m, 0.7, p, 9)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    inputs = [x, W, b, A, B, R, m]
    gy = torch.randn_like(y)
    for ours, theirs in zip(torch.autograd.grad(y, inputs, gy), torch.autograd.grad(y_ref, inputs, gy), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, b, m: ops.dora_linear(x, W, b, A, B, R, m, 0.7, p, 5, keep_output=False), (x, b, m))


def saved_storages(fn) -> set[int]:
    """The data pointers of the tensors autograd saves during fn()."""
    ptrs = set()

    def pack(t):
        ptrs.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return ptrs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_output_is_kept_only_when_asked(dtype):
    x, W, b, A, B, _, _ = tensors(out=24, inp=16, r=4, dtype=dtype)
    x, W, b = x.detach(), W.detach(), b.detach()
    m = W.norm(dim=1).requires_grad_()
    out = {}
    for keep in (True, False):
        def run(keep=keep):
            out[keep] = ops.dora_linear(x, W, b, A, B, None, m, 0.5, 0.1, 3, keep_output=keep)
        saved = saved_storages(run)
        assert (out[keep].untyped_storage().data_ptr() in saved) == keep
        assert x.untyped_storage().data_ptr() in saved
    torch.testing.assert_close(out[True], out[False], rtol=0, atol=0)


def test_norm_from_the_factors_equals_the_dense_norm():
    _, W, _, A, B, R, _ = tensors(out=40, inp=30, r=6, with_R=True)
    dense = (W + 0.3 * (B @ R) @ A).norm(dim=1)
    torch.testing.assert_close(ops.dora_norm(W, A, B, R, 0.3), dense, rtol=1e-12, atol=1e-12)
    assert ops.dora_norm(W.float(), A.float(), B.float(), None, 0.3).dtype == torch.float32


def test_opcheck():
    args = [t.detach().float() for t in tensors(with_R=True)]
    for i in (3, 4, 5, 6):
        args[i].requires_grad_()
    torch.library.opcheck(torch.ops.lispetorch.dora_linear, (*args, 0.5, 0.1, 3))
    torch.library.opcheck(torch.ops.lispetorch.dora_linear, (*args[:5], None, args[6], 0.5, 0.0, 0))
    torch.library.opcheck(torch.ops.lispetorch.dora_linear, (*args, 0.5, 0.1, 3, False))
    torch.library.opcheck(torch.ops.lispetorch.dora_norm, (args[1].detach(), args[3].detach(), args[4].detach(),
                                                           None, 0.5))


def test_unmerge_is_bit_exact_in_bfloat16_after_1000_cycles():
    torch.manual_seed(0)
    layer = lt.LoraLinear(torch.nn.Linear(48, 64, dtype=torch.bfloat16))
    layer.add_adapter("d", r=8, alpha=16, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B["d"].normal_(std=0.05)
    layer.set_magnitude("d")
    with torch.no_grad():
        layer.lora_magnitude_vector["d"].mul_(1.3)
    w0 = layer.base_layer.weight.clone()
    x = torch.randn(5, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        for _ in range(1000):
            layer.merge()
            layer.unmerge()
        assert torch.equal(layer.base_layer.weight, w0)
        layer.merge()
        torch.testing.assert_close(layer(x).float(), y.float(), rtol=0.02, atol=0.05)
        assert not torch.equal(layer.base_layer.weight, w0)
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0)


# --- against PEFT ------------------------------------------------------------------------------------------------
def build(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)
        return transformers.LlamaForCausalLM(cfg).eval(), ["q_proj", "v_proj", "down_proj"]
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)
        return transformers.Qwen2ForCausalLM(cfg).eval(), ["q_proj", "k_proj", "o_proj"]
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval(), ["c_attn", "c_proj"]


def perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_peft_round_trip_both_ways(kind, tmp_path):
    base, targets = build(kind)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    ours = copy.deepcopy(base)
    lt.inject(ours, lt.LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True))
    perturb(ours, 2)
    lt.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)

    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                   use_dora=True, fan_in_fan_out=kind == "gpt2"))
    perturb(pm, 3)
    pm.eval().save_pretrained(tmp_path / "peft")
    loaded = copy.deepcopy(base)
    lt.load_adapter(loaded, tmp_path / "peft")
    loaded.eval()
    with torch.no_grad():
        expected = pm(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert (loaded(ids).logits - base(ids).logits).abs().max() > 1e-3  # the adapter does something
    # and back out: the same tensors PEFT wrote
    lt.save_adapter(loaded, tmp_path / "again")
    a, b = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(tmp_path / "again" /
                                                                                 "adapter_model.safetensors")
    assert set(a) == set(b) and any(k.endswith("lora_magnitude_vector") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_training_gradients_equal_peft():
    base, targets = build("llama")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                   use_dora=True))
    perturb(pm, 3)
    ours = copy.deepcopy(base)
    lt.inject(ours, lt.LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True))
    theirs = pm.get_base_model()
    with torch.no_grad():
        for name, layer in lt.adapter_layers(ours).items():
            peft_layer = theirs.get_submodule(name)
            layer.lora_A["default"].copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B["default"].copy_(peft_layer.lora_B["default"].weight)
            layer.lora_magnitude_vector["default"].copy_(peft_layer.lora_magnitude_vector["default"].weight)
    ours.train()
    pm.train()
    ours(input_ids=ids, labels=ids).loss.backward()
    pm(input_ids=ids, labels=ids).loss.backward()
    checked = 0
    for name, layer in lt.adapter_layers(ours).items():
        peft_layer = theirs.get_submodule(name)
        for mine, other in ((layer.lora_A["default"], peft_layer.lora_A["default"].weight),
                            (layer.lora_B["default"], peft_layer.lora_B["default"].weight),
                            (layer.lora_magnitude_vector["default"],
                             peft_layer.lora_magnitude_vector["default"].weight)):
            torch.testing.assert_close(mine.grad, other.grad, rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked == 3 * 6


def test_a_new_dora_adapter_starts_as_the_base_model_under_every_lora_init():
    base, targets = build("llama")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = base(ids).logits
    for init in ("kaiming", "gaussian", "pissa"):
        m = copy.deepcopy(base)
        lt.inject(m, lt.LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True, init=init))
        with torch.no_grad():
            torch.testing.assert_close(m(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_pissa_dora_saved_on_the_original_weights_loads_in_peft(tmp_path):
    base, targets = build("llama")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    ours = copy.deepcopy(base)
    lt.inject(ours, lt.LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True, init="pissa"))
    perturb(ours, 5)
    lt.save_as_lora(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_merged_export_equals_peft_merge_and_unload(tmp_path):
    base, targets = build("llama")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    base.save_pretrained(tmp_path / "model")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                   use_dora=True))
    perturb(pm, 3)
    pm.eval().save_pretrained(tmp_path / "adapter")
    lt.export_merged(tmp_path / "adapter", tmp_path / "model", tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, pm(ids).logits, rtol=1e-5, atol=1e-5)


def test_compiled_forward_equals_eager():
    base, targets = build("llama")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    m = copy.deepcopy(base)
    lt.inject(m, lt.LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True))
    perturb(m, 2)
    with torch.no_grad():
        eager = m(ids).logits
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_loraplus_puts_the_magnitude_with_b_as_peft_does():
    base, targets = build("llama")
    m = copy.deepcopy(base)
    lt.inject(m, lt.LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True))
    groups = lt.optimizer_param_groups(m, lr=1e-3, loraplus_lr_ratio=8.0)
    fast = {id(p) for g in groups if g["lr"] == 8e-3 for p in g["params"]}
    for layer in lt.adapter_layers(m).values():
        assert id(layer.lora_magnitude_vector["default"]) in fast
        assert id(layer.lora_B["default"]) in fast and id(layer.lora_A["default"]) not in fast


# --- bad input ---------------------------------------------------------------------------------------------------
def peft_dora_dir(tmp_path):
    base, targets = build("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                   use_dora=True))
    pm.save_pretrained(tmp_path / "peft")
    return base, tmp_path / "peft"


def test_a_magnitude_of_the_wrong_length_names_the_module_and_both_shapes(tmp_path):
    base, directory = peft_dora_dir(tmp_path)
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"
    tensors[key] = tensors[key][:-1]
    save_file(tensors, path)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ShapeError) as err:
        lt.load_adapter(base, directory)
    assert key in str(err.value) and "(15,)" in str(err.value) and "(16,)" in str(err.value)
    assert not lt.adapter_layers(base)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_a_magnitude_without_use_dora_and_use_dora_without_magnitude_are_refused(tmp_path):
    base, directory = peft_dora_dir(tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    config["use_dora"] = False
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match="does not say use_dora"):
        lt.load_adapter(base, directory)
    config["use_dora"] = True
    (directory / "adapter_config.json").write_text(json.dumps(config))
    path = directory / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if "magnitude" not in k}, path)
    with pytest.raises(AdapterFormatError, match="says use_dora but module"):
        lt.load_adapter(base, directory)
    assert not lt.adapter_layers(base)


def test_dora_over_an_nf4_base_is_refused_and_the_model_left_as_it_was():
    base, targets = build("llama")
    lt.quantize_nf4(base, target_modules=["q_proj"])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterStateError, match="DoRA adapter needs a dense base weight"):
        lt.inject(base, lt.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    assert not lt.adapter_layers(base)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    other, _ = build("llama")
    lt.inject(other, lt.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(AdapterStateError, match="DoRA"):
        lt.quantize_nf4(other, target_modules=["q_proj"])


def test_the_optimizer_refuses_dora_checkpoints_by_name(tmp_path):
    _, directory = peft_dora_dir(tmp_path)
    with pytest.raises(AdapterFormatError, match="use_dora"):
        open_checkpoint("c1", directory)


def test_the_training_config_takes_use_dora(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"data: [{tmp_path}]\noutput_dir: {tmp_path / 'out'}\nlora: {{use_dora: true, rank: 4}}\n")
    assert TrainConfig.from_yaml(path).lora.adapter_config().use_dora is True
    path.write_text(f"data: [{tmp_path}]\noutput_dir: {tmp_path / 'out'}\nlora: {{use_dora: 'yes'}}\n")
    with pytest.raises(ValueError, match="use_dora"):
        TrainConfig.from_yaml(path)


def test_set_dora_recompute_keeps_less_and_gives_the_same_gradients():
    model, targets = build("llama")
    model = model.double().train()
    lt.inject(model, lt.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=targets, use_dora=True))
    perturb(model, 3)
    ids = torch.randint(0, 64, (2, 12))
    grads, saved = {}, {}
    for recompute in (False, True):
        lt.set_dora_recompute(model, recompute)
        model.zero_grad()
        torch.manual_seed(11)  # the same dropout seeds in both runs
        out = {}

        def forward(out=out):
            out["loss"] = model(input_ids=ids, labels=ids).loss

        saved[recompute] = saved_storages(forward)
        out["loss"].backward()
        grads[recompute] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(saved[True]) < len(saved[False])
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-10, atol=1e-12, msg=n)
    with pytest.raises(TypeError, match="recompute"):
        lt.set_dora_recompute(model, "yes")


def test_the_training_config_takes_dora_recompute(tiny_default_model, corpus, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"data: [{tmp_path}]\noutput_dir: {tmp_path / 'out'}\nlora: {{dora_recompute: true}}\n")
    with pytest.raises(ValueError, match=r"c\.yaml: 'lora\.dora_recompute' applies with 'lora\.use_dora: true'"):
        TrainConfig.from_yaml(path)
    seen = []
    cfg = {"model": str(tiny_default_model), "data": str(corpus), "output_dir": str(tmp_path / "run"),
           "max_steps": 1, "batch_size": 2, "max_seq_length": 16, "plot": False,
           "lora": {"rank": 4, "target_modules": ["q_proj"], "use_dora": True, "dora_recompute": True}}
    engine.Trainer(cfg, progress=False, on_step=lambda t: seen.extend(
        layer.dora_recompute for layer in lt.adapter_layers(t.model).values())).train()
    assert seen and all(seen)


def test_lora_config_converts_use_dora_both_ways():
    theirs = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    ours = lt.LoraConfig.from_peft(theirs)
    assert ours.use_dora is True
    assert ours.to_peft().use_dora is True
    with pytest.raises(lt.ConfigError, match="use_dora"):
        lt.LoraConfig(target_modules=["q_proj"], use_dora="true")


def test_the_engine_trains_resumes_and_writes_a_peft_dora_adapter(tiny_default_model, corpus, tmp_path):
    def cfg(out):
        return {"model": str(tiny_default_model), "data": str(corpus), "output_dir": str(out), "max_steps": 6,
                "batch_size": 2, "max_seq_length": 32, "logging_steps": 2, "save_steps": 3, "eval_steps": 3,
                "learning_rate": 5e-3, "seed": 7, "plot": False,
                "lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
                         "use_dora": True}}

    full = lt.train.train(cfg(tmp_path / "full"), progress=False)

    def stop_at_4(trainer):
        if trainer.global_step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.Trainer(cfg(tmp_path / "cut"), progress=False, on_step=stop_at_4).train()
    resumed = lt.train.train(cfg(tmp_path / "cut"), resume=True, progress=False)
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and sum(k.endswith("lora_magnitude_vector") for k in a) == 4
    for k in a:
        assert torch.equal(a[k], b[k]), k
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_default_model).eval()
    norms = {k: v for k, v in a.items() if k.endswith("lora_magnitude_vector")}
    initial = {f"base_model.model.{n}.lora_magnitude_vector": base.get_submodule(n).weight.norm(dim=1)
               for n in (k[len("base_model.model."):-len(".lora_magnitude_vector")] for k in norms)}
    assert any(not torch.allclose(norms[k], initial[k], atol=1e-6) for k in norms)  # the magnitudes trained
    ids = torch.randint(0, 500, (1, 16))
    ours = transformers.AutoModelForCausalLM.from_pretrained(tiny_default_model)
    lt.load_adapter(ours, full.adapter_dir)
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny_default_model),
                                            full.adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_compiled_training_with_dropout_matches_eager_without():
    base, targets = build("llama")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    m = copy.deepcopy(base)
    lt.inject(m, lt.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=targets, use_dora=True))
    perturb(m, 2)
    m.train()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    compiled(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any("magnitude" in n for n in grads)
    # without dropout the compiled gradients are the eager ones
    for layer in lt.adapter_layers(m).values():
        layer.settings["default"] = dataclasses.replace(layer.settings["default"], dropout=0.0)
        layer.compiled_view()
    m.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    torch.compile(m, fullgraph=True, backend="aot_eager")(input_ids=ids, labels=ids).loss.backward()
    compiled_grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad(set_to_none=True)
    m(input_ids=ids, labels=ids).loss.backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(compiled_grads[n], p.grad, rtol=1e-5, atol=1e-6)


def test_hotswap_of_a_dora_adapter_takes_its_magnitudes(tmp_path):
    base, targets = build("llama")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    for seed, name in ((2, "one"), (3, "two")):
        m = copy.deepcopy(base)
        lt.inject(m, lt.LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True))
        perturb(m, seed)
        lt.save_adapter(m, tmp_path / name)
    expected = copy.deepcopy(base)
    lt.load_adapter(expected, tmp_path / "two")
    model = copy.deepcopy(base)
    lt.load_adapter(model, tmp_path / "one")
    lt.hotswap_adapter(model, tmp_path / "two")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected(ids).logits, rtol=1e-6, atol=1e-6)
    plain = copy.deepcopy(base)
    lt.inject(plain, lt.LoraConfig(r=4, alpha=8, target_modules=targets))
    with pytest.raises(AdapterFormatError, match="DoRA"):
        lt.hotswap_adapter(plain, tmp_path / "two")


def test_per_sample_dropout_seeds_keep_the_magnitude():
    # distributed training keys each sample's dropout mask on the sample: a DoRA layer stays a DoRA layer there
    torch.manual_seed(0)
    layer = lt.LoraLinear(torch.nn.Linear(16, 12))
    layer.add_adapter("d", r=4, alpha=8, dropout=0.3)
    with torch.no_grad():
        layer.lora_B["d"].normal_(std=0.3)
    layer.set_magnitude("d")
    with torch.no_grad():
        layer.lora_magnitude_vector["d"].mul_(1.5)
    layer.train()
    x = torch.randn(3, 5, 16)
    layer.dropout_seeds = [11, 22, 33]
    y = layer(x)
    A, B, _ = layer.factors("d")
    m = layer.lora_magnitude_vector["d"]
    expected = torch.cat([ops.dora_linear(x[i:i + 1], layer.base_layer.weight, layer.base_layer.bias, A, B, None, m,
                                          layer.settings["d"].scaling, 0.3, s) for i, s in enumerate([11, 22, 33])])
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def dora_model(kind: str, zero_row: bool = True):
    model, targets = build(kind)
    lt.inject(model, lt.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=targets, use_dora=True))
    perturb(model, 5)
    with torch.no_grad():  # biases that are not 0 (GPT-2 starts with zeros): g must not scale them
        for layer in lt.adapter_layers(model).values():
            if layer.base_layer.bias is not None:
                layer.base_layer.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    if zero_row:  # a zero magnitude: g is 0 on that row, cached or not
        with torch.no_grad():
            next(iter(lt.adapter_layers(model).values())).lora_magnitude_vector["default"][0] = 0.0
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("tokens", [12, 20], ids=["fewer-rows-than-inputs", "more-rows"])
def test_dora_caching_gives_the_outputs_of_the_norms_computed_each_time(kind, tokens):
    model = dora_model(kind)
    ids = torch.randint(0, 64, (2, tokens), generator=torch.Generator().manual_seed(2))
    layers = [layer for layer in lt.adapter_layers(model).values()]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with lt.dora_caching(model):
            first = model(input_ids=ids).logits
            kept = [layer.dora_cache["default"][2] for layer in layers]
            second = model(input_ids=ids).logits
            assert all(layer.dora_cache["default"][2] is g for layer, g in zip(layers, kept, strict=True))
        assert all(not layer.dora_caching and not layer.dora_cache for layer in layers)
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(first, second)


def test_dora_caching_sees_every_change_made_through_torch(tmp_path):
    model = dora_model("llama")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    layers = list(lt.adapter_layers(model).values())
    lt.dora_caching(model)

    def check():
        """The model's output with what its layers kept, against a copy's, which starts without it; then the
        cache filled again for the next change."""
        with torch.no_grad():
            got = model(input_ids=ids).logits
            want = copy.deepcopy(model)(input_ids=ids).logits
            model(input_ids=ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert all("default" in layer.dora_cache or layer.active_adapter != "default" for layer in layers)
        return got

    before = check()
    with torch.no_grad():
        layers[0].lora_A["default"].mul_(1.5)  # in place: a new version
    after = check()
    assert not torch.allclose(before, after)
    saved = copy.deepcopy(model.state_dict())
    lt.save_adapter(model, tmp_path / "a")
    perturb(model, 9)
    check()
    model.load_state_dict(saved)
    torch.testing.assert_close(check(), after, rtol=1e-5, atol=1e-5)
    lt.load_adapter(model, tmp_path / "a", adapter_name="other")
    lt.set_adapter(model, "other")
    torch.testing.assert_close(check(), after, rtol=1e-5, atol=1e-5)
    lt.set_adapter(model, "default")
    check()
    model.train()  # a training step moves every factor's version
    opt = torch.optim.SGD(lt.trainable_parameters(model), lr=0.1)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    check()
    layers[1].lora_B["default"] = torch.nn.Parameter(layers[1].lora_B["default"].detach() * 2)  # a new tensor
    check()
    with torch.no_grad():
        layers[2].base_layer.weight.mul_(0.5)
    check()
    lt.merge(model)
    lt.unmerge(model)
    check()
    model.double()
    check()


def test_dora_caching_is_not_used_where_the_adapter_trains():
    model = dora_model("llama")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    layers = list(lt.adapter_layers(model).values())
    grads = {}
    for enabled in (False, True):
        lt.dora_caching(model, enabled)
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()  # eval mode, gradients on
        grads[enabled] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert not any(layer.dora_cache for layer in layers)
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, msg=n)
    model.train()
    with torch.no_grad():
        model(input_ids=ids)
    assert not any(layer.dora_cache for layer in layers)


def test_dora_caching_copies_pickles_and_refuses_bad_input(tmp_path):
    model = dora_model("gpt2")
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(6))
    lt.dora_caching(model)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    twin = copy.deepcopy(model)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    for other in (twin, loaded):
        assert all(not layer.dora_cache for layer in lt.adapter_layers(other).values())
        with torch.no_grad():
            torch.testing.assert_close(other(input_ids=ids).logits, want)
    with pytest.raises(TypeError, match="enabled"):
        lt.dora_caching(model, 1)
    with pytest.raises(AdapterStateError):
        lt.dora_caching(torch.nn.Linear(2, 2))
