"""The training engine: LispE's schedules, exact accumulation, exact resume, atomic checkpoints, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lispetorch as lt
from lispetorch.train import data as data_mod
from lispetorch.train import engine

# --- schedules -----------------------------------------------------------------------------------------------


def lispe_lr(kind, step, lr0, lr_min, total, warmup, gamma, step_size):
    """LispE's TorchLRScheduler::compute_lr, transcribed formula by formula (valid where it does not divide by
    zero and t ≤ total)."""
    if kind == "linear_warmup_cosine":
        if step < warmup:
            return lr0 * (step / warmup)
        decay_steps = total - warmup
        return lr_min + (lr0 - lr_min) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / decay_steps))
    if kind == "cosine":
        return lr_min + (lr0 - lr_min) * 0.5 * (1.0 + math.cos(math.pi * step / total))
    if kind == "exponential":
        return lr0 * gamma**step
    if kind == "step":
        return lr0 * gamma ** (step // step_size)
    if kind == "linear":
        return lr_min + (lr0 - lr_min) * (total - step) / total
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["linear_warmup_cosine", "cosine", "linear", "exponential", "step"])
def test_schedules_follow_lispe_formulas(kind):
    cfg = {"initial_lr": 2e-3, "min_lr": 1e-5, "total_steps": 40, "warmup_steps": 7, "gamma": 0.9, "step_size": 6}
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=0.5)  # initial_lr replaces the optimizer's own rate
    sched = lt.train.make_scheduler(opt, kind, cfg)
    for t in range(cfg["total_steps"] + 1):
        want = lispe_lr(kind, t, cfg["initial_lr"], cfg["min_lr"], cfg["total_steps"], cfg["warmup_steps"],
                        cfg["gamma"], cfg["step_size"])
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12, abs=1e-15), t
        assert lt.train.lr_at(kind, t, cfg) == pytest.approx(want, rel=1e-12, abs=1e-15)
        opt.step()
        sched.step()


def test_schedule_state_round_trips_and_constant():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = lt.train.make_scheduler(opt, "constant")
    for _ in range(5):
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == 1e-3
    opt2 = torch.optim.AdamW([p], lr=1e-3)
    s1 = lt.train.make_scheduler(opt2, "cosine", {"total_steps": 10})
    for _ in range(3):
        opt2.step()
        s1.step()
    state = s1.state_dict()
    opt3 = torch.optim.AdamW([p], lr=1e-3)
    s2 = lt.train.make_scheduler(opt3, "cosine", {"total_steps": 10})
    s2.load_state_dict(state)
    opt3.step()
    s2.step()
    opt2.step()
    s1.step()
    assert opt3.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


@pytest.mark.parametrize("total,warmup", [(0, 0), (5, 5), (3, 10), (0, 4)])
def test_schedule_never_divides_by_zero(total, warmup):
    cfg = {"initial_lr": 1e-3, "min_lr": 1e-6, "total_steps": total, "warmup_steps": warmup}
    for kind in ("linear_warmup_cosine", "cosine", "linear"):
        lrs = [lt.train.lr_at(kind, t, cfg) for t in range(15)]
        assert all(math.isfinite(v) and 0 <= v <= 1e-3 for v in lrs), (kind, lrs)
        assert lrs[-1] == pytest.approx(1e-6)  # past the end: the minimum, not a climb back up


def test_schedule_past_total_holds_the_minimum():
    cfg = {"initial_lr": 1e-3, "min_lr": 1e-5, "total_steps": 10}
    assert lt.train.lr_at("cosine", 25, cfg) == pytest.approx(1e-5)
    assert lt.train.lr_at("linear", 25, cfg) == pytest.approx(1e-5)


def test_schedule_bad_input():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    with pytest.raises(ValueError, match="unknown scheduler type 'cosin'"):
        lt.train.make_scheduler(opt, "cosin")
    with pytest.raises(ValueError, match="'step_size' must be ≥ 1"):
        lt.train.make_scheduler(opt, "step", {"step_size": 0})
    with pytest.raises(ValueError, match="unknown scheduler config key 'warmup'"):
        lt.train.make_scheduler(opt, "cosine", {"warmup": 3})
    with pytest.raises(TypeError, match="'total_steps' must be an integer"):
        lt.train.make_scheduler(opt, "cosine", {"total_steps": "ten"})


# --- data ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_default_model)


def write_records(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_records_mask_the_prompt(tmp_path, tokenizer):
    f = write_records(tmp_path / "d.jsonl", [{"instruction": "Add two numbers.", "response": "def add(a, b):\n"
                                              "    return a + b"}, {"text": "import os\n"}])
    docs = data_mod.read_documents(f)
    assert docs[0].prompt.startswith("### Instruction:\nAdd two numbers.") and docs[1].prompt == ""
    masked = data_mod.tokenize(tokenizer, docs, mask_prompt=True)
    plain = data_mod.tokenize(tokenizer, docs, mask_prompt=False)
    n_prompt = len(tokenizer(docs[0].prompt, add_special_tokens=False)["input_ids"])
    assert (masked[0].labels[:n_prompt] == -100).all() and (masked[0].labels[n_prompt:] != -100).all()
    assert torch.equal(plain[0].labels, plain[0].input_ids)
    assert masked[0].input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(masked[0].input_ids[n_prompt:-1]) == "def add(a, b):\n    return a + b"
    assert torch.equal(masked[1].labels, masked[1].input_ids)  # plain text: everything is learned


def test_packing_and_padding(tmp_path, tokenizer):
    text_dir = tmp_path / "corpus"
    text_dir.mkdir()
    (text_dir / "a.py").write_text("x = 1\n" * 50)
    (text_dir / "b.txt").write_text("hello world\n" * 30)
    (text_dir / "skip.bin").write_bytes(b"\x00\xff")  # not a text suffix: ignored
    docs = data_mod.read_documents(text_dir)
    assert len(docs) == 2
    ex = data_mod.tokenize(tokenizer, docs)
    packed = data_mod.pack(ex, 16)
    total = sum(e.input_ids.numel() for e in ex)
    assert all(e.input_ids.numel() == 16 for e in packed[:-1])
    assert sum(e.input_ids.numel() for e in packed) == total
    batch = data_mod.collate([ex[0], data_mod.truncate(ex, 5)[1]], pad=999)
    assert batch["input_ids"].shape == (2, ex[0].input_ids.numel())
    assert (batch["input_ids"][1, 5:] == 999).all() and (batch["labels"][1, 5:] == -100).all()
    assert batch["attention_mask"][1].sum() == 5
    assert data_mod.target_tokens(batch) == (ex[0].input_ids.numel() - 1) + 4


def test_split_is_seeded_and_disjoint(tokenizer, tmp_path):
    f = write_records(tmp_path / "d.jsonl", [{"text": f"line {i}\n"} for i in range(40)])
    a = data_mod.load_dataset(f, tokenizer, 64, packing=False, validation_split=0.25, seed=3)
    b = data_mod.load_dataset(f, tokenizer, 64, packing=False, validation_split=0.25, seed=3)
    c = data_mod.load_dataset(f, tokenizer, 64, packing=False, validation_split=0.25, seed=4)
    key = lambda d: [tuple(e.input_ids.tolist()) for e in d.validation]  # noqa: E731
    assert len(a.validation) == 10 and len(a.train) == 30
    assert key(a) == key(b) and key(a) != key(c)
    assert not set(key(a)) & {tuple(e.input_ids.tolist()) for e in a.train}


# --- the engine ----------------------------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path):
    """Real code: a few standard-library modules."""
    import sysconfig

    src = Path(sysconfig.get_paths()["stdlib"])
    d = tmp_path / "corpus"
    d.mkdir()
    for name in ("colorsys.py", "bisect.py", "keyword.py", "fnmatch.py"):
        (d / name).write_text((src / name).read_text())
    return d


def config(tiny_default_model, corpus, out, **over):
    cfg = {"model": str(tiny_default_model), "data": str(corpus), "output_dir": str(out), "max_steps": 8,
           "batch_size": 2, "gradient_accumulation_steps": 2, "max_seq_length": 32, "logging_steps": 2,
           "save_steps": 4, "eval_steps": 4, "warmup_steps": 2, "learning_rate": 5e-3, "seed": 7, "plot": False,
           "lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}}
    cfg.update(over)
    return cfg


def test_accumulation_equals_one_large_batch(tiny_default_model, corpus, tmp_path):
    cfg = config(tiny_default_model, corpus, tmp_path / "o", packing=False, max_seq_length=24, validation_split=0,
                 lora={"rank": 4, "alpha": 8, "dropout": 0.0})
    tr = engine.Trainer(cfg, progress=False)
    tr._setup()
    with torch.no_grad():  # a non-zero B so that A gets gradients too
        for p in tr.params:
            p.normal_(0, 0.1)
    examples = [tr.dataset.train[i] for i in range(4)]
    examples[1] = data_mod.truncate([examples[1]], 9)[0]  # unequal lengths: padding must not change the result
    micro = [data_mod.collate([e], tr.pad_id) for e in examples]
    loss_a, n_a = tr.accumulate(micro)
    grads_a = [p.grad.clone() for p in tr.params]
    tr.optimizer.zero_grad(set_to_none=True)
    loss_b, n_b = tr.accumulate([data_mod.collate(examples, tr.pad_id)])
    grads_b = [p.grad.clone() for p in tr.params]
    assert n_a == n_b
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert any(g.abs().sum() > 0 for g in grads_a)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-8)


def test_training_lowers_loss_and_writes_everything(tiny_default_model, corpus, tmp_path):
    out = tmp_path / "run"
    res = lt.train.train(config(tiny_default_model, corpus, out, max_steps=12, plot=True), progress=False)
    assert res.global_step == 12
    assert res.eval_loss < res.initial_eval_loss
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8, 10, 12]
    assert all(r["tokens_per_second"] > 0 for r in records if "loss" in r)
    assert [s for s, _ in lt.train.checkpoints(out)] == [4, 8, 12]
    with pytest.raises(lt.train.ConfigError, match="holds checkpoints of an earlier run"):
        lt.train.train(config(tiny_default_model, corpus, out, max_steps=12), progress=False)
    assert [s for s, _ in lt.train.checkpoints(out)] == [4, 8, 12]
    info = json.loads((out / "checkpoint-8" / "training_info.json").read_text())
    assert {"epoch", "global_step", "best_loss", "current_lr", "lora_config", "training_config"} <= set(info)
    assert info["global_step"] == 8 and info["lora_config"]["rank"] == 4
    assert info["training_config"]["learning_rate"] == 5e-3
    # The adapter loads with PEFT on the base model and gives the same logits as lispetorch's.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 500, (1, 16))
    ours = AutoModelForCausalLM.from_pretrained(tiny_default_model)
    lt.load_adapter(ours, res.adapter_dir)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_default_model), res.adapter_dir)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, peft_model.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_resume_gives_bit_identical_adapter(tiny_default_model, corpus, tmp_path):
    full = lt.train.train(config(tiny_default_model, corpus, tmp_path / "full"), progress=False)

    def stop_at_6(trainer):
        if trainer.global_step == 6:
            raise KeyboardInterrupt

    cfg = config(tiny_default_model, corpus, tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        engine.Trainer(cfg, progress=False, on_step=stop_at_6).train()
    assert [s for s, _ in lt.train.checkpoints(tmp_path / "cut")] == [4]
    resumed = lt.train.train(cfg, resume=True, progress=False)
    assert resumed.global_step == full.global_step == 8
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The metrics of the resumed run continue the cut one without repeating steps 5-6.
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [2, 4, 6, 8]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_checkpoint_write_leaves_the_previous_one(tiny_default_model, corpus, tmp_path, monkeypatch, error):
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        if "checkpoint-8" in str(f):
            calls["n"] += 1
            if str(f).endswith("scheduler.pt"):
                raise error
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(engine.torch, "save", failing_save)
    with pytest.raises(type(error)):
        lt.train.train(config(tiny_default_model, corpus, out), progress=False)
    monkeypatch.setattr(engine.torch, "save", real_save)
    assert calls["n"] >= 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4", "metrics.jsonl"]  # no half checkpoint
    assert [s for s, _ in lt.train.checkpoints(out)] == [4]
    from transformers import AutoModelForCausalLM

    lt.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_default_model), out / "checkpoint-4")
    resumed = lt.train.train(config(tiny_default_model, corpus, out), resume=True, progress=False)
    assert resumed.global_step == 8


# --- bad input -----------------------------------------------------------------------------------------------


def test_malformed_jsonl_names_file_and_line(tiny_default_model, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": "also ok"}\n{"text": oops}\n')
    with pytest.raises(lt.train.DataError, match=r"d\.jsonl:4: malformed JSON"):
        lt.train.train(config(tiny_default_model, f, tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()
    g = write_records(tmp_path / "e.jsonl", [{"text": "fine"}, {"prompt": "x", "answer": "y"}])
    with pytest.raises(lt.train.DataError, match=r"e\.jsonl:2: .* lacks 'instruction' and 'response'"):
        lt.train.read_documents(g)


def test_empty_data_set(tiny_default_model, tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    write_records(tmp_path / "e.jsonl", [{"text": ""}])
    with pytest.raises(lt.train.DataError, match="no training text"):
        lt.train.train(config(tiny_default_model, tmp_path, tmp_path / "o"), progress=False)
    with pytest.raises(lt.train.DataError, match="no such file or directory"):
        lt.train.read_documents(tmp_path / "missing")


@pytest.mark.parametrize("over,message", [
    ({"scheduler_type": "cosine_annealing"}, "unknown scheduler_type 'cosine_annealing'"),
    ({"learning_rate": "fast"}, "'learning_rate' must be a number, got 'fast'"),
    ({"batch_size": 2.5}, "'batch_size' must be an integer"),
    ({"lora": {"rank": "16"}}, "'lora.rank' must be an integer"),
    ({"lora": {"rnak": 16}}, "unknown key 'lora.rnak' \\(did you mean 'rank'\\?\\)"),
    ({"learning_rat": 1e-3}, "unknown key 'learning_rat' \\(did you mean 'learning_rate'\\?\\)"),
    ({"device": "cuda:7"}, "device 'cuda:7' is not available here; available: cpu"),
    ({"gradient_accumulation_steps": 0}, "'gradient_accumulation_steps' must be > 0"),
])
def test_bad_config_is_reported_by_name_before_training(tiny_default_model, corpus, tmp_path, over, message):
    if "device" in over and torch.cuda.is_available():
        message = "device 'cuda:7' is not available here"
    with pytest.raises((ValueError, TypeError), match=message):
        lt.train.train(config(tiny_default_model, corpus, tmp_path / "o", **over), progress=False)
    assert not (tmp_path / "o").exists()


def test_missing_key_and_yaml_errors(tmp_path, corpus):
    with pytest.raises(lt.train.ConfigError, match="missing required key 'output_dir'"):
        lt.train.TrainConfig.from_dict({"data": str(corpus)})
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x\noutput_dir: [unclosed\nlearning_rate: 1\n")
    with pytest.raises(lt.train.ConfigError, match=r"bad\.yaml: not valid YAML at line \d+, column \d+"):
        lt.train.TrainConfig.from_yaml(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("data: corpus\noutput_dir: out\nlearning_rate: 2e-4\nlora:\n  rank: 8\n")
    cfg = lt.train.TrainConfig.from_yaml(ok)
    assert cfg.learning_rate == 2e-4 and cfg.lora.rank == 8 and cfg.lora.alpha == 32
    assert cfg.data == [str(tmp_path / "corpus")] and cfg.output_dir == str(tmp_path / "out")


def test_cli_reports_errors_without_traceback(tmp_path, capsys, tiny_default_model, corpus):
    from lispetorch.cli import main

    y = tmp_path / "c.yaml"
    y.write_text(f"data: {corpus}\noutput_dir: {tmp_path / 'o'}\nscheduler_type: warp\n")
    assert main(["train", str(y), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown scheduler_type 'warp'" in err and "Traceback" not in err
    y.write_text(f"model: {tiny_default_model}\ndata: {corpus}\noutput_dir: {tmp_path / 'o'}\nmax_steps: 2\n"
                 "batch_size: 2\nmax_seq_length: 32\ngradient_accumulation_steps: 1\nplot: false\n"
                 "lora: {rank: 2, alpha: 4}\n")
    assert main(["train", str(y), "--no-progress"]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    assert (tmp_path / "o" / "adapter" / "adapter_model.safetensors").is_file()


# --- the default model ---------------------------------------------------------------------------------------


def test_default_model_builds_loads_and_rebuilds(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lispetorch import default_model as dm

    monkeypatch.setenv("LISPETORCH_CACHE", str(tmp_path / "cache"))
    assert dm.model_dir(dm.TINY) == tmp_path / "cache" / "default-model" / dm.TINY.name
    d = dm.ensure(dm.TINY, progress=False)
    assert d == dm.model_dir(dm.TINY)
    info = dm.info(d)
    assert info["corpus"]["train_documents"] > 0 and info["corpus"]["held_out_documents"] > 0
    assert 1 < info["held_out_perplexity"] < dm.TINY.vocab_size  # it learned something from the corpus
    model = AutoModelForCausalLM.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    assert model.config.model_type == "llama"
    ids = tok("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == "def f(x):\n    return x"
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    assert dm.ensure(dm.TINY, progress=False) == d and (d / "model.safetensors").stat().st_mtime_ns == stamp
    (d / "tokenizer.json").unlink()  # incomplete: rebuilt
    dm.ensure(dm.TINY, progress=False)
    assert dm.is_complete(d)
    # Building is deterministic: the rebuilt weights are the first ones.
    assert torch.equal(AutoModelForCausalLM.from_pretrained(d).model.embed_tokens.weight,
                       model.model.embed_tokens.weight)


def test_xdg_cache_home_is_respected(tmp_path, monkeypatch):
    from lispetorch import default_model as dm

    monkeypatch.delenv("LISPETORCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert dm.cache_root() == tmp_path / "lispetorch"


def test_report_to_a_missing_package_warns_and_keeps_the_jsonl(tiny_default_model, corpus, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "o"
    with pytest.warns(UserWarning, match="tensorboard, which is not installed") as record:
        lt.train.train(config(tiny_default_model, corpus, out, max_steps=2, save_steps=0,
                              report_to=["tensorboard", "wandb"]), progress=False)
    assert any("wandb, which is not installed" in str(w.message) for w in record)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 2, 2]


@pytest.mark.parametrize("method,rank", [
    ({"init": "pissa"}, 8),  # [B | −B₀], [A; A₀]
    ({"init": "lora_ga"}, 8),
    ({"method": "rotational_pissa", "options": {"method": "way0", "orthogonality_reg_weight": 0.1}}, 8),
    ({"method": "rotational_pissa", "options": {"method": "way1"}}, 8),
    ({"method": "tinylora", "dropout": 0.0, "options": {"u": 8, "seed": 3}}, 4),
])
def test_other_methods_train_resume_and_export_a_plain_lora(tiny_default_model, corpus, tmp_path, method, rank):
    """SVD inits, Rotational PiSSA and TinyLoRA train, resume bit-identically, and their adapter is a PEFT LoRA on
    the original weights that reproduces the trained model."""
    lora = {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"], **method}
    full = lt.train.train(config(tiny_default_model, corpus, tmp_path / "full", lora=lora), progress=False)

    def stop_at_6(trainer):
        if trainer.global_step == 6:
            raise KeyboardInterrupt

    cfg = config(tiny_default_model, corpus, tmp_path / "cut", lora=lora)
    with pytest.raises(KeyboardInterrupt):
        engine.Trainer(cfg, progress=False, on_step=stop_at_6).train()
    resumed = lt.train.train(cfg, resume=True, progress=False)
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((full.adapter_dir / "adapter_config.json").read_text())["r"] == rank
    # every method starts from the base model's output (a zero delta on the original weights): training moved it
    deltas = [a[k.replace("lora_A", "lora_B")] @ a[k] for k in a if "lora_A" in k]
    assert max(float(d.abs().max()) for d in deltas) > 1e-4
    # PEFT on the original model reproduces the trained model (base residual + factors).
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tr = engine.Trainer(cfg, progress=False)
    tr._setup(resume=True)
    tr._resume()
    ids = torch.randint(0, 500, (1, 16))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_default_model), full.adapter_dir)
    with torch.no_grad():
        torch.testing.assert_close(tr.model.eval()(ids).logits, peft_model.eval()(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lora,message", [
    ({"init": "svd"}, "'lora.init' must be .* got 'svd'"),
    ({"method": "dora"}, "'lora.method' must be one of lora, rotational_pissa, tinylora, got 'dora'"),
    ({"method": "tinylora", "init": "pissa"}, "'lora.init' \\('pissa'\\) applies to method lora"),
    ({"method": "tinylora"}, "'lora.dropout' must be 0 for method tinylora"),
    ({"method": "rotational_pissa", "options": {"method": "way9"}}, "'lora.options': .*way9"),
    ({"method": "rotational_pissa", "options": {"wya": 1}}, "'lora.options': method 'rotational_pissa': .*wya"),
    ({"options": [1]}, "'lora.options' must be a mapping"),
    ({"method": "tinylora", "dropout": 0, "use_dora": True}, ": 'lora.use_dora' applies to method lora, not tinylora$"),
    ({"method": "tinylora", "dropout": 0, "rank_pattern": {"q": 2}},
     ": 'lora.rank_pattern' applies to method lora, not tinylora$"),
])
def test_unknown_init_or_method_is_reported(tiny_default_model, corpus, tmp_path, lora, message):
    with pytest.raises(lt.train.ConfigError, match=message) as caught:
        lt.train.train(config(tiny_default_model, corpus, tmp_path / "o", lora=lora), progress=False)
    assert not (tmp_path / "o").exists()
    if "options" not in lora:  # the key named once, not under 'lora.options'
        assert "'lora.options'" not in str(caught.value)


# --- gradient checkpointing, LoRA+ ---------------------------------------------------------------------------
def _gradients(trainer, batch, seed):
    """The adapter gradients of one micro-batch in training mode, dropout drawn from ``seed``."""
    from conftest import saved_bytes

    trainer.model.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    saved = saved_bytes(lambda: trainer.accumulate([batch]))
    return [p.grad.clone() for p in trainer.params], saved


def test_gradient_checkpointing_with_dropout_gives_the_same_gradients(tiny_default_model, corpus, tmp_path):
    lora = {"rank": 4, "alpha": 8, "dropout": 0.3, "target_modules": "all-linear"}
    trainers = {}
    for checkpointing in (False, True):
        tr = engine.Trainer(config(tiny_default_model, corpus, tmp_path / str(checkpointing), lora=lora,
                                   gradient_checkpointing=checkpointing), progress=False)
        tr._setup()
        with torch.no_grad():  # a non-zero B so that every factor gets gradients
            for p in tr.params:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        trainers[checkpointing] = tr
    assert trainers[True].model.is_gradient_checkpointing and not trainers[False].model.is_gradient_checkpointing
    batch = trainers[False]._collate(list(range(2)))
    plain, plain_saved = _gradients(trainers[False], batch, seed=5)
    recomputed, recomputed_saved = _gradients(trainers[True], batch, seed=5)
    other_mask, _ = _gradients(trainers[False], batch, seed=6)
    assert all(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    # the dropout masks matter (another seed, other gradients), and checkpointing keeps fewer activations
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, other_mask, strict=True))
    assert recomputed_saved < 0.7 * plain_saved


def test_loraplus_ratio_sets_b_learning_rate_under_the_schedule(tiny_default_model, corpus, tmp_path):
    cfg = config(tiny_default_model, corpus, tmp_path / "o", loraplus_lr_ratio=16, scheduler_type="constant",
                 warmup_steps=0)
    tr = engine.Trainer(cfg, progress=False)
    tr._setup()
    b_ids = {id(layer.lora_B["default"]) for layer in lt.adapter_layers(tr.model).values()}
    lrs = {("B" if id(p) in b_ids else "A"): g["lr"] for g in tr.optimizer.param_groups for p in g["params"]}
    assert lrs == {"A": 5e-3, "B": 16 * 5e-3}
    tr = engine.Trainer(cfg, progress=False)
    res = tr.train()
    assert res.global_step == 8
    assert {g["lr"] for g in tr.optimizer.param_groups} == {5e-3, 16 * 5e-3}
    info = json.loads((res.output_dir / "training_info.json").read_text())
    assert info["training_config"]["loraplus_lr_ratio"] == 16
    with pytest.raises(lt.ConfigError, match="loraplus_lr_ratio"):
        engine.Trainer(config(tiny_default_model, corpus, tmp_path / "p", loraplus_lr_ratio=0), progress=False)


def test_peft_selection_keys_train_resume_and_load_in_peft(tiny_default_model, corpus, tmp_path):
    lora = {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1],
            "rank_pattern": {"v_proj": 2}, "modules_to_save": ["lm_head"]}
    full = lt.train.train(config(tiny_default_model, corpus, tmp_path / "full", lora=lora, loraplus_lr_ratio=4,
                                 gradient_checkpointing=True), progress=False)

    def stop_at_6(trainer):
        if trainer.global_step == 6:
            raise KeyboardInterrupt

    cfg = config(tiny_default_model, corpus, tmp_path / "cut", lora=lora, loraplus_lr_ratio=4,
                 gradient_checkpointing=True)
    with pytest.raises(KeyboardInterrupt):
        engine.Trainer(cfg, progress=False, on_step=stop_at_6).train()
    resumed = lt.train.train(cfg, resume=True, progress=False)
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) == ["base_model.model.lm_head.weight"] + [
        f"base_model.model.model.layers.1.self_attn.{m}.lora_{w}.weight" for m in ("q_proj", "v_proj") for w in "AB"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape[0] == 2
    config_json = json.loads((full.adapter_dir / "adapter_config.json").read_text())
    assert config_json["modules_to_save"] == ["lm_head"] and config_json["layers_to_transform"] == [1]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 500, (1, 16))
    base = AutoModelForCausalLM.from_pretrained(tiny_default_model).eval()
    ours = AutoModelForCausalLM.from_pretrained(tiny_default_model)
    lt.load_adapter(ours, full.adapter_dir)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_default_model), full.adapter_dir)
    with torch.no_grad():
        expected = theirs.eval()(ids).logits
        torch.testing.assert_close(ours.eval()(ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base(ids).logits, expected, atol=1e-4)
    with pytest.raises(lt.ConfigError, match="modules_to_save.*lora"):
        engine.Trainer(config(tiny_default_model, corpus, tmp_path / "x", lora={"method": "tinylora", "dropout": 0,
                                                                                 "modules_to_save": ["lm_head"]}),
                       progress=False)
    with pytest.raises(lt.ConfigError, match="layers_to_transform"):
        engine.Trainer(config(tiny_default_model, corpus, tmp_path / "y", lora={"layers_to_transform": "1"}),
                       progress=False)
