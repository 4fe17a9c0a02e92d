"""Faults: training that diverges, damaged checkpoints on resume, a full disk, a file truncated while the checkpoint
optimizer reads it, overlapping tensors, writers killed mid-save, and the permissions of what is written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lispetorch as lt
from lispetorch import atomic
from lispetorch.cli import main as cli_main
from lispetorch.combine.reader import MappedFile, open_checkpoint, stream
from lispetorch.errors import NonFiniteError, WriteError
from lispetorch.train import engine

ENV = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "PYTHONDONTWRITEBYTECODE": "1"}
PREFIX = "base_model.model."


def run_python(code: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter with a time limit (a hang fails the test, a signal shows in the code)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, **kw)


def config(model, corpus, out, **over):
    cfg = {"model": str(model), "data": str(corpus), "output_dir": str(out), "max_steps": 6, "batch_size": 2,
           "gradient_accumulation_steps": 2, "max_seq_length": 32, "logging_steps": 2, "save_steps": 2,
           "eval_steps": 0, "warmup_steps": 0, "learning_rate": 5e-3, "seed": 7, "plot": False,
           "validation_split": 0, "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]}}
    cfg.update(over)
    return cfg


# --- training that cannot silently diverge --------------------------------------------------------------------
def test_a_nan_loss_stops_the_run_by_step_and_writes_nothing_after_it(tiny_default_model, corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_default_model)
    tok = AutoTokenizer.from_pretrained(tiny_default_model)
    calls = {"n": 0}

    def poison(module, args, output):  # the 5th forward (step 3, first micro-batch) returns NaN
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 5 else output

    model.get_output_embeddings().register_forward_hook(poison)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"^step 3: the training loss is nan; training stopped"):
        engine.Trainer(config(tiny_default_model, corpus, out), model=model, tokenizer=tok, progress=False).train()
    assert [s for s, _ in lt.train.checkpoints(out)] == [2]
    assert not (out / "adapter").exists() and not (out / "training_info.json").exists()
    assert engine.check_checkpoint(out / "checkpoint-2") is None


def test_a_nan_gradient_stops_the_run_naming_the_parameter(tiny_default_model, corpus, tmp_path):
    steps = {"n": 0}

    def poison_after_2(trainer):
        steps["n"] += 1
        if steps["n"] == 2:  # from step 3 on, one factor's gradient is NaN while the loss stays finite
            name, p = next((n, p) for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_B" in n)
            p.register_hook(lambda g: g * float("nan"))
            poison_after_2.name = name

    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"^step 3: the gradient of (\S+) holds \d+ NaN/Inf") as err:
        engine.Trainer(config(tiny_default_model, corpus, out), progress=False, on_step=poison_after_2).train()
    assert poison_after_2.name in str(err.value)
    assert [s for s, _ in lt.train.checkpoints(out)] == [2] and not (out / "adapter").exists()


def test_a_step_that_blows_up_ends_the_command_with_the_step(tiny_default_model, corpus, tmp_path, capsys,
                                                             monkeypatch):
    import yaml

    out = tmp_path / "run"
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(config(tiny_default_model, corpus, out, max_grad_norm=0)))
    accumulate = engine.Trainer.accumulate
    calls = {"n": 0}

    def blowing_up(self, batches):  # from the third step on, the loss is infinite (a learning rate of 1e30, say,
        calls["n"] += 1             # is refused before training starts; this is what a diverging run looks like)
        loss, tokens = accumulate(self, batches)
        return (float("inf") if calls["n"] >= 3 else loss), tokens

    monkeypatch.setattr(engine.Trainer, "accumulate", blowing_up)
    assert cli_main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "lispetorch train: error: step " in err and "training stopped" in err, err
    assert not (out / "adapter").exists()
    for _, ckpt in lt.train.checkpoints(out):  # whatever was saved before the step that failed is finite
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "adapter_model.safetensors")).values())


def test_a_non_finite_adapter_is_never_saved(model_dirs, tmp_path):
    from conftest import load

    model = load(model_dirs["llama"])
    lt.inject(model, lt.LoraConfig(r=2))
    lt.save_adapter(model, tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    layer = next(iter(lt.adapter_layers(model).values()))
    with torch.no_grad():
        layer.factors("default")[1][0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"a: base_model\.model\.\S+\.lora_B\.weight holds 1 NaN/Inf"):
        lt.save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


# --- resume from the newest intact checkpoint -----------------------------------------------------------------
def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _resealed(fn):
    """A corruption after which the manifest is written again: the files match it, but do not read back."""
    def apply(ckpt: Path) -> None:
        fn(ckpt)
        atomic.write_manifest(ckpt)
    return apply


# name -> (damage done to the newest checkpoint, what the warning must say)
CORRUPTIONS = {
    "truncated weights": (lambda c: _truncate(c / "adapter_model.safetensors"),
                          "adapter_model.safetensors has \\d+ bytes where manifest.json says \\d+"),
    "flipped byte in optimizer.pt": (lambda c: _flip(c / "optimizer.pt"), "optimizer.pt does not match its checksum"),
    "missing scheduler.pt": (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    "empty manifest": (lambda c: (c / "manifest.json").write_bytes(b""), "its manifest.json is empty"),
    "garbage manifest": (lambda c: (c / "manifest.json").write_bytes(b"garbage{"),
                         "its manifest.json is not valid JSON"),
    "missing manifest": (lambda c: (c / "manifest.json").unlink(), "it has no manifest.json"),
    "truncated manifest": (lambda c: _truncate(c / "manifest.json"), "its manifest.json is not valid JSON"),
    "manifest of another shape": (lambda c: (c / "manifest.json").write_text("[1, 2]"),
                                  "its manifest.json is not a manifest"),
    "manifest not UTF-8": (lambda c: (c / "manifest.json").write_bytes(b"\xff\xfe{\x00"),
                           "its manifest.json is not"),
    "rng state replaced by a directory": (lambda c: ((c / "rng_state.pth").unlink(), (c / "rng_state.pth").mkdir()),
                                          "rng_state.pth is not a regular file"),
    "weights a dangling link": (lambda c: ((c / "adapter_model.safetensors").unlink(),
                                           (c / "adapter_model.safetensors").symlink_to(c / "nowhere")),
                                "adapter_model.safetensors is missing"),
    "grown training_info.json": (lambda c: (c / "training_info.json").write_text(
        (c / "training_info.json").read_text() + " "), "training_info.json has \\d+ bytes"),
    "garbage info, manifest rewritten": (_resealed(lambda c: (c / "training_info.json").write_text("{oops")),
                                         "does not read back \\(JSONDecodeError"),
    "garbage optimizer.pt, manifest rewritten": (_resealed(lambda c: (c / "optimizer.pt").write_bytes(b"\x00" * 99)),
                                                 "does not read back"),
    "empty weights, manifest rewritten": (_resealed(lambda c: (c / "adapter_model.safetensors").write_bytes(b"")),
                                          "does not read back"),
    "emptied directory": (lambda c: [p.unlink() for p in c.iterdir()], "it has no manifest.json"),
}


@pytest.fixture
def finished_run(tiny_default_model, corpus, tmp_path):
    out = tmp_path / "full"
    lt.train.train(config(tiny_default_model, corpus, out), progress=False)
    assert [s for s, _ in lt.train.checkpoints(out)] == [2, 4, 6]
    assert all(engine.check_checkpoint(p) is None for _, p in lt.train.checkpoints(out))
    return out


def test_every_damaged_checkpoint_is_skipped_with_its_reason(finished_run, tiny_default_model, corpus, tmp_path):
    trainer = engine.Trainer(config(tiny_default_model, corpus, tmp_path / "case"), progress=False)
    trainer._setup(resume=True)
    for name, (damage, reason) in CORRUPTIONS.items():
        case = tmp_path / "case"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(finished_run, case, symlinks=True)
        damage(case / "checkpoint-6")
        with pytest.warns(UserWarning, match=rf"skipping checkpoint .*checkpoint-6: {reason}"):
            assert trainer._resume() == 4, name
        assert trainer.global_step == 4, name


def test_resume_past_a_damaged_checkpoint_ends_with_the_same_adapter(finished_run, tiny_default_model, corpus,
                                                                     tmp_path):
    import yaml

    case = tmp_path / "case"
    shutil.copytree(finished_run, case)
    _truncate(case / "checkpoint-6" / "optimizer.pt")  # a torn write: what once ended in "[Errno 22]"
    _flip(case / "checkpoint-4" / "adapter_model.safetensors", 0.9)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(config(tiny_default_model, corpus, case)))
    r = subprocess.run([sys.executable, "-m", "lispetorch.cli", "train", str(cfg), "--resume", "--no-progress"],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    assert "checkpoint-6: optimizer.pt has" in r.stderr and "checkpoint-4: adapter_model.safetensors does not " \
        "match its checksum" in r.stderr
    a = load_file(str(finished_run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(case / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resumed from step 2, bit-exact
    # none intact: a clear error naming the directory and each checkpoint's fault, no traceback
    assert [s for s, _ in lt.train.checkpoints(case)] == [2, 4, 6]  # 4 and 6 written again by the resumed run
    (case / "checkpoint-2" / "manifest.json").write_text("{}")
    (case / "checkpoint-4" / "optimizer.pt").unlink()
    _flip(case / "checkpoint-6" / "rng_state.pth")
    r = subprocess.run([sys.executable, "-m", "lispetorch.cli", "train", str(cfg), "--resume", "--no-progress"],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"lispetorch train: error: {case}: no intact checkpoint to resume from: " in r.stderr
    assert "checkpoint-2: its manifest.json is not a manifest" in r.stderr
    assert "checkpoint-4: optimizer.pt is missing" in r.stderr
    assert "checkpoint-6: rng_state.pth does not match its checksum" in r.stderr


def test_a_metrics_line_cut_by_a_kill_does_not_stop_resume(finished_run, tiny_default_model, corpus, tmp_path):
    case = tmp_path / "case"
    shutil.copytree(finished_run, case)
    with open(case / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = lt.train.train(config(tiny_default_model, corpus, case, max_steps=8), resume=True, progress=False)
    assert res.global_step == 8
    steps = [json.loads(line)["step"] for line in (case / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


# --- a full disk ----------------------------------------------------------------------------------------------
def _file_size_limit(limit: int):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_during_training_names_the_checkpoint(tiny_default_model, corpus, tmp_path):
    """A real failed write: the child process may not write a file over 4 KiB (as a full disk, the kernel refuses
    the write), so the first checkpoint's weights fail."""
    import yaml

    out = tmp_path / "run"
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(config(tiny_default_model, corpus, out)))
    r = subprocess.run([sys.executable, "-m", "lispetorch.cli", "train", str(cfg), "--no-progress"],
                       capture_output=True, text=True, timeout=300, env=ENV, preexec_fn=_file_size_limit(4096))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"lispetorch train: error: {out / 'checkpoint-2'}: cannot be written: File too large" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]  # nothing partial, no temporary


