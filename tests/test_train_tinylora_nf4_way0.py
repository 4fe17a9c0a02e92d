"""`lispetorch train` as the TinyLoRA trainer and Rotational PiSSA's trainer run: TinyLoRA's tiny_lora_v.pt written
beside the adapter, the base in NF4 (`quantize_base: nf4`), and way0's losses (task, penalty, total) in the
metrics."""

from __future__ import annotations

import json

import pytest
import torch

import lispetorch as lt
from lispetorch.layer import base_of
from lispetorch.nf4 import NF4Linear
from lispetorch.train import engine


def config(model, corpus, out, **over):
    cfg = {"model": str(model), "data": str(corpus), "output_dir": str(out), "max_steps": 6, "batch_size": 2,
           "gradient_accumulation_steps": 1, "max_seq_length": 32, "logging_steps": 2, "save_steps": 3,
           "eval_steps": 0, "warmup_steps": 1, "learning_rate": 5e-2, "seed": 7, "plot": False,
           "lora": {"rank": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}}
    cfg.update(over)
    return cfg


def trained_model(cfg):
    tr = engine.Trainer(cfg, progress=False)
    tr._setup(resume=True)
    tr._resume()
    return tr.model.eval()


def fresh(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.mark.parametrize("quantize", ["none", "nf4"])
@pytest.mark.parametrize("convention", ["paper", "qwen-coder"])
def test_tinylora_training_writes_tiny_lora_v_pt(tiny_default_model, corpus, tmp_path, quantize, convention):
    lora = {"method": "tinylora", "rank": 2, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"],
            "options": {"u": 4, "seed": 3, "convention": convention}}
    cfg = config(tiny_default_model, corpus, tmp_path / "run", lora=lora, quantize_base=quantize)
    res = lt.train.train(cfg, progress=False)
    for d in (res.adapter_dir, tmp_path / "run" / "checkpoint-6"):
        assert (d / "tiny_lora_v.pt").is_file() and (d / "tiny_lora_v.json").is_file()
    state = torch.load(res.adapter_dir / "tiny_lora_v.pt", weights_only=True)
    assert state["u_value"] == 4 and state["rank"] == 2 and state["seed"] == 3
    assert state["global_v"].abs().max() > 0  # trained
    side = json.loads((res.adapter_dir / "tiny_lora_v.json").read_text())
    assert side["convention"] == convention and len(side["target_modules"]) == state["total_replaced_layers"]
    model = trained_model(cfg)
    layers = lt.adapter_layers(model)
    assert all(isinstance(base_of(m), NF4Linear) == (quantize == "nf4") for m in layers.values())
    ids = torch.randint(0, 500, (1, 16))
    # restored from the file with nothing but a model (quantised as the run's was)
    other = fresh(tiny_default_model)
    if quantize == "nf4":
        lt.quantize_nf4(other)
    lt.restore_tinylora(other, res.adapter_dir / "tiny_lora_v.pt")
    with torch.no_grad():
        assert torch.equal(other(ids).logits, model(ids).logits)


def test_nf4_base_holds_less_memory(tiny_default_model, corpus, tmp_path):
    lora = {"rank": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    dense = engine.Trainer(config(tiny_default_model, corpus, tmp_path / "a", lora=lora), progress=False)
    dense._setup()
    quant = engine.Trainer(config(tiny_default_model, corpus, tmp_path / "b", lora=lora, quantize_base="nf4"),
                           progress=False)
    quant._setup()
    linear = [m for n, m in quant.model.named_modules() if isinstance(m, NF4Linear)]
    assert linear and lt.memory_usage(quant.model) < lt.memory_usage(dense.model)
    with pytest.raises(lt.train.ConfigError, match="'quantize_base' must be one of none, nf4, got 'int8'"):
        lt.train.train(config(tiny_default_model, corpus, tmp_path / "c", quantize_base="int8"), progress=False)
    for lora, what in (({"init": "pissa"}, "init pissa"), ({"method": "rotational_pissa"}, "rotational_pissa")):
        with pytest.raises(lt.train.ConfigError, match=f"'quantize_base: nf4' needs .*; {what} takes its init"):
            lt.train.train(config(tiny_default_model, corpus, tmp_path / "d", quantize_base="nf4", lora=lora),
                           progress=False)
    assert not (tmp_path / "d").exists()


def test_way0_logs_task_ortho_and_total_loss(tiny_default_model, corpus, tmp_path):
    lora = {"method": "rotational_pissa", "rank": 2, "alpha": 4, "dropout": 0.0,
            "target_modules": ["q_proj", "v_proj"], "options": {"method": "way0", "orthogonality_reg_weight": 0.5}}
    out = tmp_path / "run"
    lt.train.train(config(tiny_default_model, corpus, out, lora=lora, learning_rate=0.1), progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6]
    for r in logged:
        assert {"task_loss", "ortho_loss", "total_loss"} <= set(r)
        assert r["task_loss"] == r["loss"] and r["total_loss"] == pytest.approx(r["task_loss"] + r["ortho_loss"])
        assert r["ortho_loss"] >= 0
    assert logged[-1]["ortho_loss"] > 0  # the free cores moved off orthogonal, and the penalty says by how much
    # the penalty logged is the one the trained model has, with the weight the adapter was made with
    model = trained_model(config(tiny_default_model, corpus, out, lora=lora, learning_rate=0.1))
    assert float(lt.orthogonality_loss(model).detach()) > 0
    # other methods log the loss alone
    plain = tmp_path / "plain"
    lt.train.train(config(tiny_default_model, corpus, plain), progress=False)
    assert not any("ortho_loss" in json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines())
