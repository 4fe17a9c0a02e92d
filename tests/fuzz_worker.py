"""The process that runs the fuzz suite's cases (tests/test_fuzz.py): one JSON request a line on stdin, one JSON
answer a line on stdout. Run apart from pytest so that a case that hangs or dies by a signal is seen as such (the
suite kills and restarts this process) instead of stopping the tests.

An answer per target: ``ok`` (success, and the result checked: the factors read are the file's, the model's
output finite where the factors are of moderate size, the config's values of their types and finite), ``clean``
(a LispetorchError with a message), ``escape`` (any other exception: its type and message), ``wrong`` (a success
whose result does not hold).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
import sys
import traceback
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

import lispetorch as lt
from lispetorch import experiment, tasks
from lispetorch.combine.config import load_config
from lispetorch.combine.reader import open_checkpoint, stream
from lispetorch.lisp import lispe_eval
from lispetorch.methods.tinylora import restore_tinylora, tinylora_cores
from lispetorch.peft_format import MAGNITUDE, parse_key
from lispetorch.train.config import TrainConfig

torch.manual_seed(0)
BASE = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    vocab_size=64, max_position_embeddings=32)).eval()
IDS = torch.arange(8).unsqueeze(0)
# a mixture of experts: expert adapters' files (target_parameters) load into this one
MOE_BASE = transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(
    hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    vocab_size=64, max_position_embeddings=32, num_local_experts=4, num_experts_per_tok=2)).eval()


class Wrong(Exception):
    """A success whose result does not hold."""


def file_factors(d: Path) -> dict[tuple[str, str], list[torch.Tensor]]:
    """The adapter file's tensors by (module, factor); more than one for a factor is a Wrong (it was accepted)."""
    weights: dict[tuple[str, str], list[torch.Tensor]] = {}
    for key, t in load_file(str(d / "adapter_model.safetensors")).items():
        parsed = parse_key(key)
        if parsed is not None:
            weights.setdefault(parsed, []).append(t)
    if any(len(v) > 1 for v in weights.values()):
        raise Wrong("two keys for one factor were accepted")
    return weights


def load_adapter(d: Path) -> None:
    model = copy.deepcopy(BASE)
    lt.load_adapter(model, d)
    weights = file_factors(d)
    for name, layer in lt.adapter_layers(model).items():
        A, B, _ = layer.factors("default")
        for which, t in (("lora_A", A), ("lora_B", B)):
            want = weights.get((name, which), [None])[0]
            if want is None or not torch.equal(t.detach(), want.to(t.dtype)):
                raise Wrong(f"{name}.{which} is not the file's tensor")
        want = weights.get((name, MAGNITUDE), [None])[0]
        got = layer.lora_magnitude_vector["default"].detach() if "default" in layer.lora_magnitude_vector else None
        if (got is None) != (want is None) or (got is not None and not torch.equal(got, want.to(got.dtype))):
            raise Wrong(f"{name}: the DoRA magnitude is not the file's")
        s = layer.settings["default"].scaling
        if not (isinstance(s, float) and math.isfinite(s) and s > 0):
            raise Wrong(f"{name}: scaling {s!r}")
    moderate = all(float(t.abs().max()) < 1e4 for ts in weights.values() for t in ts if t.numel())
    with torch.no_grad():  # factors of moderate size must give a finite output (huge ones may overflow rightly)
        if moderate and not torch.isfinite(model(IDS).logits).all():
            raise Wrong("the adapted model's output is not finite")