def test_enospc_names_the_path_and_leaves_the_previous_version(model_dirs, tmp_path, monkeypatch):
    import errno

    from conftest import load

    model = load(model_dirs["llama"])
    lt.inject(model, lt.LoraConfig(r=2))
    lt.save_adapter(model, tmp_path / "a")
    atomic.write_text(tmp_path / "f.txt", "old")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(WriteError, match=rf"^{tmp_path / 'a'}: cannot be written: No space left on device") as e:
        lt.save_adapter(model, tmp_path / "a")
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    with pytest.raises(WriteError, match=rf"^{tmp_path / 'f.txt'}: cannot be written: No space left"):
        atomic.write_text(tmp_path / "f.txt", "new")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    assert (tmp_path / "f.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "f.txt"]


# --- a file changed under the checkpoint optimizer ------------------------------------------------------------
def _write_adapter_dir(path: Path, modules: int = 6, rank: int = 4, width: int = 512, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(modules):
        tensors[f"{PREFIX}model.layers.{i}.self_attn.q_proj.lora_A.weight"] = torch.randn(rank, width, generator=g)
        tensors[f"{PREFIX}model.layers.{i}.self_attn.q_proj.lora_B.weight"] = torch.randn(width, rank, generator=g)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 8,
                                                          "target_modules": ["q_proj"]}))
    return path


