"""What a PEFT user reaches for, against the real PEFT package: layer selection and per-module ranks on inject,
converting configs, merged export, LoRA+ parameter groups, modules_to_save, gradient checkpointing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load, logits, randomize_adapters, tiny_config

import lispetorch as lt

peft = pytest.importorskip("peft")

PEFT_PREFIX = "base_model.model."


def peft_layers(peft_model) -> dict:
    """PEFT's LoRA layers by module name in the base model."""
    return {n.removeprefix(PEFT_PREFIX): m for n, m in peft_model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def peft_model(directory, **config):
    model = peft.get_peft_model(load(directory), peft.LoraConfig(init_lora_weights=False, **config))
    return model.eval()


# --- layer selection and per-module ranks ---------------------------------------------------------------------
SELECTIONS = [
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1])),
    ("llama", dict(target_modules=["q_proj", "up_proj"], layers_to_transform=0, layers_pattern="layers")),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[1], layers_pattern=["h"])),
    ("llama", dict(target_modules=["q_proj", "v_proj", "o_proj"],
                   rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6},
                   alpha_pattern={"v_proj": 3, "o_proj": 20})),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], rank_pattern={r"h\.0\.attn\.c_proj": 2},
                  alpha_pattern={"c_attn": 5})),
]


@pytest.mark.parametrize(("arch", "selection"), SELECTIONS)
def test_selection_and_patterns_match_peft(model_dirs, input_ids, tmp_path, arch, selection):
    theirs = peft_model(model_dirs[arch], r=4, lora_alpha=8, **selection)
    expected = peft_layers(theirs)
    ours = load(model_dirs[arch])
    cfg = lt.LoraConfig(r=4, alpha=8, **{k.replace("lora_alpha", "alpha"): v for k, v in selection.items()})
    layers = lt.inject(ours, cfg)
    assert sorted(layers) == sorted(expected)
    for name, layer in layers.items():
        assert layer.r["default"] == expected[name].r["default"], name
        assert layer.scaling["default"] == pytest.approx(expected[name].scaling["default"]), name
    # our file loads in PEFT with our logits, and carries the selection
    randomize_adapters(ours)
    lt.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    if "layers_to_transform" in selection:
        assert config["layers_to_transform"] == [selection["layers_to_transform"]] \
            if isinstance(selection["layers_to_transform"], int) else selection["layers_to_transform"]
        assert isinstance(config["target_modules"], list)
    again = peft.PeftModel.from_pretrained(load(model_dirs[arch]), tmp_path / "ours").eval()
    assert sorted(peft_layers(again)) == sorted(expected)
    torch.testing.assert_close(logits(again, input_ids), logits(ours, input_ids), rtol=1e-5, atol=1e-5)
    # PEFT's file loads here with PEFT's logits
    theirs.save_pretrained(tmp_path / "theirs")
    back = load(model_dirs[arch])
    assert sorted(lt.load_adapter(back, tmp_path / "theirs")) == sorted(expected)
    torch.testing.assert_close(logits(back, input_ids), logits(theirs, input_ids), rtol=1e-5, atol=1e-5)


def test_patterns_apply_to_svd_inits(model_dirs):
    model = load(model_dirs["llama"])
    layers = lt.inject(model, lt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init="pissa",
                                            rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 4}))
    assert {n: layer.r["default"] for n, layer in layers.items()} == {
        n: 2 if n.endswith("v_proj") else 4 for n in layers}
    assert all(layer.lora_alpha["default"] == (4 if n.endswith("q_proj") else 16) for n, layer in layers.items())


@pytest.mark.parametrize(("options", "words"), [
    (dict(target_modules=["q_proj"], layers_to_transform=[1, 5]), ["layers_to_transform", "[5]", "[0, 1]"]),
    (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks"),
     ["layers_pattern", "'blocks'", "['layers']"]),
    (dict(target_modules=["q_proj"], rank_pattern={"k_proj": 2}), ["rank_pattern", "'k_proj'", "q_proj"]),
    (dict(target_modules=["q_proj"], alpha_pattern={r"layers\.7\.": 2}), ["alpha_pattern", "layers"]),
])
def test_selection_errors_name_the_value_and_what_exists(model_dirs, input_ids, options, words):
    model = load(model_dirs["llama"])
    before = logits(model, input_ids)
    with pytest.raises(lt.ConfigError) as e:
        lt.inject(model, lt.LoraConfig(r=2, **options))
    for word in words:
        assert word in str(e.value), (word, str(e.value))
    assert not lt.adapter_layers(model)
    torch.testing.assert_close(logits(model, input_ids), before, rtol=0, atol=0)