def load_experts(d: Path) -> None:
    """``load_adapter`` into the mixture of experts: each expert weight's factors, written back in PEFT's layout,
    are the file's tensors under the nested names PEFT gives them; scalings finite; the output finite where the
    factors are of moderate size."""
    model = copy.deepcopy(MOE_BASE)
    lt.load_adapter(model, d)
    weights = file_factors(d)
    for name, layer in lt.adapter_layers(model).items():
        if isinstance(layer, lt.LoraExperts):
            pairs = {key_mod: lt.experts.to_peft(layer.lora_A["default"][p].detach(),
                                                 layer.lora_B["default"][p].detach())
                     for p, key_mod in lt.experts.peft_module_names(name, layer, layer.parameter_names).items()}
            scalings = [s.scaling for s in layer.weight_settings["default"].values()]
        else:
            A, B, _ = layer.factors("default")
            pairs, scalings = {name: (A.detach(), B.detach())}, [layer.settings["default"].scaling]
        for key_mod, (A, B) in pairs.items():
            for which, t in (("lora_A", A), ("lora_B", B)):
                want = weights.get((key_mod, which), [None])[0]
                if want is None or want.shape != t.shape or not torch.equal(t, want.to(t.dtype)):
                    raise Wrong(f"{key_mod}.{which} is not the file's tensor")
        if not all(isinstance(s, float) and math.isfinite(s) and s > 0 for s in scalings):
            raise Wrong(f"{name}: scalings {scalings!r}")
    moderate = all(float(t.abs().max()) < 1e4 for ts in weights.values() for t in ts if t.numel())
    with torch.no_grad():
        if moderate and not torch.isfinite(model(IDS).logits).all():
            raise Wrong("the adapted model's output is not finite")


def combine_read(d: Path) -> None:
    c = open_checkpoint("c", d)
    try:
        ref = load_file(str(d / "adapter_model.safetensors"))
    except Exception as e:  # what safetensors itself refuses must not be read as an adapter
        raise Wrong(f"read a file safetensors refuses ({e})") from None
    with stream([c], list(c.modules)) as it:
        for m, (A,), (B,) in it:
            mf = c.modules[m]
            if not (torch.equal(A, ref[mf.key_A]) and torch.equal(B, ref[mf.key_B])):
                raise Wrong(f"{m}: factors differ from the file's")
            if not (math.isfinite(mf.scale) and mf.scale > 0):
                raise Wrong(f"{m}: scale {mf.scale!r}")


def _check_values(obj, where: str) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _check_values(v, f"{where}.{f.name}")
        elif isinstance(v, float) and not math.isfinite(v):
            raise Wrong(f"{where}.{f.name} = {v!r} accepted")
        elif f.type in ("int", "float") and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise Wrong(f"{where}.{f.name} = {v!r} accepted as {f.type}")
        elif f.type == "bool" and not isinstance(v, bool):
            raise Wrong(f"{where}.{f.name} = {v!r} accepted as bool")


def train_config(path: Path) -> None:
    cfg = TrainConfig.from_yaml(path)
    _check_values(cfg, "config")
    if cfg.lora.dora_recompute and not cfg.lora.use_dora:
        raise Wrong("lora.dora_recompute accepted without lora.use_dora")


def combine_config(path: Path) -> None:
    cfg = load_config(path)
    if not all(isinstance(e.path, Path) and isinstance(e.description, str) for e in cfg.checkpoints.values()):
        raise Wrong("an entry's path or description is of another type")
    if not (isinstance(cfg.verify_paths, bool) and isinstance(cfg.verbose_paths, bool)):
        raise Wrong("a setting is not a boolean")


def experiment_plan(path: Path) -> None:
    """``lispetorch experiment``'s plan: every run's config of its types, one run per point of the grid (and of
    the full baseline), each in a directory of its own under the experiment's."""
    raw = json.loads(path.with_name("grid.json").read_text())  # what the YAML says, as the test wrote it
    p = experiment.plan(path)
    for cfg in p.configs:
        _check_values(TrainConfig.from_dict(cfg), "run")
    dirs = [Path(c["output_dir"]) for c in p.configs]
    if len(set(dirs)) != len(dirs) or not all(d.parent == p.output_dir / "runs" for d in dirs):
        raise Wrong(f"run directories not distinct or not under {p.output_dir}: {dirs[:4]}")
    if raw is not None:  # the grid's own axes multiply the runs (a sweep or ablation adds axes)
        points = math.prod(len(v) for v in raw.values())
        if len(p.settings) < points or len(p.settings) % points:
            raise Wrong(f"{len(p.settings)} runs for a grid of {points} points")
        for s, cfg in zip(p.settings, p.configs, strict=True):
            for key, value in s.items():
                got = cfg
                for part in key.split("."):
                    got = got.get(part) if isinstance(got, dict) else None
                if key != "lora.method" and got != value:
                    raise Wrong(f"run {cfg['output_dir']}: {key} is {got!r}, its setting says {value!r}")