TRUNCATE_WHILE_READING = """
    import os, sys
    from lispetorch.combine.reader import open_checkpoint, stream
    c = open_checkpoint("c", sys.argv[1])
    w = c.weights_file
    with stream([c], list(c.modules)) as it:
        first = next(it)
        {damage}
        try:
            for m, As, Bs in it:
                float(As[0].sum() + Bs[0].sum())
        except ValueError as e:
            print(type(e).__name__, e)
"""


@pytest.mark.parametrize("damage,says", [
    ("os.truncate(w, w.stat().st_size // 3)", "its size went from"),
    ("os.truncate(w, 0)", "its size went from"),
    ("fd = os.open(w, os.O_WRONLY); os.pwrite(fd, b'x' * 4096, 4096); os.close(fd); "
     "os.utime(w, ns=(1, 1))", "it was modified"),
])
def test_a_checkpoint_truncated_while_read_is_an_error_not_a_signal(tmp_path, damage, says):
    d = _write_adapter_dir(tmp_path / "c")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(TRUNCATE_WHILE_READING.format(damage=damage)), str(d)],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, (r.returncode, r.stderr)  # a signal would be a negative code (SIGBUS: -7)
    assert r.stdout.startswith("AdapterFormatError checkpoint 'c': cannot read the factors of "), r.stdout
    # which check sees a truncation first depends on where the reader is: its size, or the tensors it ends inside
    said = (says, "it ends at byte") if says == "its size went from" else (says,)
    assert any(f"{d / 'adapter_model.safetensors'} changed while it was being read ({s}" in r.stdout for s in said), \
        r.stdout