@pytest.mark.parametrize(("options", "word"), [
    (dict(target_modules="all-linear", layers_to_transform=[0]), "layers_to_transform"),
    (dict(target_modules=r".*q_proj", layers_pattern="layers", layers_to_transform=0), "layers_to_transform"),
    (dict(target_modules=["q_proj"], layers_pattern="layers"), "layers_pattern"),
    (dict(layers_to_transform=[-1]), "layers_to_transform"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
    (dict(alpha_pattern={"q_proj(": 2}), "alpha_pattern"),
    (dict(modules_to_save=[]), "modules_to_save"),
])
def test_config_refuses_what_peft_refuses(options, word):
    with pytest.raises(lt.ConfigError, match=word):
        lt.LoraConfig(**options)


# --- converting configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields", [
    dict(r=4, lora_alpha=12, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], use_rslora=True),
    dict(r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[0], layers_pattern="layers",
         rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 5}, init_lora_weights="gaussian",
         exclude_modules=["x"]),
    dict(r=2, target_modules=r".*\.self_attn\.(q|k)_proj", modules_to_save=["lm_head"], init_lora_weights="pissa"),
])
def test_lora_config_from_and_to_peft(model_dirs, fields):
    theirs_cfg = peft.LoraConfig(**fields)
    ours_cfg = lt.LoraConfig.from_peft(theirs_cfg)
    ours = load(model_dirs["llama"])
    layers = lt.inject(ours, ours_cfg)
    theirs = peft.get_peft_model(load(model_dirs["llama"]), theirs_cfg)
    expected = peft_layers(theirs)
    assert sorted(layers) == sorted(expected)
    for name, layer in layers.items():
        assert (layer.r["default"], layer.scaling["default"]) == (expected[name].r["default"],
                                                                   pytest.approx(expected[name].scaling["default"]))
        assert layer.lora_dropout["default"] == fields.get("lora_dropout", 0.0)
    back = ours_cfg.to_peft(task_type="CAUSAL_LM")
    assert isinstance(back, peft.LoraConfig) and back.task_type == "CAUSAL_LM"
    for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "init_lora_weights",
                "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "modules_to_save"):
        assert getattr(back, key) == getattr(theirs_cfg, key), key
    assert lt.LoraConfig.from_peft(back) == ours_cfg


@pytest.mark.parametrize(("fields", "word"), [
    (dict(target_modules=["q_proj"], lora_bias=True), "lora_bias"),  # use_dora converts now: tests/test_dora.py
    (dict(target_modules=["q_proj"], bias="all"), "bias"),
    (dict(target_modules=["q_proj"], init_lora_weights="olora"), "olora"),
    (dict(target_modules=["q_proj"], init_lora_weights=False), "False"),
    (dict(), "target_modules"),
])
def test_from_peft_refuses_what_it_cannot_carry(fields, word):
    with pytest.raises(lt.ConfigError, match=word):
        lt.LoraConfig.from_peft(peft.LoraConfig(**fields))


# --- merged export --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "targets", "init"), [("llama", "all-linear", "kaiming"),
                                                       ("gpt2", ["c_attn", "c_fc"], "kaiming"),
                                                       ("llama", ["q_proj", "v_proj"], "pissa")])
