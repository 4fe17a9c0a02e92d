"""The engine on tasks: the task metric next to the validation loss, full fine-tuning, warmup_ratio, target presets,
and the namespaced metrics in metrics.jsonl, TensorBoard (the event file read back) and W&B (offline mode)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load
from transformers import AutoTokenizer

import lispetorch as lt
from lispetorch import tasks
from lispetorch.targets import resolve_preset

NAMESPACES = ("lora_adapters/", "lora_rank/", "efficiency/", "verification/", "training_efficiency/")


@pytest.fixture(scope="module")
def kind_task(tmp_path_factory):
    """A small slice of the shipped classification task."""
    spec = tasks.build_shipped("stdlib-kind", tmp_path_factory.mktemp("tasks"))
    d = tmp_path_factory.mktemp("kind")
    for key, n in (("train_file", 48), ("eval_file", 16)):
        lines = open(spec[key]).read().splitlines()[:n]
        (d / f"{key}.jsonl").write_text("\n".join(lines) + "\n")
    return {"kind": "classification", "train_file": str(d / "train_file.jsonl"),
            "eval_file": str(d / "eval_file.jsonl"), "verbalizers": spec["verbalizers"]}


def _config(model, task, out, **extra):
    cfg = {"task": task, "output_dir": str(out), "model": str(model), "max_steps": 6, "batch_size": 4,
           "gradient_accumulation_steps": 1, "learning_rate": 3e-3, "logging_steps": 2, "eval_steps": 3,
           "save_steps": 0, "warmup_steps": 0, "max_seq_length": 64, "plot": False,
           "lora": {"rank": 4, "alpha": 8, "target_modules": "standard"}}
    cfg.update(extra)
    return cfg


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_task_metric_next_to_loss_and_namespaces_in_all_sinks(tiny_default_model, kind_task, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    result = lt.train.train(_config(tiny_default_model, kind_task, out, report_to=["tensorboard", "wandb"]),
                            progress=False)
    records = _records(out)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(0 <= r["eval_accuracy"] <= 100 and "eval_f1" in r for r in evals)
    assert result.task_metrics["accuracy"] == evals[-1]["eval_accuracy"]
    assert result.initial_task_metrics["accuracy"] == evals[0]["eval_accuracy"]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6]
    keys = set(logged[-1])
    for ns in NAMESPACES:
        assert any(k.startswith(ns) for k in keys), ns
    last = logged[-1]
    assert last["verification/base_params_with_grad"] == 0 and last["verification/base_unchanged"] == 1.0
    assert 0 < last["efficiency/trainable_share"] < 0.05
    assert last["lora_adapters/delta_norm"] > 0 and 0 < last["lora_rank/utilisation"] <= 1
    assert {"lora_rank/effective_rank/q_proj", "lora_adapters/B_norm/v_proj"} <= keys  # "standard": q and v
    assert last["training_efficiency/tokens_per_second"] > 0 and last["training_efficiency/peak_memory_mb"] > 0

    # TensorBoard: the event file read back
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "runs"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for ns in NAMESPACES:
        assert any(t.startswith(ns) for t in tags), ns
    assert "eval_accuracy" in tags
    tb = acc.Scalars("lora_adapters/delta_norm")
    assert [e.step for e in tb] == [2, 4, 6]
    assert tb[-1].value == pytest.approx(last["lora_adapters/delta_norm"], rel=1e-6)

    # W&B, offline: the run's record file (protobuf history records: each key next to its value as JSON text)
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    for key in [k for k in last if k.startswith(NAMESPACES)]:
        assert key.encode() in data, key
    for key in ("lora_adapters/delta_norm", "verification/base_checksum", "efficiency/trainable_share"):
        i = data.rfind(key.encode() + b"\x82")
        assert i >= 0 and json.dumps(last[key]).encode() in data[i:i + len(key) + 40], key


def test_full_fine_tuning_trains_every_parameter(tiny_default_model, kind_task, tmp_path):
    out = tmp_path / "full"
    result = lt.train.train(_config(tiny_default_model, kind_task, out, lora={"method": "full"},
                                    warmup_ratio=0.5, max_steps=4), progress=False)
    assert result.trainable_parameters == result.total_parameters
    assert result.adapter_dir == out / "model"
    last = [r for r in _records(out) if "loss" in r][-1]
    assert last["efficiency/trainable_share"] == 1.0
    assert not any(k.startswith("lora_") for k in last)
    trained = load(out / "model")
    base = load(tiny_default_model)
    changed = [n for (n, p), q in zip(trained.named_parameters(), base.parameters(), strict=True)
               if not torch.equal(p, q)]
    assert len(changed) == len(list(base.parameters()))  # every parameter moved (AdamW moves each)
    assert result.task_metrics is not None and "accuracy" in result.task_metrics
    with pytest.raises(lt.ConfigError, match="save_steps: 0"):
        lt.train.TrainConfig.from_dict({"data": "x", "output_dir": "o", "lora": {"method": "full"}})
    with pytest.raises(lt.ConfigError, match="warmup_ratio"):
        lt.train.TrainConfig.from_dict({"data": "x", "output_dir": "o", "warmup_ratio": 1.5})


def test_warmup_ratio_sets_the_warmup(tiny_default_model, kind_task, tmp_path):
    trainer = lt.train.Trainer(_config(tiny_default_model, kind_task, tmp_path / "w", max_steps=50,
                                       warmup_ratio=0.06, warmup_steps=100), progress=False)
    trainer._setup()
    assert trainer.warmup_steps == 3  # ceil(0.06 · 50)
    lrs = []
    for _ in range(5):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert lrs[0] < lrs[1] < lrs[2] <= lrs[3] and lrs[3] == pytest.approx(3e-3, rel=1e-3) and lrs[4] < lrs[3]


@pytest.mark.parametrize("arch,preset,expected", [
    ("llama", "standard", ["q_proj", "v_proj"]), ("llama", "extended", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("gpt2", "standard", ["attn.c_attn"]), ("gpt2", "extended", ["attn.c_attn", "attn.c_proj"])])
def test_target_presets_per_architecture(model_dirs, arch, preset, expected):
    model = load(model_dirs[arch])
    assert resolve_preset(model, preset) == expected
    layers = lt.inject(model, lt.LoraConfig(r=2, target_modules=preset))
    assert len(layers) == 2 * len(expected)  # two blocks
    assert all(any(name.endswith(e) for e in expected) for name in layers)
    assert resolve_preset(model, "all-linear") == "all-linear"


def test_preset_unknown_to_the_architecture(model_dirs):
    import torch.nn as nn

    with pytest.raises(lt.ConfigError, match="preset 'extended'.*named \\['a', 'b'\\]"):
        resolve_preset(nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}), "extended")


def test_a_tiny_model_learns_a_task_on_held_out_data(tiny_default_model, tmp_path):
    """Through the engine's task path and judged by its own task metric: real docstring lines from the shipped
    task's two splits, relabelled by a rule a tiny model can learn (does the line say what is returned?), balanced,
    with label words that are one token each in the tiny tokenizer. Held-out accuracy moves from chance to well
    above the class prior."""
    spec = tasks.build_shipped("stdlib-kind", tmp_path / "shipped")
    files = {}
    for key in ("train_file", "eval_file"):
        lines = [json.loads(line)["sentence"] for line in open(spec[key])]
        says = [s for s in lines if s.split()[0] in ("Return", "Returns")]
        other = [s for s in lines if s.split()[0] not in ("Return", "Returns")]
        n = min(len(says), len(other))
        assert n >= 30, (key, n)
        rows = [r for a, b in zip(says[:n], other[:n], strict=True)
                for r in ({"sentence": a, "label": 1}, {"sentence": b, "label": 0})]
        files[key] = tmp_path / f"{key}.jsonl"
        files[key].write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"kind": "classification", "train_file": str(files["train_file"]), "eval_file": str(files["eval_file"]),
            "verbalizers": {"0": "def", "1": "return"}}
    tok = AutoTokenizer.from_pretrained(tiny_default_model)
    assert all(len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1 for w in ("def", "return"))
    result = lt.train.train(_config(tiny_default_model, task, tmp_path / "run", max_steps=60, batch_size=8,
                                    warmup_ratio=0.06, eval_steps=60, logging_steps=20,
                                    lora={"rank": 8, "alpha": 16, "target_modules": "all-linear"}), progress=False)
    base, adapted = result.initial_task_metrics, result.task_metrics
    assert adapted["total"] == base["total"] >= 60
    assert base["accuracy"] <= 60  # the base model does not know the rule
    assert adapted["accuracy"] >= 75 and adapted["macro_f1"] >= 70  # learned, not the prior (50 % here)