def test_views_of_a_map_die_by_sigbus_outside_the_guarded_gram(tmp_path):
    """A view of a map cut short kills the process when Python reads it, even after a guarded Gram call has run
    (the guard's handler is in place only during the call): why stream hands out views to the Gram alone."""
    d = _write_adapter_dir(tmp_path / "c", modules=2, width=4096)
    r = run_python(f"""
        import os
        from pathlib import Path
        from lispetorch import ops
        from lispetorch.combine.reader import MappedFile
        w = Path({str(d / "adapter_model.safetensors")!r})
        f = MappedFile(w)
        a = next(k for k in f.entries if ".layers.0." in k and "lora_A" in k)
        A, B = f.views(a, a.replace("lora_A", "lora_B"))
        ops.lora_gram_modules([A], [B], [1.0], 1)
        key = max(f.entries, key=lambda k: f.entries[k].end)
        v = f.tensor(key)
        os.truncate(w, 0)
        print(float(v.sum()))
    """)
    assert r.returncode == -signal.SIGBUS


@pytest.mark.skipif(lt.ops.cpu_isa() == "aten", reason="the guarded reads are the vector kernels'")
def test_the_gram_reads_views_of_a_file_cut_short_as_an_error_not_a_signal(tmp_path):
    """stream(mapped=True) hands out views of the maps; the native Gram reads them under a SIGBUS guard, so a file
    truncated after the views were made is an error naming the factor, and the process lives on."""
    d = _write_adapter_dir(tmp_path / "c", modules=2, width=4096)
    r = run_python(f"""
        import os
        from lispetorch import ops
        from lispetorch.combine.reader import open_checkpoint, stream
        c = open_checkpoint("c", {str(d)!r})
        with stream([c], list(c.modules), mapped=True) as it:
            m, As, Bs = next(it)
            os.truncate(c.weights_file, 0)
            try:
                ops.lora_gram_modules(As, Bs, [1.0], 1)
            except RuntimeError as e:
                print("RuntimeError", str(e).splitlines()[0])
            try:
                it.verify()
            except ValueError as e:
                print(type(e).__name__, e)
        print("alive")
    """)
    assert r.returncode == 0, (r.returncode, r.stderr)
    lines = r.stdout.splitlines()
    assert lines[0].startswith("RuntimeError lora_gram: SIGBUS reading lora_"), r.stdout
    assert "(module 0, checkpoint 0): the memory it maps is gone" in lines[0], r.stdout
    assert lines[1].startswith(f"AdapterFormatError {d / 'adapter_model.safetensors'} changed while it was being "
                               "read (its size went from "), r.stdout
    assert lines[-1] == "alive"