def test_merge_and_unload_gives_a_plain_model(model_dirs, input_ids, tmp_path, arch, targets, init):
    from transformers import AutoModelForCausalLM

    model = load(model_dirs[arch])
    lt.inject(model, lt.LoraConfig(r=4, alpha=8, target_modules=targets, init=init))
    randomize_adapters(model)
    adapted = logits(model, input_ids)
    lt.save_as_lora(model, tmp_path / "adapter")
    plain_type = type(load(model_dirs[arch]).get_submodule(next(iter(lt.adapter_layers(model)))))
    names = list(lt.adapter_layers(model))
    assert lt.merge_and_unload(model) is model
    assert not lt.adapter_layers(model)
    assert all(type(model.get_submodule(n)) is plain_type for n in names)
    torch.testing.assert_close(logits(model, input_ids), adapted, rtol=1e-5, atol=1e-5)
    # PEFT's own merge of the same adapter gives the same model
    theirs = peft.PeftModel.from_pretrained(load(model_dirs[arch]), tmp_path / "adapter").merge_and_unload()
    torch.testing.assert_close(logits(theirs, input_ids), adapted, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(again, input_ids), adapted, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_refuses_an_nf4_base_and_leaves_the_model(model_dirs, input_ids):
    model = load(model_dirs["llama"])
    lt.inject(model, lt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    lt.quantize_nf4(model, ["v_proj"])
    before = logits(model, input_ids)
    with pytest.raises(lt.AdapterStateError, match="v_proj.*NF4"):
        lt.merge_and_unload(model)
    assert len(lt.adapter_layers(model)) == 4 and not lt.is_merged(model)
    torch.testing.assert_close(logits(model, input_ids), before, rtol=0, atol=0)
    with pytest.raises(lt.AdapterStateError, match="no adapters"):
        lt.merge_and_unload(load(model_dirs["llama"]))


# --- LoRA+ ----------------------------------------------------------------------------------------------------
def _adamw_steps(model, params_or_groups, input_ids, steps=3):
    """AdamW steps in eval mode (the models' own dropout off, so both sides see the same function)."""
    opt = torch.optim.AdamW(params_or_groups)
    for _ in range(steps):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loraplus_groups_train_as_peft_loraplus(model_dirs, input_ids, tmp_path, arch):
    from peft.optimizers import create_loraplus_optimizer

    targets = {"llama": ["q_proj", "v_proj", "up_proj"], "gpt2": ["c_attn", "c_fc"]}[arch]
    ours = load(model_dirs[arch])
    lt.inject(ours, lt.LoraConfig(r=4, alpha=8, target_modules=targets))
    randomize_adapters(ours)
    lt.save_adapter(ours, tmp_path / "start")
    theirs = peft.PeftModel.from_pretrained(load(model_dirs[arch]), tmp_path / "start", is_trainable=True)
    groups = lt.optimizer_param_groups(ours, 1e-3, loraplus_lr_ratio=16, weight_decay=0.1)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [
        (1e-3, 0.1, 2 * len(targets)), (16e-3, 0.1, 2 * len(targets))]
    _adamw_steps(ours, groups, input_ids)
    opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                    loraplus_weight_decay=0.1)
    for _ in range(3):
        theirs(input_ids=input_ids, labels=input_ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for name, layer in lt.adapter_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        for which in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, which)["default"],
                                       getattr(peft_layer, which)["default"].weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), rtol=1e-5, atol=1e-5)
    # and B moved much further than with plain LoRA
    plain = load(model_dirs[arch])
    lt.load_adapter(plain, tmp_path / "start")
    _adamw_steps(plain, lt.optimizer_param_groups(plain, 1e-3, weight_decay=0.1), input_ids)
    start = lt.load_adapter(load(model_dirs[arch]), tmp_path / "start")
    name = next(iter(start))
    moved = (lt.adapter_layers(ours)[name].lora_B["default"] - start[name].lora_B["default"]).norm()
    moved_plain = (lt.adapter_layers(plain)[name].lora_B["default"] - start[name].lora_B["default"]).norm()
    assert moved > 4 * moved_plain


