"""Hostile input: every bad value in a file the project reads gives a clear error naming the file, the key and the
value, within seconds, and leaves the model and the files as they were. Where a regression would hang or exhaust
memory (a backtracking pattern, nested YAML aliases, a FIFO), the case runs in a subprocess with a time limit."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import load, logits, randomize_adapters

import lispetorch as lt
from lispetorch import experiment, validate, yaml_io
from lispetorch.combine import config as combine_config
from lispetorch.combine import reader
from lispetorch.lisp import lispe_eval
from lispetorch.lisp.lispe_reader import LispeSyntaxError
from lispetorch.tasks import read_records
from lispetorch.train import data as data_mod
from lispetorch.train import engine

HERE = Path(__file__).parent
ENV = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
# A module name as long as real ones get, repeated: a backtracking engine needs about 2^n steps on it for (.|.)*!
LONG_NAME = "model.language_model.layers.31.mlp.experts.gate_up_proj." * 20 + "q_proj"


def run_python(code: str, timeout: float, *args: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with a time limit: a regression that hangs fails the test, not the suite."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout, cwd=HERE)


# --- the validation layer ---------------------------------------------------------------------------------------
def test_values_are_shown_at_a_bounded_size():
    laughs = ["lol"] * 9
    for _ in range(8):
        laughs = [laughs] * 9  # 9^9 strings if expanded
    assert len(validate.show(laughs)) <= validate.SHOWN
    assert len(validate.show("x" * 1_000_000)) <= validate.SHOWN
    assert "bits" in validate.show(10 ** 5000)  # repr() itself refuses an int of more than 4300 digits
    with pytest.raises(lt.ConfigError, match=r"f\.yaml: 'k' must be a finite number, got <an integer of"):
        validate.number(10 ** 5000, "k", "f.yaml")


@pytest.mark.parametrize("check,value,message", [
    (lambda v: validate.boolean(v, "flag", "f.json"), "false", r"f\.json: 'flag' must be true or false, got 'false' "
                                                                r"\(str\)"),
    (lambda v: validate.boolean(v, "flag", "f.json"), 0, r"'flag' must be true or false, got 0 \(int\)"),
    (lambda v: validate.number(v, "x", "f.json"), True, r"'x' must be a number, got True \(bool\)"),
    (lambda v: validate.number(v, "x", "f.json"), "1", r"'x' must be a number, got '1' \(str\)"),
    (lambda v: validate.number(v, "x", "f.json"), math.nan, r"'x' must be a finite number, got nan"),
    (lambda v: validate.number(v, "x", "f.json", 0.0, 1.0, hi_open=True), 1.0, r"'x' must be ≥ 0 and < 1, got 1\.0"),
    (lambda v: validate.integer(v, "n", "f.json", 1, 10), 2.0, r"'n' must be an integer, got 2\.0 \(float\)"),
    (lambda v: validate.integer(v, "n", "f.json", 1, 10), 0, r"'n' must be > 0 and ≤ 10, got 0"),
    (lambda v: validate.integer(v, "n", "f.json", 1, 10), False, r"'n' must be an integer, got False \(bool\)"),
    (lambda v: validate.compile_pattern(v, "p", "f.json"), "(?<=a)b", r"f\.json: 'p' is not a valid regular "
                                                                      r"expression \(RE2 syntax\): '\(\?<=a\)b'"),
    (lambda v: validate.compile_pattern(v, "p", "f.json"), 3, r"'p' must be a regular expression \(a string\)"),
])
def test_strict_checks_name_file_key_and_value(check, value, message):
    with pytest.raises(lt.ConfigError, match=message):
        check(value)


def test_strict_checks_pass_good_values():
    assert validate.boolean(False, "b") is False
    assert validate.number(3, "x", lo=0.0, lo_open=True) == 3.0 and isinstance(validate.number(3, "x"), float)
    assert validate.integer(4.0, "n", integral_float=True) == 4
    assert validate.compile_pattern("q_proj|v_proj", "p").fullmatch("v_proj")


# --- patterns from files: RE2, PEFT's rule -------------------------------------------------------------------------
@pytest.mark.parametrize("key,name,expected", [
    ("q_proj", "model.layers.0.self_attn.q_proj", True),  # a dotted suffix
    ("proj", "model.layers.0.self_attn.q_proj", False),  # not a whole dotted component
    (r"layers\.0\.self_attn\.q_proj", "model.layers.0.self_attn.q_proj", True),
    (r"layers\.1\..*", "model.layers.10.mlp.down_proj", False),
    (r"layers\.1\d\..*", "model.layers.10.mlp.down_proj", True),
    ("q_proj|v_proj", "model.layers.0.self_attn.v_proj", True),
    ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj", True),  # the full name
    ("^model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj", True),
    ("(.|.)*!", "layers.0.q", False),  # short: PEFT's backtracking match takes minutes on a real module name
])
def test_pattern_keys_match_as_in_peft(key, name, expected):
    from peft.utils.other import get_pattern_key

    assert validate.suffix_match(key, name) is expected
    assert (get_pattern_key([key], name) == key) is expected  # PEFT's own rule agrees


def test_backtracking_pattern_returns_at_once():
    """(.|.)*! takes time exponential in the name's length in a backtracking engine (hours for one real module
    name); RE2 takes time linear in it. A regression hangs, and the time limit fails it."""
    code = """
        import sys
        from lispetorch import validate
        from lispetorch.peft_format import pattern_value
        from lispetorch.targets import name_matches
        name = sys.argv[1]
        for n in range(20, len(name), 50):
            assert not validate.suffix_match("(.|.)*!", name[:n])
            assert not name_matches(name[:n], "(.|.)*!")
            assert pattern_value({"(.|.)*!": 2, "q_proj": 3}, name[:n] + ".q_proj", 8) == 3
        print("ok")
    """
    done = run_python(code, 120, LONG_NAME)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.fixture
def saved(model_dirs, tmp_path):
    model = load(model_dirs["llama"])
    lt.inject(model, lt.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    lt.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def edit_config(directory: Path, **fields) -> Path:
    """Changes fields of ``adapter_config.json`` (written with Python's json, which writes NaN and Infinity)."""
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))
    return path