def task_records(d: Path) -> None:
    """A task's JSONL files read by ``load_task``: every record of its layout, its fields strings, its label one
    of the verbalizers', its answers where ``answer_start`` says in the context."""
    spec = json.loads((d / "task.json").read_text())
    task = tasks.load_task(spec, base=d)
    for records, name in ((task.train, "train.jsonl"), (task.eval, "eval.jsonl")):
        lines = [line for line in (d / name).read_text(encoding="utf-8").split("\n") if line.strip()]
        if len(records) != len(lines):  # every non-blank line is one record
            raise Wrong(f"{name}: {len(records)} records from {len(lines)} non-blank lines")
        for rec in records:
            if not all(isinstance(v, str) for v in rec.fields.values()):
                raise Wrong(f"{rec.where}: a field that is not a string: {rec.fields!r:.200}")
            if spec["kind"] == "classification" and rec.label not in task.verbalizers:
                raise Wrong(f"{rec.where}: label {rec.label!r} is not a verbalizer's")
            if spec["kind"] == "qa":
                file, line = rec.where.rsplit(":", 1)
                raw = json.loads(Path(file).read_text(encoding="utf-8").split("\n")[int(line) - 1])
                for text, start in zip(raw["answers"]["text"], raw["answers"]["answer_start"], strict=True):
                    if not (0 <= start and rec.fields["context"][start:start + len(text)] == text):
                        raise Wrong(f"{rec.where}: answer {text!r:.50} at {start} accepted")


def tinylora_restore(d: Path) -> None:
    """``restore_tinylora`` on a fresh model: the adapter's vector is the file's, the model's output finite."""
    model = copy.deepcopy(BASE)
    restore_tinylora(model, d / "tiny_lora_v.pt")
    state = torch.load(d / "tiny_lora_v.pt", weights_only=True)
    v = state["global_v"]
    vectors = {id(c.v): c.v for c in tinylora_cores(model).values()}.values()
    want = v.reshape(-1, v.shape[-1])
    if len(vectors) != want.shape[0] or not all(torch.equal(p.detach(), w.to(p.dtype))
                                                 for p, w in zip(vectors, want, strict=True)):
        raise Wrong("the adapter's vector is not the file's")
    with torch.no_grad():
        if float(v.abs().max()) < 1e3 and not torch.isfinite(model(IDS).logits).all():
            raise Wrong("the adapted model's output is not finite")


def lispe_run(path: Path) -> None:
    """A LispE script run as ``lispetorch run`` does; where the test knows the value of ``result``, it is
    checked."""
    expected = path.with_name("expected.json")
    with contextlib.redirect_stdout(io.StringIO()):
        found = lispe_eval.run(path)
    if expected.is_file():
        want = json.loads(expected.read_text())
        if found.get("result") != want or type(found.get("result")) is not type(want):
            raise Wrong(f"result is {found.get('result')!r:.100}, expected {want!r:.100}")


TARGETS = {"load_adapter": load_adapter, "load_experts": load_experts, "combine": combine_read,
           "train_config": train_config, "combine_config": combine_config, "experiment_plan": experiment_plan,
           "task_records": task_records, "tinylora_restore": tinylora_restore, "lispe_run": lispe_run}


def run(target: str, path: Path) -> dict:
    try:
        TARGETS[target](path)
    except Wrong as e:
        return {"outcome": "wrong", "message": str(e)}
    except lt.LispetorchError as e:
        return {"outcome": "clean" if str(e).strip() else "escape", "type": type(e).__name__, "message": str(e)}
    except Exception as e:
        return {"outcome": "escape", "type": type(e).__name__, "message": str(e)[:500],
                "where": traceback.format_exc(limit=-3)[-1500:]}
    return {"outcome": "ok"}


def main() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        print(json.dumps({t: run(t, Path(req["path"])) for t in req["targets"]}), flush=True)


if __name__ == "__main__":
    main()