def test_optimizer_param_groups_sorts_other_parameters(model_dirs):
    model = load(model_dirs["gpt2"])
    lt.inject(model, lt.LoraConfig(r=2, target_modules=["c_attn"]))
    model.transformer.wte.weight.requires_grad_(True)  # tied to the head: counted once, as an embedding
    model.transformer.ln_f.weight.requires_grad_(True)
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(True)
    groups = lt.optimizer_param_groups(model, 2e-4, loraplus_lr_ratio=4, weight_decay=0.01, embedding_lr=1e-5)
    got = [(g["lr"], g["weight_decay"], [tuple(p.shape) for p in g["params"]]) for g in groups]
    assert got == [(2e-4, 0.01, [(2, 64), (2, 64)]), (2e-4, 0.01, [(64, 256)]), (2e-4, 0.0, [(64,)]),
                   (8e-4, 0.01, [(192, 2), (192, 2)]), (1e-5, 0.0, [(128, 64)])]
    for bad in (dict(lr=0), dict(lr=1e-3, loraplus_lr_ratio=-1), dict(lr=1e-3, weight_decay=float("nan"))):
        with pytest.raises(lt.ConfigError, match=next(iter(k for k in bad if k != "lr" or len(bad) == 1))):
            lt.optimizer_param_groups(model, **bad)