def test_backtracking_pattern_key_in_an_adapter_loads_at_once(model_dirs, saved):
    """The issue's case end to end: load_adapter and the optimizer's reader on an adapter_config.json whose
    rank_pattern and alpha_pattern hold (.|.)*! (matching nothing) load it, with the plain rank and alpha."""
    edit_config(saved, rank_pattern={"(.|.)*!": 2}, alpha_pattern={"(.|.)*!": 3.0})
    code = """
        import sys
        import lispetorch as lt
        from lispetorch.combine import reader
        from conftest import load
        model = load(sys.argv[1])
        layers = lt.load_adapter(model, sys.argv[2])
        assert layers and all(l.settings["default"].r == 4 and l.settings["default"].alpha == 8
                              for l in layers.values())
        ck = reader.open_checkpoint("c", sys.argv[2])
        assert all(m.rank == 4 and m.alpha == 8 for m in ck.modules.values())
        print("ok")
    """
    done = run_python(code, 300, str(model_dirs["llama"]), str(saved))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_peft_patterns_keep_working(model_dirs, input_ids, tmp_path):
    """An adapter PEFT writes with regular-expression pattern keys loads here with PEFT's logits."""
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(load(model_dirs["llama"]), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
        rank_pattern={r"layers\.0\.self_attn\.q_proj": 2, r"layers\.1\..*down_proj": 6},
        alpha_pattern={r"(q|v)_proj": 3, "down_proj": 5}))
    theirs.eval()
    expected = logits(theirs, input_ids)
    theirs.save_pretrained(tmp_path / "peft")
    model = load(model_dirs["llama"])
    layers = lt.load_adapter(model, tmp_path / "peft")
    assert layers["model.layers.0.self_attn.q_proj"].settings["default"].r == 2
    assert layers["model.layers.1.mlp.down_proj"].settings["default"].r == 6
    assert layers["model.layers.0.mlp.down_proj"].settings["default"].alpha == 5
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=1e-5, atol=1e-5)


