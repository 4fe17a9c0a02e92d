"""LoRA on MoE experts (``LoraConfig(target_parameters=...)``): one adapter per expert on transformers' fused 3-D
expert weights, applied to the tokens routed to each expert by one native call. Against the real PEFT package
(its ``target_parameters``, files both ways, logits within 1e-5 in float32) on Mixtral, Qwen3-MoE, OLMoE and
GPT-OSS (experts stored transposed, with biases); exact merge/unmerge; training reaches the expert adapters only;
bad input gets an error naming it."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import lispetorch as lt
from lispetorch import ops
from lispetorch.errors import AdapterFormatError, ConfigError, ShapeError
from lispetorch.experts import LoraExperts

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

SMALL = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, intermediate_size=24, num_local_experts=4,
                                                  num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**SMALL, intermediate_size=24, moe_intermediate_size=12,
                                                     num_experts=4, num_experts_per_tok=2, head_dim=8),
    "olmoe": lambda: transformers.OlmoeConfig(**SMALL, intermediate_size=20, num_experts=4, num_experts_per_tok=2),
    # experts stored transposed, (E, in, out), with biases and an interleaved gate
    "gpt_oss": lambda: transformers.GptOssConfig(**SMALL, intermediate_size=24, num_local_experts=4,
                                                 num_experts_per_tok=2, head_dim=8),
}
TARGETS = ["down_proj", "gate_up_proj"]


def base_model(kind: str):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[kind]()).eval()


def experts_of(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraExperts)}


def randomize(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lt.adapter_layers(model).values():
            for name in layer.lora_B:
                Bs = layer.lora_B[name].values() if isinstance(layer, LoraExperts) else [layer.lora_B[name]]
                for B in Bs:
                    B.copy_(torch.randn(B.shape, generator=g) * 0.3)


def ids(n=3, t=11):
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_ours_loads_in_peft_and_peft_in_ours(kind, tmp_path):
    base = base_model(kind)
    x = ids()
    with torch.no_grad():
        plain = base(x).logits
    ours = copy.deepcopy(base)
    layers = lt.inject(ours, lt.LoraConfig(r=2, alpha=6, target_modules=["q_proj", "v_proj"],
                                           target_parameters=TARGETS))
    assert len(experts_of(ours)) == 2 and all(isinstance(layers[n], LoraExperts) for n in experts_of(ours))
    randomize(ours)
    with torch.no_grad():
        mine = ours(x).logits
    assert (mine - plain).abs().max() > 1e-3  # the adapters change the output
    lt.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_parameters"] == TARGETS
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(x).logits, mine, rtol=0, atol=1e-5)

    # PEFT's own adapter, random B, into ours
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=["k_proj"], target_parameters=TARGETS, init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = copy.deepcopy(base)
    lt.load_adapter(loaded, tmp_path / "theirs")
    with torch.no_grad():
        expected = theirs(x).logits
        got = loaded(x).logits
    assert (expected - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # and back out: the same tensors under the same keys
    lt.save_adapter(loaded, tmp_path / "again")
    a, b = load_file(tmp_path / "theirs" / "adapter_model.safetensors"), \
        load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_merge_unmerge_exact(kind):
    model = base_model(kind)
    lt.inject(model, lt.LoraConfig(r=2, alpha=4, target_modules=[], target_parameters=TARGETS))
    randomize(model)
    x = ids()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        unmerged = model(x).logits
        lt.merge(model)
        assert lt.is_merged(model)
        merged = model(x).logits
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(n.endswith(("gate_up_proj", "down_proj")) for n in changed)
    lt.unmerge(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bfloat16_unmerge_bit_exact_after_many_cycles():
    model = base_model("mixtral").to(torch.bfloat16)
    lt.inject(model, lt.LoraConfig(r=2, alpha=16, target_modules=[], target_parameters=TARGETS))
    randomize(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(100):
        lt.merge(model)
        lt.unmerge(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_training_reaches_expert_adapters_only_with_peft_gradients(tmp_path):
    base = base_model("mixtral")
    ours = copy.deepcopy(base)
    lt.inject(ours, lt.LoraConfig(r=2, alpha=4, target_modules=[], target_parameters=TARGETS))
    randomize(ours)
    lt.save_adapter(ours, tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", is_trainable=True)
    x = ids()
    ours.train()
    pm.train()
    ours(x, labels=x).loss.backward()
    pm(x, labels=x).loss.backward()
    trained = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in ours.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in trained) and len(trained) == 8
    peft_grads = {k: p.grad for k, p in pm.named_parameters() if p.grad is not None}
    for name, layer in experts_of(ours).items():
        for p in layer.parameter_names:
            depth = "" if p == "down_proj" else ".base_layer"  # PEFT nests gate_up_proj inside
            key = f"base_model.model.{name}{depth}"
            gA = peft_grads[f"{key}.lora_A.default.weight"]
            gB = peft_grads[f"{key}.lora_B.default.weight"]
            from_ours = lt.experts.to_peft(layer.lora_A["default"][p].grad, layer.lora_B["default"][p].grad)
            torch.testing.assert_close(from_ours[0], gA, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(from_ours[1], gB, rtol=1e-4, atol=1e-6)


def test_routed_tokens_only_and_dropout_trains():
    """Each expert's adapter meets only its routed rows: an expert no token reaches gets no gradient; with dropout
    the step still trains (PEFT refuses dropout on expert weights)."""
    torch.manual_seed(0)
    E, S, d_in, d_out, r = 4, 9, 6, 5, 2
    x = torch.randn(S, d_in, requires_grad=True)
    W = torch.randn(E, d_out, d_in)
    A = torch.randn(E, r, d_in, requires_grad=True)
    B = torch.randn(E, d_out, r, requires_grad=True)
    offsets = torch.tensor([4, 4, 9, 9])  # experts 1 and 3 get no rows
    y = ops.lora_experts_linear(x, W, None, A, B, offsets, 0.5, 0.2, 11)
    y.square().sum().backward()
    assert A.grad[[1, 3]].abs().sum() == 0 and B.grad[[1, 3]].abs().sum() == 0
    assert A.grad[[0, 2]].abs().sum() > 0 and B.grad[[0, 2]].abs().sum() > 0
    model = base_model("olmoe").train()
    lt.inject(model, lt.LoraConfig(r=2, dropout=0.1, target_modules=[], target_parameters=["down_proj"]))
    batch = ids()
    model(batch, labels=batch).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)


def test_native_op_matches_reference_and_gradcheck():
    torch.manual_seed(0)
    E, S, d_in, d_out, r = 3, 8, 5, 4, 2
    x = torch.randn(S, d_in, dtype=torch.float64, requires_grad=True)
    Wt = torch.randn(E, d_in, d_out, dtype=torch.float64, requires_grad=True)  # a transposed stack
    b = torch.randn(E, d_out, dtype=torch.float64, requires_grad=True)
    A = torch.randn(E, r, d_in, dtype=torch.float64, requires_grad=True)
    B = torch.randn(E, d_out, r, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([2, 2, 8], dtype=torch.int32)
    expert = torch.repeat_interleave(torch.arange(E), torch.tensor([2, 0, 6]))
    y = ops.lora_experts_linear(x, Wt.transpose(1, 2), b, A, B, offsets, 0.7)
    ref = torch.stack([x[i] @ Wt[e] + b[e] + 0.7 * B[e] @ (A[e] @ x[i]) for i, e in enumerate(expert.tolist())])
    torch.testing.assert_close(y, ref)
    assert torch.autograd.gradcheck(
        lambda x, w, b, A, B: ops.lora_experts_linear(x, w.transpose(1, 2), b, A, B, offsets, 0.7, 0.3, 5),
        (x, Wt, b, A, B))
    torch.library.opcheck(torch.ops.lispetorch.lora_experts_linear,
                          (x, Wt.detach().transpose(1, 2), b, A, B, offsets, 0.7, 0.0, 0))
    with pytest.raises(RuntimeError, match="offsets end at 7 but the input has 8 rows"):
        ops.lora_experts_linear(x, Wt.transpose(1, 2), b, A, B, torch.tensor([2, 2, 7]), 0.7)


def test_bad_target_parameters_name_the_candidates():
    model = base_model("mixtral")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"'nope' matches no parameter.*\['down_proj', 'gate.weight', 'gate_up_proj"):
        lt.inject(model, lt.LoraConfig(target_modules=[], target_parameters=["nope"]))
    with pytest.raises(ConfigError, match=r"q_proj.weight.*\(16, 16\).*neither a 3-D expert weight.*gate_up_proj"):
        lt.inject(model, lt.LoraConfig(target_modules=[], target_parameters=["q_proj.weight"]))
    with pytest.raises(ConfigError, match="DoRA"):
        lt.LoraConfig(target_modules=[], target_parameters=TARGETS, use_dora=True)
    with pytest.raises(ConfigError, match="target_modules must be a non-empty list"):  # no target_parameters
        lt.LoraConfig(target_modules=[])
    assert not lt.adapter_layers(model)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_file_with_wrong_expert_count_is_refused(tmp_path):
    base = base_model("mixtral")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=[],
                                                                       target_parameters=TARGETS))
    theirs.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("experts.lora_A.weight"))
    tensors[key] = tensors[key][:6]  # rank 2 over 3 experts, for a model of 4
    save_file(tensors, path)
    model = copy.deepcopy(base)
    with pytest.raises(ShapeError, match=r"4 experts .* needs \(2·4, 24\)"):
        lt.load_adapter(model, tmp_path / "a")
    assert not lt.adapter_layers(model)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["target_parameters"] = ["gate_proj"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match="gate_proj"):
        lt.load_adapter(model, tmp_path / "a")


@pytest.fixture
def tiny_moe_model(tiny_default_model, tmp_path):
    """A tiny Mixtral with the default model's tokenizer, saved as a model directory."""
    import shutil

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(**{**SMALL, "vocab_size": 512}, intermediate_size=24, num_local_experts=4,
                                     num_experts_per_tok=2)
    d = tmp_path / "moe"
    transformers.MixtralForCausalLM(cfg).save_pretrained(d)
    for f in tiny_default_model.iterdir():
        if "token" in f.name:
            shutil.copy(f, d / f.name)
    return d