@pytest.mark.skipif(lt.ops.cpu_isa() == "aten", reason="the guarded reads are the vector kernels'")
def test_optimize_over_a_file_cut_short_during_the_gram_names_the_file(tmp_path):
    """The optimizer end to end: a checkpoint truncated while its views are being read by the Gram is an
    AdapterFormatError naming the file and what changed, and nothing is written."""
    for n in ("a", "b"):
        _write_adapter_dir(tmp_path / n, modules=4, width=4096, seed=ord(n))
    victim = tmp_path / "a" / "adapter_model.safetensors"
    r = run_python(f"""
        import os
        import lispetorch.combine as combine
        from lispetorch import ops
        gram = ops.lora_gram_modules
        def cut_then_gram(*args):
            os.truncate({str(victim)!r}, 0)
            return gram(*args)
        ops.lora_gram_modules = cut_then_gram
        try:
            combine.optimize({{"a": {str(tmp_path / "a")!r}, "b": {str(tmp_path / "b")!r}}}, "b")
        except ValueError as e:
            print(type(e).__name__, e)
        print("alive")
    """)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert f"AdapterFormatError {victim} changed while it was being read (its size went from" in r.stdout, r.stdout
    assert r.stdout.splitlines()[-1] == "alive"


def test_a_checkpoint_changed_after_it_was_opened(tmp_path):
    d = _write_adapter_dir(tmp_path / "c")
    c = open_checkpoint("c", d)
    _write_adapter_dir(d, modules=5)  # replaced by another file of another size
    with pytest.raises(lt.AdapterFormatError, match="changed since it was opened"):
        with stream([c], list(c.modules)) as it:
            next(it)


def test_overlapping_tensors_are_refused_naming_file_and_tensors(tmp_path, model_dirs):
    d = _write_adapter_dir(tmp_path / "c", modules=1, width=64)
    w = d / "adapter_model.safetensors"
    data = w.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    a, b = (f"{PREFIX}model.layers.0.self_attn.q_proj.lora_{x}.weight" for x in "AB")
    header[a]["data_offsets"] = header[b]["data_offsets"]  # A and B at the same bytes (same size: 4 x 64 floats)
    body = json.dumps(header).encode()
    w.write_bytes(len(body).to_bytes(8, "little") + body + data[8 + n:])
    with pytest.raises(lt.AdapterFormatError, match=rf"{w} is not a readable safetensors file \(.*lora_[AB]\.weight "
                                                    r"\(bytes \[\d+, \d+\)\) overlaps .*lora_[AB]\.weight"):
        open_checkpoint("c", d)
    with pytest.raises(lt.AdapterFormatError):
        MappedFile(w)


# --- atomic writers: leftovers of killed writers, permissions -------------------------------------------------
SAVE_AND_HANG = """
    import sys, time
    import torch, transformers
    import lispetorch as lt
    from lispetorch import atomic
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    lt.inject(model, lt.LoraConfig(r=4))

    def hang(root):  # every file is written into the temporary; stop here until killed
        print("writing", flush=True)
        time.sleep(600)

    atomic._sync_tree = hang
    lt.save_adapter(model, sys.argv[1])
"""