# --- adapter_config.json ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields,message", [
    ({"lora_alpha": math.nan}, r"'lora_alpha' must be > 0 and ≤ 1e\+06, got nan"),
    ({"lora_alpha": math.inf}, r"'lora_alpha' must be > 0 and ≤ 1e\+06, got inf"),
    ({"lora_alpha": 1e308}, r"'lora_alpha' must be > 0 and ≤ 1e\+06, got 1e\+308"),
    ({"lora_alpha": -8}, r"'lora_alpha' must be > 0"),
    ({"lora_alpha": "8"}, r"'lora_alpha' must be a number, got '8' \(str\)"),
    ({"lora_alpha": True}, r"'lora_alpha' must be a number, got True \(bool\)"),
    ({"r": "4"}, r"'r' must be an integer, got '4' \(str\)"),
    ({"r": 4.5}, r"'r' must be an integer, got 4\.5"),
    ({"r": 0}, r"'r' must be > 0"),
    ({"use_rslora": "false"}, r"'use_rslora' must be true or false, got 'false' \(str\)"),
    ({"fan_in_fan_out": 1}, r"'fan_in_fan_out' must be true or false, got 1 \(int\)"),
    ({"use_dora": "no"}, r"'use_dora' must be true or false, got 'no'"),
    ({"lora_dropout": math.nan}, r"'lora_dropout' must be ≥ 0 and < 1, got nan"),
    ({"rank_pattern": {"q_proj": 0}}, r"'rank_pattern\['q_proj'\]' must be > 0"),
    ({"rank_pattern": {"q_proj": "2"}}, r"'rank_pattern\['q_proj'\]' must be an integer, got '2'"),
    ({"rank_pattern": {"q_proj": 2.0}}, r"'rank_pattern\['q_proj'\]' must be an integer, got 2\.0"),
    ({"rank_pattern": ["q_proj"]}, r"'rank_pattern' must be a mapping pattern -> value"),
    ({"alpha_pattern": {"v_proj": 0}}, r"'alpha_pattern\['v_proj'\]' must be > 0"),
    ({"alpha_pattern": {"v_proj": -3}}, r"'alpha_pattern\['v_proj'\]' must be > 0"),
    ({"alpha_pattern": {"v_proj": math.nan}}, r"'alpha_pattern\['v_proj'\]' must be > 0 and ≤ 1e\+06, got nan"),
    ({"alpha_pattern": {"v_proj": math.inf}}, r"'alpha_pattern\['v_proj'\]' must be > 0 and ≤ 1e\+06, got inf"),
    ({"rank_pattern": {"(?<=self_attn)\\.q_proj": 2}}, r"'rank_pattern' is not a valid regular expression \(RE2 "
                                                       r"syntax\): '\(\?<=self_attn\)\\\\.q_proj'"),
    ({"alpha_pattern": {"(q_proj": 2}}, r"'alpha_pattern' is not a valid regular expression \(RE2 syntax\): "
                                        r"'\(q_proj'"),
    ({"target_modules": 7}, r"'target_modules' must be a list of names or a regular expression, got 7"),
])
def test_bad_adapter_config_field_is_named_and_model_unchanged(model_dirs, saved, fields, message):
    path = edit_config(saved, **fields)
    model = load(model_dirs["llama"])
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lt.AdapterFormatError, match=message) as caught:
        lt.load_adapter(model, saved)
    assert str(caught.value).startswith(f"{path}: ")
    state = model.state_dict()
    assert state.keys() == snap.keys() and all(torch.equal(state[k], v) for k, v in snap.items())
    with pytest.raises(lt.AdapterFormatError, match=message):  # the optimizer's reader refuses it alike
        reader.open_checkpoint("c", saved)


def test_a_string_is_not_read_as_true(model_dirs, saved, input_ids):
    """use_rslora "false" was read as true (the logits changed); a real false still loads as plain scaling."""
    edit_config(saved, use_rslora=False)
    model = load(model_dirs["llama"])
    lt.load_adapter(model, saved)
    assert all(not layer.settings["default"].use_rslora for layer in lt.adapter_layers(model).values())


@pytest.mark.parametrize("missing", ["lora_B", "lora_A"])
def test_a_factor_without_its_pair_is_named_and_model_unchanged(model_dirs, saved, missing):
    from safetensors.torch import load_file, save_file

    wfile = saved / "adapter_model.safetensors"
    tensors = load_file(wfile)
    key = f"base_model.model.model.layers.1.self_attn.v_proj.{missing}.weight"
    del tensors[key]
    save_file(tensors, wfile)
    model = load(model_dirs["llama"])
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lt.AdapterFormatError, match=rf"{wfile}: module 'model\.layers\.1\.self_attn\.v_proj' "
                                                    rf"lacks {missing}"):
        lt.load_adapter(model, saved)
    state = model.state_dict()
    assert state.keys() == snap.keys() and all(torch.equal(state[k], v) for k, v in snap.items())
    assert not lt.adapter_layers(model)
    with pytest.raises(lt.AdapterFormatError, match=rf"has no {missing} for module 'model\.layers\.1\.self_attn"
                                                    r"\.v_proj'"):
        reader.open_checkpoint("c", saved)