# --- modules_to_save ------------------------------------------------------------------------------------------
def _perturb(module, seed=7):
    """Moves the trainable parameters of ``module``, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize(("arch", "targets", "saved"), [("llama", ["q_proj", "v_proj"], ["lm_head"]),
                                                        ("llama", ["q_proj"], ["embed_tokens", "lm_head"]),
                                                        ("gpt2", ["c_attn"], ["ln_f"])])
def test_modules_to_save_round_trip_with_peft(model_dirs, input_ids, tmp_path, arch, targets, saved):
    base = logits(load(model_dirs[arch]), input_ids)
    model = load(model_dirs[arch])
    lt.inject(model, lt.LoraConfig(r=4, target_modules=targets, modules_to_save=saved))
    randomize_adapters(model)
    wrappers = {n: model.get_submodule(n) for n, m in model.named_modules() if type(m).__name__ == "ModulesToSave"}
    assert len(wrappers) == len(saved)
    for w in wrappers.values():
        _perturb(w.modules_to_save["default"])
        assert all(p.requires_grad for p in w.modules_to_save["default"].parameters())
        assert not any(p.requires_grad for p in w.original_module.parameters())
    ours = logits(model, input_ids)
    # PEFT's layout in memory
    theirs = peft.get_peft_model(load(model_dirs[arch]), peft.LoraConfig(r=4, target_modules=targets,
                                                                        modules_to_save=saved))
    peft_keys = {k.removeprefix(PEFT_PREFIX) for k in theirs.state_dict() if "modules_to_save" in k
                 or "original_module" in k}
    our_keys = {k for k in model.state_dict() if "modules_to_save" in k or "original_module" in k}
    assert our_keys == peft_keys
    assert {n for n, p in theirs.named_parameters() if p.requires_grad and "lora_" not in n} == {
        PEFT_PREFIX + n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    with lt.disabled(model):
        torch.testing.assert_close(logits(model, input_ids), base, rtol=0, atol=0)
    assert not torch.allclose(ours, base, atol=1e-3)
    # our file in PEFT
    lt.save_adapter(model, tmp_path / "ours")
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    names = [n for n in wrappers]
    assert {f"{PEFT_PREFIX}{n}.weight" for n in names} <= keys
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["modules_to_save"] == sorted(names)
    again = peft.PeftModel.from_pretrained(load(model_dirs[arch]), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(again, input_ids), ours, rtol=1e-5, atol=1e-5)
    # PEFT's file here
    _perturb(theirs, seed=3)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "theirs")
    back = load(model_dirs[arch])
    lt.load_adapter(back, tmp_path / "theirs")
    torch.testing.assert_close(logits(back, input_ids), logits(theirs, input_ids), rtol=1e-5, atol=1e-5)
    # merged export keeps the trained copy
    lt.merge_and_unload(back)
    assert not [m for m in back.modules() if type(m).__name__ == "ModulesToSave"]
    torch.testing.assert_close(logits(back, input_ids), logits(theirs, input_ids), rtol=1e-5, atol=1e-5)


def test_modules_to_save_follow_the_active_adapter_and_deletion(model_dirs, input_ids):
    model = load(model_dirs["llama"])
    base = logits(model, input_ids)
    lt.inject(model, lt.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "a")
    _perturb(model.lm_head.modules_to_save["a"])
    with_a = logits(model, input_ids)
    lt.inject(model, lt.LoraConfig(r=2, target_modules=["v_proj"]), "b")  # no copy: the original head
    torch.testing.assert_close(logits(model, input_ids), base, rtol=0, atol=0)
    assert not model.lm_head.modules_to_save["a"].weight.requires_grad
    lt.set_adapter(model, "a")
    assert model.lm_head.modules_to_save["a"].weight.requires_grad
    torch.testing.assert_close(logits(model, input_ids), with_a, rtol=0, atol=0)
    lt.set_enabled(model, False)
    torch.testing.assert_close(logits(model, input_ids), base, rtol=0, atol=0)
    lt.set_enabled(model, True)
    lt.delete_adapter(model, "a")
    assert isinstance(model.lm_head, torch.nn.Linear)
    groups = lt.optimizer_param_groups(model, 1e-3)
    assert sum(len(g["params"]) for g in groups) == len(lt.trainable_parameters(model))


def test_modules_to_save_in_all_linear_is_left_out_of_the_adapters_as_in_peft(model_dirs):
    model = load(model_dirs["llama"])
    layers = lt.inject(model, lt.LoraConfig(r=2, target_modules="all-linear", modules_to_save=["down_proj"]))
    theirs = peft.get_peft_model(load(model_dirs["llama"]), peft.LoraConfig(r=2, target_modules="all-linear",
                                                                           modules_to_save=["down_proj"]))
    assert sorted(layers) == sorted(peft_layers(theirs))
    assert not any(n.endswith("down_proj") for n in layers)


@pytest.mark.parametrize(("options", "words"), [
    (dict(target_modules=["q_proj"], modules_to_save=["classifier"]), ["'classifier'", "lm_head", "embed_tokens"]),
    (dict(target_modules=["q_proj", "v_proj"], modules_to_save=["v_proj"]), ["'v_proj'", "both select"]),
    (dict(target_modules=["q_proj"], modules_to_save=["mlp"]), []),
])
def test_modules_to_save_errors(model_dirs, input_ids, options, words):
    model = load(model_dirs["llama"])
    before = logits(model, input_ids)
    if not words:  # a whole block is fine when no adapter is inside it
        lt.inject(model, lt.LoraConfig(r=2, **options))
        assert len([m for m in model.modules() if type(m).__name__ == "ModulesToSave"]) == 2
        return
    with pytest.raises(lt.ConfigError) as e:
        lt.inject(model, lt.LoraConfig(r=2, **options))
    for word in words:
        assert word in str(e.value), (word, str(e.value))
    assert not lt.adapter_layers(model)
    assert isinstance(model.lm_head, torch.nn.Linear)
    torch.testing.assert_close(logits(model, input_ids), before, rtol=0, atol=0)


def test_modules_to_save_bad_files(model_dirs, input_ids, tmp_path):
    from safetensors.torch import load_file, save_file

    model = load(model_dirs["llama"])
    lt.inject(model, lt.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    lt.save_adapter(model, tmp_path / "a")
    weights = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    weights[f"{PEFT_PREFIX}lm_head.weight"] = weights[f"{PEFT_PREFIX}lm_head.weight"][:, :3].contiguous()
    save_file(weights, str(tmp_path / "a" / "adapter_model.safetensors"))
    fresh = load(model_dirs["llama"])
    with pytest.raises(lt.ShapeError, match=r"lm_head\.weight.*\(128, 3\).*\(128, 64\)"):
        lt.load_adapter(fresh, tmp_path / "a")
    assert isinstance(fresh.lm_head, torch.nn.Linear) and not lt.adapter_layers(fresh)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["modules_to_save"] = ["head"]  # names no module: the lm_head tensor is then claimed by nothing
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lt.AdapterFormatError, match=r"unsupported key 'base_model\.model\.lm_head\.weight'"):
        lt.load_adapter(fresh, tmp_path / "a")
    assert isinstance(fresh.lm_head, torch.nn.Linear) and not lt.adapter_layers(fresh)


def test_peft_classifier_names_that_the_model_lacks_are_passed_over(model_dirs, input_ids, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model_dir = tmp_path / "cls"
    torch.manual_seed(3)
    config = tiny_config("llama")
    config.num_labels = 3
    AutoModelForSequenceClassification.from_config(config).save_pretrained(model_dir)

    def cls_model():
        m = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
        m.config.pad_token_id = 0
        return m

    theirs = peft.get_peft_model(cls_model(), peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj"],
                                                              init_lora_weights=False))
    saved = json.loads(json.dumps(theirs.peft_config["default"].modules_to_save))
    assert "classifier" in saved and "score" in saved  # PEFT's task type adds both
    _perturb(theirs.base_model.model.score.modules_to_save["default"], seed=5)
    theirs.eval().save_pretrained(tmp_path / "a")
    ours = cls_model()
    lt.load_adapter(ours, tmp_path / "a")
    assert isinstance(ours.score, lt.ModulesToSave)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids).logits, rtol=1e-5, atol=1e-5)
    lt.save_adapter(ours, tmp_path / "b")
    again = peft.PeftModel.from_pretrained(cls_model(), tmp_path / "b").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids).logits, theirs(input_ids).logits, rtol=1e-5, atol=1e-5)


# --- torch.compile ----------------------------------------------------------------------------------------------
def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapted_model_compiles_whole_for_inference_and_training(model_dirs, input_ids, arch):
    torch._dynamo.reset()
    targets = {"llama": "all-linear", "gpt2": ["c_attn", "c_fc"]}[arch]
    model = load(model_dirs[arch])
    lt.inject(model, lt.LoraConfig(r=4, target_modules=targets, dropout=0.1))
    randomize_adapters(model)
    lt.inject(model, lt.LoraConfig(r=4, target_modules=targets), "other")
    randomize_adapters(model, "other")
    lt.set_adapter(model, "default")
    expected = logits(model, input_ids)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a graph break would raise
    start = _compiled_graphs()
    torch.testing.assert_close(logits(compiled, input_ids), expected, rtol=1e-5, atol=1e-5)
    assert _compiled_graphs() == start + 1
    for _ in range(3):
        torch.testing.assert_close(logits(compiled, input_ids), expected, rtol=1e-5, atol=1e-5)
    assert _compiled_graphs() == start + 1  # called again: no recompilation
    # switching the adapter, turning adapters off and on: the same compiled code
    lt.set_adapter(model, "other")
    other = logits(compiled, input_ids)
    with torch.no_grad():
        torch.testing.assert_close(other, model(input_ids).logits, rtol=1e-5, atol=1e-5)  # eager, "other"
    with lt.disabled(model):
        torch.testing.assert_close(logits(compiled, input_ids), logits(load(model_dirs[arch]), input_ids),
                                   rtol=1e-5, atol=1e-5)
    states = _compiled_graphs()
    assert states == start + 1
    for _ in range(2):
        lt.set_adapter(model, "default")
        torch.testing.assert_close(logits(compiled, input_ids), expected, rtol=1e-5, atol=1e-5)
        lt.set_adapter(model, "other")
        torch.testing.assert_close(logits(compiled, input_ids), other, rtol=1e-5, atol=1e-5)
        with lt.disabled(model):
            logits(compiled, input_ids)
    assert _compiled_graphs() == states
    # training: the fused operator's backward with dropout, in one graph, compiled once
    lt.set_adapter(model, "default")
    model.train()
    opt = torch.optim.AdamW(lt.trainable_parameters(model), lr=1e-3)
    before = _compiled_graphs()
    losses = []
    for _ in range(3):
        out = compiled(input_ids=input_ids).logits[:, :-1]  # the loss outside: transformers' own one logs a warning
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.size(-1)), input_ids[:, 1:].reshape(-1))
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lt.trainable_parameters(model))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert _compiled_graphs() == before + 1
    assert losses[-1] < losses[0]


def test_hotswap_into_a_compiled_model_recompiles_nothing(model_dirs, input_ids, tmp_path):
    torch._dynamo.reset()
    targets = ["q_proj", "v_proj", "down_proj"]
    model = load(model_dirs["llama"])
    lt.inject(model, lt.LoraConfig(r=8, alpha=16, target_modules=targets, modules_to_save=["lm_head"]))
    randomize_adapters(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    logits(compiled, input_ids)
    graphs = _compiled_graphs()
    for i, (r, extra) in enumerate([(4, dict(lora_alpha=8, rank_pattern={"down_proj": 8}, alpha_pattern={"v_proj": 3})),
                                    (8, dict(lora_alpha=5, use_rslora=True))]):
        theirs = peft_model(model_dirs["llama"], r=r, target_modules=targets, modules_to_save=["lm_head"], **extra)
        _perturb(theirs, seed=i)
        theirs.save_pretrained(tmp_path / str(i))
        lt.hotswap_adapter(model, tmp_path / str(i))
        torch.testing.assert_close(logits(compiled, input_ids), logits(theirs, input_ids), rtol=1e-5, atol=1e-5)
    assert _compiled_graphs() == graphs
    before = logits(compiled, input_ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [(dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]), lt.AdapterFormatError,
            "only in the model"),
           (dict(r=16, target_modules=targets, modules_to_save=["lm_head"]), lt.AdapterFormatError, "rank 16"),
           (dict(r=4, target_modules=targets), lt.AdapterFormatError, "modules_to_save")]
    for i, (fields, error, words) in enumerate(bad):
        peft_model(model_dirs["llama"], **fields).save_pretrained(tmp_path / f"bad{i}")
        with pytest.raises(error, match=words):
            lt.hotswap_adapter(model, tmp_path / f"bad{i}")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(logits(compiled, input_ids), before, rtol=0, atol=0)
    assert _compiled_graphs() == graphs


def test_combine_keeps_the_modules_trained_whole_from_the_template(model_dirs, input_ids, tmp_path):
    from safetensors.torch import load_file

    from lispetorch import combine

    paths, deltas, heads = {}, {}, {}
    for i, name in enumerate("abt"):
        theirs = peft_model(model_dirs["llama"], r=2 + i, target_modules=["q_proj", "v_proj"],
                            modules_to_save=["lm_head"])
        _perturb(theirs, seed=20 + i)
        theirs.save_pretrained(tmp_path / name)
        paths[name] = str(tmp_path / name)
        deltas[name] = {n: m.get_delta_weight("default").detach().double() for n, m in peft_layers(theirs).items()}
        heads[name] = theirs.base_model.model.lm_head.modules_to_save["default"].weight.detach().clone()
    result = combine.optimize({k: paths[k] for k in "abt"}, "t")
    assert len(result["global_weights"]) == 2  # the optimizer reads such checkpoints too
    w = {"a": 0.4, "b": 0.7}
    for template, head in ((tmp_path / "t", "t"), (None, "a")):
        out = tmp_path / f"out-{head}"
        combine.build({k: paths[k] for k in "ab"}, w, out, mode="cat", template=template)
        written = load_file(str(out / "adapter_model.safetensors"))
        assert torch.equal(written[f"{PEFT_PREFIX}lm_head.weight"], heads[head])
        assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
        loaded = peft.PeftModel.from_pretrained(load(model_dirs["llama"]), out).eval()
        assert torch.equal(loaded.base_model.model.lm_head.modules_to_save["default"].weight, heads[head])
        for name, layer in peft_layers(loaded).items():
            exact = sum(wi * deltas[n][name] for n, wi in w.items())
            torch.testing.assert_close(layer.get_delta_weight("default").double(), exact, rtol=1e-5, atol=1e-7)
        ours = load(model_dirs["llama"])
        lt.load_adapter(ours, out)
        torch.testing.assert_close(logits(ours, input_ids), logits(loaded, input_ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compiled_training_gradients_equal_eager(model_dirs, input_ids, arch):
    torch._dynamo.reset()
    model = load(model_dirs[arch])
    lt.inject(model, lt.LoraConfig(r=4, alpha=6, target_modules="all-linear"))
    randomize_adapters(model)
    model.train()
    for m in model.modules():  # the model's own dropout off: both sides compute the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    params = lt.trainable_parameters(model)

    def grads(forward):
        out = forward(input_ids=input_ids).logits[:, :-1]
        torch.nn.functional.cross_entropy(out.reshape(-1, out.size(-1)), input_ids[:, 1:].reshape(-1)).backward()
        g = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return g

    with torch.random.fork_rng():
        eager = grads(model)
    with torch.random.fork_rng():
        compiled = grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_compiled_layer_follows_new_parameter_objects():
    torch._dynamo.reset()
    layer = lt.LoraLinear(torch.nn.Linear(16, 8))
    layer.add_adapter("a", 2, 4)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 16)
    state = {k: torch.randn_like(v) for k, v in layer.state_dict().items()}
    layer.load_state_dict(state, assign=True)  # new parameter objects in the adapter's containers
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
        layer.set_factors("a", torch.randn(2, 16), torch.randn(8, 2), alpha=3)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
        layer.enabled = False
        torch.testing.assert_close(compiled(x), layer.base_layer(x), rtol=1e-5, atol=1e-6)


def test_compiled_switching_with_modules_to_save(model_dirs, input_ids):
    torch._dynamo.reset()
    model = load(model_dirs["llama"])
    expected = {}
    for i, name in enumerate(("a", "b")):
        lt.inject(model, lt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]), name)
        randomize_adapters(model, name)
        _perturb(model.lm_head.modules_to_save[name], seed=i)
    for name in ("a", "b"):
        lt.set_adapter(model, name)
        expected[name] = logits(model, input_ids)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    logits(compiled, input_ids)
    graphs = _compiled_graphs()
    for _ in range(2):
        for name in ("a", "b"):
            lt.set_adapter(model, name)
            torch.testing.assert_close(logits(compiled, input_ids), expected[name], rtol=1e-5, atol=1e-5)
    assert _compiled_graphs() == graphs  # the copies are switched without recompiling
    with lt.disabled(model):  # the frozen original: compiled once more (its parameters do not require gradients)
        torch.testing.assert_close(logits(compiled, input_ids), logits(load(model_dirs["llama"]), input_ids),
                                   rtol=1e-5, atol=1e-5)
    assert _compiled_graphs() <= graphs + 1


def test_modules_to_save_refuses_a_module_holding_adapters(model_dirs, input_ids):
    model = load(model_dirs["llama"])
    lt.inject(model, lt.LoraConfig(r=2, target_modules=["up_proj"]), "a")
    before = logits(model, input_ids)
    for saved, words in ((["mlp"], "'model.layers.0.mlp.up_proj', inside 'model.layers.0.mlp'"),
                         (["up_proj"], "'model.layers.0.mlp.up_proj' holds adapters")):
        with pytest.raises(lt.ConfigError, match=words):
            lt.inject(model, lt.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=saved), "b")
    assert lt.adapter_names(model) == ["a"] and lt.ModulesToSave not in {type(m) for m in model.modules()}
    torch.testing.assert_close(logits(model, input_ids), before, rtol=0, atol=0)


# --- loading many adapters ------------------------------------------------------------------------------------
def test_loading_the_kth_adapter_does_the_work_of_the_first(model_dirs, tmp_path, monkeypatch):
    """The trainability switches a load makes do not grow with the number of adapters already loaded; and only
    the active adapter trains, as before."""
    adapter = tmp_path / "adapter"
    peft_model(model_dirs["llama"], r=2, target_modules=["q_proj", "v_proj"]).save_pretrained(adapter)
    model = load(model_dirs["llama"])
    calls = {"set_trainable": 0}
    set_trainable = lt.LoraLinear.set_trainable

    def counting(self, name, trainable):
        calls["set_trainable"] += 1
        return set_trainable(self, name, trainable)

    monkeypatch.setattr(lt.LoraLinear, "set_trainable", counting)
    counts = []
    for k in range(8):
        calls["set_trainable"] = 0
        lt.load_adapter(model, adapter, f"a{k}")
        counts.append(calls["set_trainable"])
    assert counts[1:] == [counts[1]] * 7 and counts[1] <= 2 * counts[0]
    trains = {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {"a7"}
    # a parameter of another adapter turned on by hand is turned off by set_adapter
    layer = next(iter(lt.adapter_layers(model).values()))
    layer.lora_B["a2"].requires_grad_(True)
    lt.set_adapter(model, "a5")
    assert {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} == {"a5"}
    lt.load_adapter(model, adapter, "frozen", trainable=False)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".frozen"))
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