def test_engine_trains_resumes_and_writes_a_peft_adapter(tiny_moe_model, corpus, tmp_path):
    from safetensors.torch import load_file as load

    from lispetorch.train import engine

    def config(out):
        return {"model": str(tiny_moe_model), "data": str(corpus), "output_dir": str(out), "max_steps": 6,
                "batch_size": 2, "max_seq_length": 24, "logging_steps": 2, "save_steps": 3, "eval_steps": 3,
                "learning_rate": 5e-3, "seed": 7, "plot": False,
                "lora": {"rank": 2, "alpha": 4, "dropout": 0.1, "target_modules": [],
                         "target_parameters": TARGETS}}

    full = lt.train.train(config(tmp_path / "full"), progress=False)
    assert full.eval_loss < full.initial_eval_loss

    def stop_at_4(trainer):
        if trainer.global_step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.Trainer(config(tmp_path / "cut"), progress=False, on_step=stop_at_4).train()
    resumed = lt.train.train(config(tmp_path / "cut"), resume=True, progress=False)
    a = load(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("experts.base_layer.lora_A" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randint(0, 512, (2, 9))
    ours = transformers.AutoModelForCausalLM.from_pretrained(tiny_moe_model).eval()
    lt.load_adapter(ours, full.adapter_dir)
    pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny_moe_model),
                                        full.adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, pm(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_peft_all_linear_adapter_with_router_and_experts_loads(kind, tmp_path):
    """PEFT's all-linear on these MoE types adapts the attention, the experts (gate_up_proj at twice the rank) and
    the router's 2-D weight through target_parameters; that file loads here with PEFT's logits, and saved back it
    is PEFT's own."""
    base = base_model(kind)
    torch.manual_seed(4)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear",
                                                                       init_lora_weights=False)).eval()
    assert "gate.weight" in theirs.peft_config["default"].target_parameters
    theirs.save_pretrained(tmp_path / "theirs")
    ours = copy.deepcopy(base)
    layers = lt.load_adapter(ours, tmp_path / "theirs")
    routers = [n for n, layer in layers.items() if isinstance(layer, LoraExperts) and layer.single]
    assert len(routers) == 2
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=0, atol=1e-5)
    lt.save_adapter(ours, tmp_path / "again")
    a, b = load_file(tmp_path / "theirs" / "adapter_model.safetensors"), \
        load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(x).logits, ours(x).logits, rtol=0, atol=1e-5)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    lt.merge(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=0, atol=1e-5)
    lt.unmerge(ours)
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters())