# --- YAML ----------------------------------------------------------------------------------------------------------
LAUGHS = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
                 for p, c in zip(["", *"abcdefgh"], "abcdefghi", strict=True))


def test_billion_laughs_training_yaml_is_refused_within_seconds(tmp_path):
    """9 nested aliases of 9 items: a few hundred bytes that expand to 9^9 values. ``lispetorch train`` refuses
    it with a message (it ran out of memory formatting the value); a regression fails by the time limit."""
    path = tmp_path / "laughs.yaml"
    path.write_text(f"data: corpus\noutput_dir: out\n{LAUGHS}report_to: *i\n")
    assert len(path.read_bytes()) < 600
    done = subprocess.run([sys.executable, "-m", "lispetorch.cli", "train", str(path), "--no-progress"], env=ENV,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0
    assert f"{path}: its aliases expand to more than 100,000 values" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,message", [
    (LAUGHS, r"its aliases expand to more than 100,000 values"),
    ("a: &a [1, *a]\n", r"the node at line 1, column 4 contains itself through an alias"),
    ("a: " + "[" * 3000 + "]" * 3000 + "\n", r"nested too deeply to be read as YAML"),
    ("a: " + "9" * 5000 + "\n", r"not valid YAML: 'Exceeds the limit"),
])
def test_yaml_that_would_blow_up_is_refused(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(lt.ConfigError, match=rf"c\.yaml: {message}"):
        yaml_io.load(path, lt.ConfigError)
    with pytest.raises(lt.ConfigError, match=message):
        lt.train.TrainConfig.from_yaml(path)
    with pytest.raises(lt.ConfigError, match=message):
        combine_config.load_config(path)


def test_yaml_aliases_within_bounds_still_work(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("data: corpus\noutput_dir: out\nlora: {rank: &r 4, alpha: 8, calibration_batches: *r}\n")
    cfg = lt.train.TrainConfig.from_yaml(path)
    assert cfg.lora.rank == 4 and cfg.lora.calibration_batches == 4
    merged = tmp_path / "m.yaml"
    merged.write_text("base: &base {path: a, description: shared}\ncheckpoints:\n  x: {<<: *base}\n"
                      "  y: {<<: *base, path: b}\n")
    assert yaml_io.load(merged)["checkpoints"] == {"x": {"path": "a", "description": "shared"},
                                                   "y": {"path": "b", "description": "shared"}}


# --- the training YAML -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("line,message", [
    ("learning_rate: .inf", r"'learning_rate' must be a finite number, got inf"),
    ("learning_rate: 1e3", r"'learning_rate' must be > 0 and ≤ 10, got 1000\.0"),
    ("min_lr: .nan", r"'min_lr' must be a finite number, got nan"),
    ("weight_decay: 1e308", r"'weight_decay' must be ≥ 0 and ≤ 100, got 1e\+308"),
    ("gamma: .nan", r"'gamma' must be a finite number, got nan"),
    ("gamma: .inf", r"'gamma' must be a finite number, got inf"),
    ("gamma: 0", r"'gamma' must be > 0 and ≤ 10, got 0\.0"),
    ("max_grad_norm: .nan", r"'max_grad_norm' must be a finite number, got nan"),
    ("max_grad_norm: -1", r"'max_grad_norm' must be ≥ 0 and ≤ 1e\+06, got -1\.0"),
    ("validation_split: 1.5", r"'validation_split' must be ≥ 0 and < 1, got 1\.5"),
    ("learning_rate: nan", r"'learning_rate' must be a finite number, got nan"),  # YAML 1.1: a string "nan"
    ("packing: 'false'", r"'packing' must be true or false, got 'false' \(str\)"),
    ("batch_size: true", r"'batch_size' must be an integer, got True \(bool\)"),
    ("num_epochs: 1000000000000", r"'num_epochs' must be > 0 and ≤ 1000000"),
    ("max_seq_length: 0", r"'max_seq_length' must be > 0"),
    ("seed: -1", r"'seed' must be ≥ 0 and ≤ 4294967295, got -1"),
    ("warmup_steps: -5", r"'warmup_steps' must be ≥ 0"),
    ("lora: {alpha: .nan}", r"'lora\.alpha' must be a finite number, got nan"),
    ("lora: {alpha: 1e308}", r"'lora\.alpha' must be > 0 and ≤ 1e\+06, got 1e\+308"),
    ("lora: {rank: 1000000000}", r"'lora\.rank' must be > 0 and ≤ 65536"),
    ("lora: {dropout: .nan}", r"'lora\.dropout' must be a finite number, got nan"),
    ("lora: {target_modules: '(?=q)q_proj'}", r"'lora\.target_modules' is not a valid regular expression \(RE2"),
    ("lora: {options: {u: .nan}}", r"'lora\.options'"),
    ("lora: {method: rotational_pissa, options: {orthogonality_reg_weight: " + "9" * 400 + "}}",
     r"'lora\.options': RotationalPiSSAConfig\.orthogonality_reg_weight must be ≥ 0, got <an integer of"),
    ("lora: {method: rotational_pissa, options: {orthogonality_reg_weight: .nan}}",
     r"RotationalPiSSAConfig\.orthogonality_reg_weight must be ≥ 0, got nan"),
    (f"nonsense{'x' * 1000}: 1", r"unknown key 'nonsensexxx"),
])
def test_bad_training_yaml_value_is_named(tmp_path, line, message):
    path = tmp_path / "train.yaml"
    path.write_text(f"data: corpus\noutput_dir: out\n{line}\n")
    with pytest.raises(lt.ConfigError, match=message) as caught:
        lt.train.TrainConfig.from_yaml(path)
    assert str(caught.value).startswith(f"{path}: ") and len(str(caught.value)) < 1200