def _save_until_killed(target: Path) -> None:
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SAVE_AND_HANG), str(target)], stdout=subprocess.PIPE,
                         text=True, env=ENV)
    try:
        assert p.stdout.readline() == "writing\n"
    finally:
        p.kill()
        p.wait(timeout=60)


def test_a_save_killed_midway_leaves_a_temporary_that_the_next_save_removes(model_dirs, tmp_path):
    from conftest import load

    target = tmp_path / "adapter"
    _save_until_killed(target)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".adapter.") and left[0].endswith(".tmp")
    assert (tmp_path / left[0] / "adapter_model.safetensors").is_file()  # the kill came mid-save
    model = load(model_dirs["llama"])
    lt.inject(model, lt.LoraConfig(r=2))
    lt.save_adapter(model, target)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    lt.load_adapter(load(model_dirs["llama"]), target)


def test_a_save_in_progress_is_not_taken_for_a_leftover(tmp_path):
    target = tmp_path / "adapter"
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SAVE_AND_HANG), str(target)], stdout=subprocess.PIPE,
                         text=True, env=ENV)
    try:
        assert p.stdout.readline() == "writing\n"
        live = [q.name for q in tmp_path.iterdir()]
        assert atomic.remove_leftovers(target) == []
        assert [q.name for q in tmp_path.iterdir()] == live  # the live write keeps its temporary
    finally:
        p.kill()
        p.wait(timeout=60)
    assert [q.name for q in atomic.remove_leftovers(target)] == live  # once its writer is gone, it is a leftover
    assert list(tmp_path.iterdir()) == []


def test_a_file_written_by_a_killed_process_is_cleaned_by_the_next_write(tmp_path):
    target = tmp_path / "notes.txt"
    r = run_python(f"""
        import os, tempfile
        fd, tmp = tempfile.mkstemp(prefix=".notes.txt.", suffix=".tmp", dir={str(tmp_path)!r})
        os.write(fd, b"half")
        os.kill(os.getpid(), 9)
    """)
    assert r.returncode == -signal.SIGKILL
    assert len(list(tmp_path.iterdir())) == 1
    atomic.write_text(target, "whole")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and target.read_text() == "whole"


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_what_is_written_follows_the_umask(model_dirs, tmp_path, mask):
    r = run_python(f"""
        import os, transformers
        import lispetorch as lt
        from lispetorch import atomic
        os.umask({mask})
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        lt.inject(model, lt.LoraConfig(r=2))
        lt.save_adapter(model, {str(tmp_path / "a")!r})
        atomic.write_text({str(tmp_path / "f.txt")!r}, "x")
    """)
    assert r.returncode == 0, r.stderr
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "a") == 0o777 & ~mask
    assert mode(tmp_path / "f.txt") == 0o666 & ~mask
    assert all(mode(p) == 0o666 & ~mask for p in (tmp_path / "a").iterdir())


def test_the_kinds_of_fault_are_of_the_one_hierarchy():
    assert issubclass(lt.NonFiniteError, lt.LispetorchError) and issubclass(lt.NonFiniteError, ValueError)
    assert issubclass(lt.CheckpointError, lt.AdapterFormatError)
    assert issubclass(lt.WriteError, lt.LispetorchError) and issubclass(lt.WriteError, OSError)
    assert lt.train.NonFiniteError is lt.NonFiniteError and lt.train.CheckpointError is lt.CheckpointError
    assert lt.train.WriteError is lt.WriteError


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_combination_that_overflows_its_dtype_is_not_written(tmp_path):
    from lispetorch import combine

    for name in ("a", "b"):  # float16 factors whose weighted concatenation leaves float16's range
        d = _write_adapter_dir(tmp_path / name, modules=2, width=16)
        tensors = {k: (v * 0 + 40000.0).half() for k, v in load_file(str(d / "adapter_model.safetensors")).items()}
        save_file(tensors, str(d / "adapter_model.safetensors"))
    cfg = {n: str(tmp_path / n) for n in ("a", "b")}
    with pytest.raises(NonFiniteError, match=rf"^{tmp_path / 'out'}: the combined adapter \(cat, torch.float16\): "
                                             r"\S+ holds \d+ NaN/Inf"):
        combine.build(cfg, {"a": 1.0, "b": 1.0}, tmp_path / "out", mode="cat")
    assert not (tmp_path / "out").exists()