def test_compiles_whole_and_trains():
    """The routing has shapes known before it runs, so torch.compile(fullgraph=True) traces the expert adapters:
    the same logits, and a compiled training step reaches every adapter factor."""
    model = base_model("mixtral")
    lt.inject(model, lt.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=TARGETS))
    randomize(model)
    x = ids()
    with torch.no_grad():
        eager = model(x).logits
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, eager, rtol=0, atol=1e-5)
    model.train()
    compiled(x, labels=x).loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(trained) == 12 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_a_refused_merge_leaves_every_weight_and_a_changed_weight_warns():
    model = base_model("mixtral")
    lt.inject(model, lt.LoraConfig(r=2, target_modules=[], target_parameters=TARGETS))
    randomize(model)
    layer = experts_of(model)["model.layers.1.mlp.experts"]
    with torch.no_grad():  # the last expert of the last weight merged overflows float32
        layer.lora_B["default"]["down_proj"][3].fill_(3e38)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        lt.merge(model)
    assert not lt.is_merged(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        layer.lora_B["default"]["down_proj"][3].fill_(0.1)
    lt.merge(model)
    with torch.no_grad():
        layer.base_layer.down_proj[0, 0, 0] += 1.0  # changed while merged
    with pytest.warns(UserWarning, match="changed while merged: unmerging by subtraction"):
        lt.unmerge(model)
    assert not lt.is_merged(model)


def test_switch_disable_delete_and_optimizer_groups():
    model = base_model("qwen3_moe")
    x = ids()
    with torch.no_grad():
        plain = model(x).logits
    lt.inject(model, lt.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=TARGETS))
    lt.inject(model, lt.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=TARGETS), adapter_name="b")
    randomize(model)
    assert lt.active_adapter(model) == "b" and lt.adapter_names(model) == ["default", "b"]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".b." in n or n.endswith(".b") for n in trained)
    groups = lt.optimizer_param_groups(model, lr=1e-3, loraplus_lr_ratio=4.0)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    with torch.no_grad():
        with_b = model(x).logits
        with lt.disabled(model):
            torch.testing.assert_close(model(x).logits, plain, rtol=0, atol=0)
        lt.set_adapter(model, "default")
        assert not torch.equal(model(x).logits, with_b)
    lt.delete_adapter(model, "b")
    lt.delete_adapter(model, "default")
    assert not lt.adapter_layers(model) and not experts_of(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, plain, rtol=0, atol=0)