def test_every_numeric_training_key_has_a_range():
    numeric = {f.name for f in dataclasses.fields(lt.train.TrainConfig) if f.type in ("float", "int", float, int)}
    assert numeric <= set(lt.train.config.RANGES)
    lora = {f.name for f in dataclasses.fields(lt.train.config.LoraSection) if f.type in ("float", "int", float, int)}
    assert lora <= set(lt.train.config.LORA_RANGES)


def test_infinite_learning_rate_writes_nothing(tiny_default_model, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    cfg = {"model": str(tiny_default_model), "data": str(corpus), "output_dir": str(tmp_path / "o"),
           "learning_rate": math.inf, "max_steps": 2}
    with pytest.raises(lt.ConfigError, match="'learning_rate' must be a finite number, got inf"):
        lt.train.train(cfg, progress=False)
    assert not (tmp_path / "o").exists()


# --- the combine YAML ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,message", [
    ("checkpoints: {a: x}\nsettings: {verify_paths: 'true'}\n",
     r"settings\.verify_paths must be true or false, got 'true' \(str\)"),
    ("checkpoints: {a: x}\nsettings: {verbose_paths: 1}\n", r"settings\.verbose_paths must be true or false, got 1"),
    ("checkpoints: {a: {path: x, description: [1, 2]}}\n", r"the description of checkpoint 'a' must be text, got "
                                                           r"\[1, 2\] \(list\)"),
    ("checkpoints: {a: {path: [" + "1, " * 5000 + "1]}}\n", r"checkpoint 'a' needs a 'path' \(a "
                                                                              r"string\), got \{'path': \[1, 1, 1"),
])
def test_bad_combine_yaml_value_is_named(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(lt.ConfigError, match=message) as caught:
        combine_config.load_config(path)
    assert str(caught.value).startswith(f"{path}: ") and len(str(caught.value)) < 1200


# --- max_seq_length and the model's positions ------------------------------------------------------------------
@pytest.mark.parametrize("arch,key", [("gpt2", "n_positions"), ("llama", "max_position_embeddings")])
def test_max_seq_length_above_the_models_positions_is_refused(model_dirs, tiny_default_model, tmp_path, arch, key):
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    tokenizer = AutoTokenizer.from_pretrained(tiny_default_model)
    cfg = {"data": str(corpus), "output_dir": str(tmp_path / "o"), "max_seq_length": 65, "max_steps": 1,
           "lora": {"target_modules": "all-linear"}}
    trainer = engine.Trainer(cfg, model=load(model_dirs[arch]), tokenizer=tokenizer, progress=False)
    with pytest.raises(lt.ConfigError, match=rf"'max_seq_length' is 65, above the model's maximum number of "
                                             rf"positions \({key} = 64"):
        trainer.train()
    assert not (tmp_path / "o").exists()
    cfg["max_seq_length"] = 64  # at the bound: accepted
    engine.Trainer(cfg, model=load(model_dirs[arch]), tokenizer=tokenizer, progress=False)._setup()


# --- data readers: regular files only ------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_a_fifo_in_the_data_is_skipped_not_waited_on(tmp_path):
    """A FIFO named *.txt blocked training forever; now it is skipped with a warning naming it (in a directory)
    or refused when read (named directly: the reader opens without blocking and checks the open descriptor)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("some real text\n")
    os.mkfifo(data / "b.txt")
    os.mkfifo(tmp_path / "direct.jsonl")
    code = """
        import sys, warnings
        from pathlib import Path
        from lispetorch.errors import DataError
        from lispetorch.train import data
        d, direct = Path(sys.argv[1]), Path(sys.argv[2])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            docs = data.read_documents(d)
        assert [doc.completion for doc in docs] == ["some real text\\n"], docs
        print("WARN", *[str(w.message) for w in caught])
        for path in (direct, d / "b.txt"):
            try:
                data.read_documents(path)
            except DataError as e:
                print("ERR", e)
    """
    done = run_python(code, 120, str(data), str(tmp_path / "direct.jsonl"))
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert f"WARN {data / 'b.txt'}: skipped, a FIFO (training data is read from regular files only)" in out
    assert f"ERR {tmp_path / 'direct.jsonl'}: a FIFO, not a regular file" in out
    assert f"ERR {data / 'b.txt'}: a FIFO, not a regular file" in out
    assert out.count("ERR") == 2


def test_a_broken_link_in_the_data_is_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("text\n")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.warns(UserWarning, match=r"gone\.txt: skipped, a broken link"):
        assert data_mod.data_files(tmp_path) == [tmp_path / "a.txt"]


@pytest.mark.parametrize("key,value", [("gamma", math.nan), ("gamma", math.inf), ("min_lr", math.nan),
                                       ("initial_lr", math.inf)])
def test_scheduler_refuses_non_finite_values(key, value):
    """make_scheduler (the Hy surface's torch_lr_scheduler) refuses what the training config refuses."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(lt.ConfigError, match=rf"scheduler config: '{key}' must be a finite number, got {value}"):
        lt.train.make_scheduler(optimizer, "step", {key: value})


def test_a_record_with_many_keys_is_named_in_a_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({f"k{i}": 1 for i in range(100_000)}) + "\n")
    with pytest.raises(lt.DataError, match=r"d\.jsonl:1: a record needs 'text'.*\(keys: \['k0', 'k1', ") as caught:
        data_mod.read_documents(path)
    assert len(str(caught.value)) < len(str(path)) + 400


def test_a_shared_structure_of_a_billion_values_is_named_in_a_line():
    """The same value built in Python (no YAML to bound it): the type error shows it at a bounded size instead of
    expanding its 9^9 strings. A regression runs out of memory or time, in the subprocess."""
    code = """
        import lispetorch as lt
        laughs = ["lol"] * 9
        for _ in range(8):
            laughs = [laughs] * 9
        for key in ("report_to", "data", "lora"):
            try:
                lt.train.TrainConfig.from_dict({"data": "d", "output_dir": "o", key: laughs}, "t.yaml")
            except lt.ConfigError as e:
                assert len(str(e)) < 600, len(str(e))
                print(str(e).split(",")[0])
    """
    done = run_python(code, 120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["t.yaml: 'report_to' must be a list of names", "t.yaml: 'data' must be a "
                                        "path or a list of paths", "t.yaml: 'lora' must be a mapping (rank"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_a_fifo_as_a_task_file_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "train.jsonl")
    code = """
        import sys
        from lispetorch.errors import DataError
        from lispetorch.tasks import read_records
        try:
            read_records(sys.argv[1])
        except DataError as e:
            print("ERR", e)
    """
    done = run_python(code, 120, str(tmp_path / "train.jsonl"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"ERR {tmp_path / 'train.jsonl'}: a FIFO, not a regular file; task files"), \
        done.stdout


# --- found by the fuzz suite: experiment grids, task files, LispE scripts ----------------------------------------
def test_an_experiment_grid_of_shared_alias_lists_is_refused_by_its_size_not_built(tmp_path):
    # 150 bytes of YAML: nine axes that share one list of twelve values make 12^9 (5 billion) runs
    lines = ["output_dir: exp", "base: {data: corpus}", "grid:", f"  seed: &v [{', '.join(map(str, range(1, 13)))}]"]
    lines += [f"  {k}: *v" for k in ("max_steps", "warmup_steps", "save_steps", "eval_steps", "logging_steps",
                                     "batch_size", "lora.rank", "lora.alpha")]
    (tmp_path / "experiment.yaml").write_text("\n".join(lines) + "\n")
    code = """
        import sys
        from lispetorch import experiment
        from lispetorch.errors import ConfigError
        try:
            experiment.plan(sys.argv[1])
        except ConfigError as e:
            print("ERR", e)
    """
    done = run_python(code, 120, str(tmp_path / "experiment.yaml"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"ERR {tmp_path / 'experiment.yaml'}: the grid makes 5159780352 runs (seed (12) × "
                                  "max_steps (12) × "), done.stdout
    assert "an experiment has at most 10000" in done.stdout


@pytest.mark.parametrize("value", [-3, None, "", ["a"], {"a": 1}])
def test_an_experiment_output_dir_that_is_not_a_path_is_named(tmp_path, value):
    path = tmp_path / "experiment.yaml"
    path.write_text(json.dumps({"output_dir": value, "base": {"data": "corpus"}}))
    with pytest.raises(lt.ConfigError, match=rf"{path}: 'output_dir' must be a directory's path, got "):
        experiment.plan(path)


@pytest.mark.parametrize("line,says", [
    (b'{"sentence": "ok", "label": 1}\n{"sentence": "caf\xe9", "label": 0}\n', ":2: not UTF-8 text (invalid "),
    (b'{"sentence": "ok", "label": ' + b"1" * 5000 + b"}\n", ":1: JSON that cannot be read ("),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", ":1: JSON that cannot be read ("),
])
def test_task_files_that_are_not_utf8_or_json_python_cannot_read_are_data_errors(tmp_path, line, says):
    path = tmp_path / "train.jsonl"
    path.write_bytes(line)
    with pytest.raises(lt.DataError) as info:
        read_records(path)
    assert str(info.value).startswith(f"{path}{says}"), str(info.value)


@pytest.mark.parametrize("text,says", [
    ("(" * 5000 + "1" + ")" * 5000, ":1: lists nested more than 200 deep"),
    ("'" * 5000 + "x", ":1: lists nested more than 200 deep"),
    ("(setq result " + "9" * 5000 + ")", ":1: the number 99999999999999999999… (5000 characters) cannot be read"),
    ("(" + "f . " * 3000 + "x)", ":1: more than 200 composition dots in one list"),
])
def test_lispe_scripts_nested_too_deep_or_with_unreadable_numbers_are_syntax_errors(tmp_path, text, says):
    path = tmp_path / "script.lisp"
    path.write_text(text)
    with pytest.raises(LispeSyntaxError) as info:
        lispe_eval.run(path)
    assert str(info.value).startswith(f"{path}{says}"), str(info.value)[:300]


def test_a_lispe_script_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "script.lisp"
    path.write_bytes(b"(println \"caf\xe9\")\n")
    with pytest.raises(LispeSyntaxError, match=rf"^{path}: not UTF-8 text \(invalid continuation byte at byte 13\)"):
        lispe_eval.run(path)


def test_an_unknown_bare_name_at_a_lispe_scripts_top_level_is_named_with_its_line(tmp_path):
    path = tmp_path / "script.lisp"
    path.write_text("(setq a 1)\n\n  nosuchname\n")
    with pytest.raises(lispe_eval.LispeError) as info:
        lispe_eval.run(path)
    assert str(info.value) == f"{path}:3: nosuchname\n  unknown name 'nosuchname'"