# --- the checked reader: reads grouped, each file checked once per group -------------------------------------
def test_stream_reads_a_group_of_modules_with_one_call_and_two_checks_per_file(tmp_path, monkeypatch):
    d1 = _write_adapter_dir(tmp_path / "a", modules=12, seed=1)
    d2 = _write_adapter_dir(tmp_path / "b", modules=12, seed=2)
    cs = [open_checkpoint("a", d1), open_checkpoint("b", d2)]
    refs = [load_file(str(c.weights_file)) for c in cs]
    order = sorted(cs[0].modules, key=lambda m: cs[0].entries[cs[0].modules[m].key_A].begin)
    calls = {"preadv": 0, "fstat": 0}
    real_preadv, real_fstat = os.preadv, os.fstat

    def preadv(*args):
        calls["preadv"] += 1
        return real_preadv(*args)

    def fstat(*args):
        calls["fstat"] += 1
        return real_fstat(*args)

    for background in (False, True):
        calls.update(preadv=0, fstat=0)
        with monkeypatch.context() as mp:
            mp.setattr(os, "preadv", preadv)
            mp.setattr(os, "fstat", fstat)
            with stream(cs, order, group=64 << 10, background=background) as it:
                got = list(it)
        assert [m for m, _, _ in got] == order
        for m, As, Bs in got:
            for c, ref, A, B in zip(cs, refs, As, Bs, strict=True):
                assert torch.equal(A, ref[c.modules[m].key_A]) and torch.equal(B, ref[c.modules[m].key_B])
        # 12 modules of 16 KiB per file: a group of 1 module, then groups of 64 KiB of both files (2 modules): 7
        assert calls["preadv"] == 7 * 2, calls
        assert calls["fstat"] == 7 * 2 * 2 + 2, calls  # before and after each group, and one per file opened


def test_the_reader_keeps_tensors_aligned_when_the_file_does_not(tmp_path):
    # a hand-written file: a float16 tensor of 3 values (6 bytes) right before a float32 one
    h = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16)
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    header = json.dumps({"h": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
                         "x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [6, 30]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + h.numpy().tobytes() + x.numpy().tobytes())
    f = MappedFile(path)
    size, spans, places = f.layout("h", "x")
    assert len(spans) == 2 and places == [0, 64] and size == 64 + 24  # x moved to the next 64 bytes
    a, b = f.read("h", "x")
    assert torch.equal(a, h) and torch.equal(b, x)
    assert b.data_ptr() % 4 == 0
    f.close()


def test_a_checkpoint_whose_header_bytes_changed_after_it_was_opened_is_parsed_again(tmp_path):
    d = _write_adapter_dir(tmp_path / "c", modules=2)
    c = open_checkpoint("c", d)
    assert c.header == c.weights_file.read_bytes()[:len(c.header)] and len(c.header) > 8
    data = bytearray(c.weights_file.read_bytes())
    data[8:8 + len(c.header) - 8] = data[8:8 + len(c.header) - 8].replace(b'"F32"', b'"F16"', 1)
    c.weights_file.write_bytes(bytes(data))  # same size, another header: not the tensors it was opened with
    with pytest.raises(lt.AdapterFormatError, match="not a readable safetensors file|changed since it was opened"):
        MappedFile(c.weights_file, c.entries, c.file_size, c.header)