def test_combine_refuses_expert_checkpoints(tmp_path):
    """An expert stack's keys hold one ΔW per expert; read as one low-rank pair they would give a wrong Gram, so
    the checkpoint optimizer refuses checkpoints with target_parameters, naming them."""
    from lispetorch import combine

    base = base_model("mixtral")
    for name in ("a", "b"):
        model = copy.deepcopy(base)
        lt.inject(model, lt.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=TARGETS))
        randomize(model, seed=ord(name))
        lt.save_adapter(model, tmp_path / name)
    with pytest.raises(lt.AdapterFormatError, match=r"checkpoint 'a': .*target_parameters.*one ΔW per expert"):
        combine.optimize({"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}, "b")


def test_hotswap_expert_adapters_into_a_compiled_model(tmp_path):
    """PEFT's expert adapters of other ranks and alphas swapped into a compiled model in place: PEFT's logits, no
    new graph; a file for other weights or a larger rank is refused with nothing changed."""
    torch._dynamo.reset()
    base = base_model("mixtral")
    model = copy.deepcopy(base)
    lt.inject(model, lt.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], target_parameters=TARGETS))
    randomize(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = ids()
    with torch.no_grad():
        compiled(x)
    counters = torch._dynamo.utils.counters
    frames = counters["stats"]["unique_graphs"]
    for i, (r, alpha) in enumerate([(2, 3), (4, 16)]):
        torch.manual_seed(10 + i)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=r, lora_alpha=alpha, target_modules=["q_proj"], target_parameters=TARGETS,
            init_lora_weights=False)).eval()
        theirs.save_pretrained(tmp_path / str(i))
        lt.hotswap_adapter(model, tmp_path / str(i))
        with torch.no_grad():
            torch.testing.assert_close(compiled(x).logits, theirs(x).logits, rtol=0, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == frames
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, fields in enumerate([dict(r=8, target_parameters=TARGETS), dict(r=2, target_parameters=["down_proj"])]):
        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj"], **fields)) \
            .save_pretrained(tmp_path / f"bad{i}")
        with pytest.raises(lt.AdapterFormatError, match="rank 8, more than|adapts the same weights"):
            lt.hotswap_adapter(model, tmp_path / f"bad{i}")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
