"""The fuzz suite: generated adapter configs, safetensors headers, truncations, byte flips and key sets against
``load_adapter`` and the checkpoint optimizer's reader, generated training and combine configs against their
readers. Every outcome must be a success whose result holds or a ``LispetorchError`` with a message: never another
exception, a hang, a signal, a silent wrong result, or a changed input file.

Each case runs in a worker process (tests/fuzz_worker.py) with a time limit; a worker that hangs is killed and one
that dies is seen by its signal, and a new one takes the next case. ``HYPOTHESIS_PROFILE=fuzz`` (``make fuzz``) runs
many more examples; ``LISPETORCH_FUZZ_STATS=path.json`` writes the outcomes by input kind, and
``python tests/test_fuzz.py path.json`` prints them as a table (``LISPETORCH_FUZZ_COUNT_ONLY=1``: count every case
without stopping at the first failure, for the figures).
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import hashlib
import io
import json
import os
import select
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from lispetorch.train.config import TrainConfig

WORKER = Path(__file__).with_name("fuzz_worker.py")
TIME_LIMIT = 30.0  # seconds a case may take before it counts as a hang
ENV = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "PYTHONDONTWRITEBYTECODE": "1"}
STATS: dict[str, Counter] = defaultdict(Counter)
FAILURES: dict[str, list] = defaultdict(list)
PREFIX = "base_model.model."
COUNT_ONLY = bool(os.environ.get("LISPETORCH_FUZZ_COUNT_ONLY"))  # for the figures: count every outcome, fail none
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")
SHAPES = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.0.self_attn.v_proj": (16, 32)}  # (out, in)
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")


class Worker:
    """A fuzz_worker.py process: ``run`` sends one case and returns the outcome per target, or ``hang`` /
    ``signal`` (the process is then replaced)."""

    def __init__(self) -> None:
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=ENV)
        line = self._readline(300)
        assert line is not None and json.loads(line) == {"ready": True}, "the fuzz worker did not start"

    def _readline(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, path: Path, targets: list[str]) -> dict[str, dict]:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps({"path": str(path), "targets": targets}) + "\n")
        self.proc.stdin.flush()
        line = self._readline(TIME_LIMIT)
        if line:
            return json.loads(line)
        if line is None:  # no answer in time
            self.stop()
            return {t: {"outcome": "hang"} for t in targets}
        code = self.proc.wait()
        self.proc = None
        return {t: {"outcome": "signal", "message": f"worker exited with {code}"} for t in targets}


_worker = Worker()
atexit.register(_worker.stop)


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def check(kind: str, files: dict[str, bytes], targets: list[str]) -> None:
    """Writes ``files`` into a fresh directory, runs ``targets`` on it, counts and checks the outcomes; ``kind``
    names the input kind in the figures."""
    files = dict(files)
    target = files.pop("__target__", b"").decode()
    with tempfile.TemporaryDirectory(prefix="fuzz.") as tmp:
        d = Path(tmp) / "case"
        d.mkdir()
        for name, data in files.items():
            (d / name).write_bytes(data)
        before = _digest(d)
        results = _worker.run(d / target if target else d, targets)
        lost = _digest(d) != before
    for target, r in results.items():
        outcome = "lost" if lost else r["outcome"]
        STATS[f"{kind} → {target}"][outcome] += 1
        if outcome not in ("ok", "clean"):
            FAILURES[f"{kind} → {target}: {outcome}"].append({**r, "files": {k: v[:300].decode("latin-1") for k, v in
                                                                    files.items()}})
        if not COUNT_ONLY:
            assert outcome in ("ok", "clean"), f"{kind} → {target}: {outcome}: {r}"


def _stats_file():
    out = os.environ.get("LISPETORCH_FUZZ_STATS")
    if out:
        Path(out).write_text(json.dumps({"outcomes": {k: dict(v) for k, v in STATS.items()},
                                         "failures": {k: v[:5] for k, v in FAILURES.items()}}, indent=1))


atexit.register(_stats_file)
SETTINGS = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], deadline=None)


# --- inputs ---------------------------------------------------------------------------------------------------
def valid_tensors(rank: int = 2, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (o, i) in SHAPES.items():
        out[f"{PREFIX}{m}.lora_A.weight"] = (torch.randn(rank, i, generator=g) * 0.1).to(dtype)
        out[f"{PREFIX}{m}.lora_B.weight"] = (torch.randn(o, rank, generator=g) * 0.1).to(dtype)
    return out


VALID_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
                "lora_dropout": 0.0, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
                "rank_pattern": {}, "alpha_pattern": {}}

hostile_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.sampled_from([0, -1, 2**31, 2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -0.0, 0.5, 2.0, 1e-320]),
    st.sampled_from(["", "false", "true", "2", "nan", "q_proj", "all-linear", "x" * 300]),
    st.text(max_size=12))
json_values = st.recursive(hostile_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
regex_keys = st.one_of(st.sampled_from(["q_proj", "v_proj", "layers\\.0\\.self_attn\\.q_proj", ".*", "(", "[",
                                        "a{2,", "q_proj|v_proj", "^model", "v_proj$", "\\", "(?P<x>q)_proj"]),
                       st.text(alphabet="().*+?|[]{}^$\\qv_proj0", max_size=10))
config_values = {
    "peft_type": st.sampled_from(["LORA", "lora", "ADALORA", "", 3]),
    "r": st.one_of(st.just(2), hostile_scalars), "lora_alpha": st.one_of(st.just(4), hostile_scalars),
    "use_rslora": hostile_scalars, "fan_in_fan_out": hostile_scalars, "use_dora": hostile_scalars,
    "lora_dropout": hostile_scalars, "target_modules": json_values, "bias": hostile_scalars,
    "target_parameters": json_values,
    "rank_pattern": st.one_of(st.dictionaries(regex_keys, st.one_of(st.just(2), hostile_scalars), max_size=3),
                              json_values),
    "alpha_pattern": st.one_of(st.dictionaries(regex_keys, st.one_of(st.just(4), hostile_scalars), max_size=3),
                               json_values),
}


@st.composite
def adapter_configs(draw) -> bytes:
    form = draw(st.sampled_from(["edit", "edit", "edit", "any json", "bytes"]))
    if form == "bytes":
        return draw(st.binary(max_size=200))
    if form == "any json":
        return json.dumps(draw(json_values)).encode()
    cfg = dict(VALID_CONFIG)
    for key in draw(st.lists(st.sampled_from(sorted(config_values)), max_size=4, unique=True)):
        cfg[key] = draw(config_values[key])
    for key in draw(st.lists(st.sampled_from(sorted(cfg)), max_size=1)):
        del cfg[key]
    return json.dumps(cfg).encode()


DTYPES = ["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "XX", ""]


@st.composite
def safetensors_files(draw) -> bytes:
    """A header built entry by entry from a valid one, each entry kept or changed (its dtype, shape, offsets, or
    the whole entry), then its length field and data, kept or changed."""
    base = valid_tensors()
    keys = list(base) + [f"{PREFIX}model.layers.0.mlp.up_proj.lora_A.weight", "junk", "__metadata__"]
    chosen = draw(st.one_of(st.just(list(base)), st.lists(st.sampled_from(keys), max_size=5, unique=True)))
    header, at = {}, 0
    for key in chosen:
        t = base.get(key, torch.zeros(2, 32))
        entry = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [at, at + t.numel() * 4]}
        change = draw(st.sampled_from(["none"] * 6 + ["dtype", "shape", "begin", "end", "entry"]))
        if change == "dtype":
            entry["dtype"] = draw(st.sampled_from(DTYPES))
        elif change == "shape":
            entry["shape"] = draw(st.one_of(st.lists(st.integers(-2, 70), max_size=3), st.just([2**40, 2**40]),
                                            json_values))
        elif change in ("begin", "end"):
            i = 0 if change == "begin" else 1
            entry["data_offsets"][i] = draw(st.one_of(st.integers(-8, at + 2100), st.just(2**62), json_values))
        elif change == "entry" or key == "__metadata__":
            entry = draw(json_values)
        header[key] = entry
        if change == "none" and key != "__metadata__":
            at = entry["data_offsets"][1]
    body = json.dumps(header).encode()
    length = draw(st.one_of(st.just(len(body)), st.just(len(body)), st.integers(0, len(body) + 64),
                            st.just(2**63 - 1)))
    data = draw(st.one_of(st.just(b"\x3f" * at), st.just(b"\x3f" * at), st.binary(max_size=2000)))
    return length.to_bytes(8, "little") + body + data


def valid_adapter(dtype=torch.float32) -> dict[str, bytes]:
    return {"adapter_config.json": json.dumps(VALID_CONFIG).encode(),
            "adapter_model.safetensors": save(valid_tensors(dtype=dtype))}


KEY_FORMS = ["{p}{m}.lora_A.weight", "{p}{m}.lora_B.weight", "{p}{m}.lora_A.default.weight", "{m}.lora_B.weight",
             "{p}{m}.lora_C.weight", "{p}{m}.base_layer.weight", "{p}model.layers.9.self_attn.q_proj.lora_A.weight",
             "{p}{m}.lora_embedding_A", "{p}{m}.lora_A.weight.extra"]


# --- the properties -------------------------------------------------------------------------------------------
@SETTINGS
@given(adapter_configs())
def test_fuzz_adapter_config(config):
    files = valid_adapter()
    files["adapter_config.json"] = config
    check("adapter_config.json", files, ["load_adapter", "combine"])


@SETTINGS
@given(safetensors_files())
def test_fuzz_safetensors_header(weights):
    files = valid_adapter()
    files["adapter_model.safetensors"] = weights
    check("safetensors header", files, ["load_adapter", "combine"])


@SETTINGS
@given(st.sampled_from(["adapter_model.safetensors", "adapter_config.json"]), st.data(),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_fuzz_truncations_and_byte_flips(name, data, dtype):
    files = valid_adapter(dtype)
    raw = bytearray(files[name])
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="keep")]
    else:
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            i = data.draw(st.integers(0, len(raw) - 1), label="at")
            raw[i] ^= data.draw(st.integers(1, 255), label="xor")
    files[name] = bytes(raw)
    check("truncation or byte flip", files, ["load_adapter", "combine"])


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(KEY_FORMS[:2]), st.sampled_from(MODULES)), max_size=4, unique=True),
       st.lists(st.tuples(st.sampled_from(KEY_FORMS), st.sampled_from(MODULES)), max_size=3, unique=True),
       st.booleans())
def test_fuzz_key_sets(dropped, added, start_full):
    """The full key set (or none) with keys taken away and others (other forms, other modules, unknown) added."""
    base = valid_tensors()
    tensors = {}
    full = [(f, m) for f in KEY_FORMS[:2] for m in MODULES] if start_full else []
    for form, m in [x for x in full if x not in dropped] + added:
        key = form.format(p=PREFIX, m=m)
        which = "lora_B" if "lora_B" in key else "lora_A"
        tensors[key] = base[f"{PREFIX}{m}.{which}.weight"].clone()
    files = valid_adapter()
    files["adapter_model.safetensors"] = save(tensors) if tensors else b"\x02\x00\x00\x00\x00\x00\x00\x00{}"
    check("key set", files, ["load_adapter", "combine"])


@SETTINGS
@given(st.booleans(), st.lists(st.tuples(st.sampled_from(MODULES), st.sampled_from([0, -1, 1, -16]),
                                         st.sampled_from(["norms", "nan", "zero", "huge"])), max_size=3),
       st.sampled_from(["{p}{m}.lora_magnitude_vector", "{p}{m}.lora_magnitude_vector.default.weight",
                        "{m}.lora_magnitude_vector"]))
def test_fuzz_dora_magnitudes(use_dora, magnitudes, form):
    """DoRA files: ``use_dora`` true or false, magnitude keys for some modules (or none), of the right length or
    not, holding row norms, NaN, zeros or huge values."""
    tensors = valid_tensors()
    for m, off, kind in magnitudes:
        n = max(SHAPES[m][0] + off, 0)
        value = {"norms": torch.rand(n) + 0.5, "nan": torch.full((n,), float("nan")), "zero": torch.zeros(n),
                 "huge": torch.full((n,), 1e38)}[kind]
        tensors[form.format(p=PREFIX, m=m)] = value
    files = valid_adapter()
    files["adapter_config.json"] = json.dumps({**VALID_CONFIG, "use_dora": use_dora}).encode()
    files["adapter_model.safetensors"] = save(tensors)
    check("DoRA magnitudes", files, ["load_adapter", "combine"])


# An expert adapter for the worker's mixture of experts (hidden 16, 4 experts of 8; PEFT's layout: lora_A (r·E, in),
# lora_B (out, r·E), the inner wrapper's keys under .base_layer), then changed.
EXPERT_SHAPES = {"model.layers.0.mlp.experts.base_layer": (16, 16), "model.layers.0.mlp.experts": (16, 8),
                 "model.layers.0.self_attn.q_proj": (16, 16)}  # (out, in): gate_up_proj, down_proj, q_proj
EXPERT_CONFIG = {**VALID_CONFIG, "target_modules": ["q_proj"], "target_parameters": ["down_proj", "gate_up_proj"]}


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(sorted(EXPERT_SHAPES)), st.sampled_from(["lora_A", "lora_B"]),
                          st.sampled_from(["rows", "cols", "drop", "nan", "huge", "deeper", "none"]),
                          st.sampled_from([-4, -1, 1, 4])), max_size=3),
       st.one_of(st.just(None), st.sampled_from([["gate_up_proj"], ["gate.weight", "down_proj"], ["weight"],
                                                  ["q_proj.weight"], ["nope"], [], "gate_up_proj"]), json_values),
       st.one_of(st.just({}), st.dictionaries(st.sampled_from([".*gate_up_proj", "down_proj", "experts", "q_proj"]),
                                              st.one_of(st.sampled_from([1, 2, 4, 8]), hostile_scalars),
                                              max_size=2)))
def test_fuzz_expert_files(changes, target_parameters, rank_pattern):
    """Expert adapters' files (``target_parameters``): factors with rows or columns off (the expert count among
    them), keys dropped or nested one level too deep, NaN or huge values, hostile ``target_parameters`` and rank
    patterns; into a mixture of experts, and into the checkpoint optimizer (which refuses them)."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for m, (o, i) in EXPERT_SHAPES.items():
        k = 2 * (1 if m.endswith("q_proj") else 4)
        tensors[f"{PREFIX}{m}.lora_A.weight"] = torch.randn(k, i, generator=g) * 0.1
        tensors[f"{PREFIX}{m}.lora_B.weight"] = torch.randn(o, k, generator=g) * 0.1
    for m, which, change, by in changes:
        key = f"{PREFIX}{m}.{which}.weight"
        if key not in tensors:
            continue
        t = tensors.pop(key)
        if change == "rows":
            t = torch.zeros(max(t.shape[0] + by, 0), t.shape[1])
        elif change == "cols":
            t = torch.zeros(t.shape[0], max(t.shape[1] + by, 0))
        elif change == "nan":
            t = t.clone().fill_(float("nan"))
        elif change == "huge":
            t = t.clone().fill_(1e38)
        if change == "deeper":
            key = f"{PREFIX}{m}.base_layer.{which}.weight"
        if change != "drop":
            tensors[key] = t
    config = dict(EXPERT_CONFIG, rank_pattern=rank_pattern)
    if target_parameters is not None:
        config["target_parameters"] = target_parameters
    files = {"adapter_config.json": json.dumps(config).encode(),
             "adapter_model.safetensors": save(tensors) if tensors else b"\x02\x00\x00\x00\x00\x00\x00\x00{}"}
    check("expert files", files, ["load_experts", "combine"])


_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                   if f.default is not dataclasses.MISSING}
TRAIN_KEYS = {
    "learning_rate": st.floats(allow_nan=True, allow_infinity=True), "weight_decay": hostile_scalars,
    "num_epochs": hostile_scalars, "max_steps": hostile_scalars, "batch_size": hostile_scalars,
    "max_seq_length": hostile_scalars, "warmup_steps": hostile_scalars, "max_grad_norm": hostile_scalars,
    "min_lr": hostile_scalars, "gamma": hostile_scalars, "packing": hostile_scalars, "mask_prompt": hostile_scalars,
    "validation_split": hostile_scalars, "scheduler_type": hostile_scalars, "dtype": hostile_scalars,
    "report_to": json_values, "plot": hostile_scalars, "seed": hostile_scalars, "save_steps": hostile_scalars,
    "lora": st.fixed_dictionaries({}, optional={"rank": hostile_scalars, "alpha": hostile_scalars,
                                                "dropout": hostile_scalars, "target_modules": json_values,
                                                "init": hostile_scalars, "method": hostile_scalars,
                                                "options": json_values, "target_parameters": json_values,
                                                "use_dora": hostile_scalars, "dora_recompute": hostile_scalars}),
    "nonsense_key": hostile_scalars,
}


TRAIN_KEYS = {k: st.one_of(st.just(_TRAIN_DEFAULTS[k]), v) if k in _TRAIN_DEFAULTS else v
              for k, v in TRAIN_KEYS.items()}  # a valid value as often as a hostile one


def _yaml(data) -> bytes:
    return yaml.safe_dump(data, allow_unicode=True).encode()


@st.composite
def train_yaml(draw) -> bytes:
    cfg = {"data": "corpus", "output_dir": "out"}
    for key in draw(st.lists(st.sampled_from(sorted(TRAIN_KEYS)), max_size=5, unique=True)):
        cfg[key] = draw(TRAIN_KEYS[key])
    form = draw(st.sampled_from(["dump", "dump", "aliases", "bytes"]))
    if form == "bytes":
        return draw(st.binary(max_size=200))
    if form == "aliases":  # a small alias tree: anchors may be refused, or read within bounds
        depth, fan = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        lines = ["a0: &a0 [1, 2]"]
        for i in range(1, depth + 1):
            lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]")
        key = draw(st.sampled_from(sorted(TRAIN_KEYS)))
        return ("\n".join(lines) + f"\ndata: corpus\noutput_dir: out\n{key}: *a{depth}\n").encode()
    return _yaml(cfg)


@SETTINGS
@given(train_yaml())
def test_fuzz_training_config(text):
    check("training YAML", {"train.yaml": text, "__target__": b"train.yaml"}, ["train_config"])


@st.composite
def combine_yaml(draw) -> bytes:
    entry = st.one_of(st.just("/nonexistent/a"), hostile_scalars, json_values,
                      st.fixed_dictionaries({"path": hostile_scalars}, optional={"description": json_values}))
    data = {"checkpoints": draw(st.one_of(st.dictionaries(st.one_of(st.text(max_size=6), hostile_scalars), entry,
                                                          max_size=3), json_values))}
    if draw(st.booleans()):
        data["settings"] = draw(st.one_of(st.fixed_dictionaries(
            {}, optional={"verify_paths": hostile_scalars, "verbose_paths": hostile_scalars}), json_values))
    if draw(st.booleans()):
        return draw(st.binary(max_size=100))
    try:
        return _yaml(data)
    except yaml.YAMLError:
        return b"checkpoints: {a: /x}\n"


@SETTINGS
@given(combine_yaml())
def test_fuzz_combine_config(text):
    check("combine YAML", {"checkpoints.yml": text, "__target__": b"checkpoints.yml"}, ["combine_config"])


# --- experiment grids, task files, tiny_lora_v.pt, LispE scripts ----------------------------------------------
GRID_AXES = {
    "learning_rate": st.one_of(st.sampled_from([1e-4, 3e-4]), st.floats(allow_nan=True, allow_infinity=True)),
    "seed": st.one_of(st.integers(0, 3000), hostile_scalars), "max_steps": st.one_of(st.integers(1, 50),
                                                                                      hostile_scalars),
    "batch_size": hostile_scalars, "warmup_steps": hostile_scalars, "weight_decay": hostile_scalars,
    "lora.rank": st.one_of(st.sampled_from([4, 8]), hostile_scalars), "lora.alpha": hostile_scalars,
    "lora.target_modules": st.one_of(st.sampled_from(["standard", "all-linear"]), json_values),
    "lora.method": hostile_scalars, "scheduler_type": hostile_scalars, "nonsense": hostile_scalars,
}


@st.composite
def experiment_yaml(draw) -> tuple[bytes, object]:
    """An experiment config and its grid as written (None where the test cannot say how many runs it makes)."""
    form = draw(st.sampled_from(["edit", "edit", "edit", "aliases", "bytes"]))
    if form == "bytes":
        return draw(st.binary(max_size=200)), None
    if form == "aliases":  # a few bytes of YAML whose axes share one list: the runs multiply
        n, axes = draw(st.integers(1, 12)), draw(st.integers(1, 9))
        names = ["seed", "max_steps", "warmup_steps", "save_steps", "eval_steps", "logging_steps", "batch_size",
                 "lora.rank", "lora.alpha"][:axes]
        values = ", ".join(str(i + 1) for i in range(n))
        lines = ["output_dir: exp", "base: {data: corpus}", "grid:", f"  {names[0]}: &v [{values}]"]
        lines += [f"  {k}: *v" for k in names[1:]]
        return ("\n".join(lines) + "\n").encode(), None
    cfg: dict = {"output_dir": "exp", "base": {"data": "corpus", "max_steps": 2}}
    grid = {}
    for key in draw(st.lists(st.sampled_from(sorted(GRID_AXES)), max_size=3, unique=True)):
        grid[key] = draw(st.one_of(st.lists(GRID_AXES[key], min_size=1, max_size=4),
                                   st.lists(GRID_AXES[key], max_size=4), hostile_scalars))
    cfg["grid"] = grid
    optional = {"mode": st.one_of(st.sampled_from(["single", "sweep", "ablation"]), hostile_scalars),
                "ablation": st.one_of(st.sampled_from(["rank", "alpha", "modules"]), hostile_scalars),
                "full_baseline": hostile_scalars, "metric": hostile_scalars, "name": hostile_scalars,
                "base": json_values, "output_dir": hostile_scalars, "nonsense": hostile_scalars}
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=3, unique=True)):
        cfg[key] = draw(optional[key])
    plain = all(isinstance(v, list) and v for v in grid.values())
    return _yaml(cfg), grid if plain else None


@SETTINGS
@given(experiment_yaml())
def test_fuzz_experiment_grid(case):
    text, grid = case
    check("experiment grid", {"experiment.yaml": text, "grid.json": json.dumps(grid).encode(),
                              "__target__": b"experiment.yaml"}, ["experiment_plan"])


CONTEXT = "the cat sat on the mat"
TASK_RECORDS = {
    "single": {"sentence": "a good film", "label": 1},
    "pair": {"sentence1": "a cat", "sentence2": "a dog", "label": "0"},
    "qa": {"question": "who sat?", "context": CONTEXT, "answers": {"text": ["cat"], "answer_start": [4]}},
}
TASK_FIELDS = {
    "sentence": hostile_scalars, "sentence1": hostile_scalars, "sentence2": hostile_scalars,
    "label": st.one_of(st.sampled_from([0, 1, "0", "1", 2, "yes", 1.0, True]), hostile_scalars),
    "question": hostile_scalars, "context": st.one_of(st.just(CONTEXT), hostile_scalars),
    "answers": st.one_of(st.fixed_dictionaries({"text": st.lists(st.sampled_from(["cat", "mat", "the", "", "dog"]),
                                                                 max_size=2),
                                                "answer_start": st.lists(st.integers(-30, 40), max_size=2)}),
                         json_values),
}


@st.composite
def task_lines(draw, layout: str) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        form = draw(st.sampled_from(["valid", "valid", "edit", "edit", "json", "bytes", "blank", "number"]))
        if form == "bytes":
            lines.append(draw(st.binary(max_size=40)).replace(b"\n", b" "))
        elif form == "blank":
            lines.append(draw(st.sampled_from([b"", b"  ", b"\t", b"\r", b"\x0c"])))
        elif form == "json":
            lines.append(json.dumps(draw(json_values)).encode())
        elif form == "number":  # numbers JSON allows but Python reads with limits or as non-finite
            value = draw(st.sampled_from(["1" * 5000, "NaN", "Infinity", "-0", "1e999", "2.0"]))
            rec = json.dumps({**TASK_RECORDS[layout], "label": "@"}).replace('"@"', value)
            lines.append(rec.encode())
        else:
            rec = copy.deepcopy(TASK_RECORDS[draw(st.sampled_from(sorted(TASK_RECORDS))) if form == "edit" and
                                              draw(st.booleans()) else layout])
            if form == "edit":
                for key in draw(st.lists(st.sampled_from(sorted(TASK_FIELDS)), min_size=1, max_size=3,
                                         unique=True)):
                    if draw(st.booleans()) and key in rec:
                        del rec[key]
                    else:
                        rec[key] = draw(TASK_FIELDS[key])
            lines.append(json.dumps(rec).encode())
    return b"\n".join(lines) + draw(st.sampled_from([b"", b"\n"]))


@SETTINGS
@given(st.sampled_from(["single", "pair", "qa"]), st.data())
def test_fuzz_task_files(layout, data):
    kind = "qa" if layout == "qa" else "classification"
    spec = {"kind": kind, "train_file": "train.jsonl", "eval_file": "eval.jsonl"}
    if kind == "classification":
        spec["verbalizers"] = {"0": "no", "1": "yes"}
    valid = (json.dumps(TASK_RECORDS[layout]) + "\n").encode()
    train = data.draw(task_lines(layout), label="train")
    ev = data.draw(st.one_of(st.just(valid), task_lines(layout)), label="eval")
    check("task JSONL", {"task.json": json.dumps(spec).encode(), "train.jsonl": train, "eval.jsonl": ev},
          ["task_records"])


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


TINY_U = 4
tiny_vectors = st.one_of(
    st.sampled_from(["ok", "ok", "groups", "nan", "inf", "huge", "int", "bool", "3d", "empty", "f64", "bf16",
                     "f16", "wide", "list", "none"]).map(lambda k: {
                         "ok": torch.linspace(-0.1, 0.1, TINY_U), "groups": torch.full((2, TINY_U), 0.01),
                         "nan": torch.tensor([0.1, float("nan"), 0.0, 0.0]),
                         "inf": torch.tensor([0.1, float("inf"), 0.0, 0.0]), "huge": torch.full((TINY_U,), 1e30),
                         "int": torch.arange(TINY_U), "bool": torch.ones(TINY_U, dtype=torch.bool),
                         "3d": torch.zeros(1, 1, TINY_U), "empty": torch.zeros(0), "f64": torch.zeros(TINY_U,
                                                                                                   dtype=torch.float64),
                         "bf16": torch.full((TINY_U,), 0.01, dtype=torch.bfloat16),
                         "f16": torch.full((TINY_U,), 0.01, dtype=torch.float16),
                         "wide": torch.zeros(TINY_U + 3), "list": [0.1] * TINY_U, "none": None}[k]),
    hostile_scalars)
TINY_FIELDS = {"global_v": tiny_vectors, "u_value": st.one_of(st.just(TINY_U), hostile_scalars),
               "rank": st.one_of(st.integers(1, 40), st.sampled_from([64, 2**31, 2**62]), hostile_scalars),
               "seed": st.one_of(st.just(0), hostile_scalars), "model_id": st.one_of(st.none(), hostile_scalars),
               "total_replaced_layers": st.one_of(st.sampled_from([None, 7, 1]), hostile_scalars),
               "is_quantized": hostile_scalars, "step": hostile_scalars, "validation_score": hostile_scalars,
               "junk": json_values}
SIDECAR = {"format": "lispetorch-tinylora", "convention": "paper", "target_modules": ["q_proj", "v_proj"],
           "groups": 1, "u_value": TINY_U, "rank": 2, "seed": 0, "total_replaced_layers": 2, "dtype": "float32"}
SIDECAR_VALUES = {"format": hostile_scalars, "convention": st.one_of(st.sampled_from(["paper", "qwen-coder"]),
                                                                     hostile_scalars),
                  "target_modules": st.one_of(st.sampled_from([["q_proj"], "all-linear", ["nothing"], []]),
                                              json_values),
                  "groups": hostile_scalars, "u_value": hostile_scalars, "rank": hostile_scalars,
                  "seed": hostile_scalars, "total_replaced_layers": hostile_scalars, "dtype": hostile_scalars}


@st.composite
def tinylora_files(draw) -> dict[str, bytes]:
    state = {"global_v": torch.linspace(-0.1, 0.1, TINY_U), "u_value": TINY_U, "rank": 2, "seed": 0}
    sidecar = dict(SIDECAR)
    form = draw(st.sampled_from(["edit", "edit", "edit", "sidecar", "bytes", "object"]))
    if form == "object":  # not a dict of fields at all
        return {"tiny_lora_v.pt": _torch_bytes(draw(st.one_of(json_values, tiny_vectors)))}
    for key in draw(st.lists(st.sampled_from(sorted(TINY_FIELDS)), max_size=3, unique=True)):
        if draw(st.integers(0, 4)) == 0 and key in state:
            del state[key]
        else:
            state[key] = draw(TINY_FIELDS[key])
    if isinstance(state.get("rank"), int):
        sidecar["rank"] = state["rank"]
    files = {"tiny_lora_v.pt": _torch_bytes(state)}
    if form == "sidecar" or draw(st.booleans()):
        for key in draw(st.lists(st.sampled_from(sorted(SIDECAR_VALUES)), max_size=2, unique=True)):
            sidecar[key] = draw(SIDECAR_VALUES[key])
        files["tiny_lora_v.json"] = json.dumps(sidecar).encode()
    if form == "bytes":
        raw = bytearray(files["tiny_lora_v.pt"])
        if draw(st.booleans()):
            raw = raw[:draw(st.integers(0, len(raw) - 1))]
        else:
            for _ in range(draw(st.integers(1, 4))):
                i = draw(st.integers(0, len(raw) - 1))
                raw[i] ^= draw(st.integers(1, 255))
        files["tiny_lora_v.pt"] = bytes(raw)
    return files


@SETTINGS
@given(tinylora_files())
def test_fuzz_tinylora_files(files):
    check("tiny_lora_v.pt", files, ["tinylora_restore"])


LISPE_CALLS = ["+", "-", "*", "/", "%", "<", ">", "=", "!=", "not", "min", "max", "sum", "abs", "floor", "ceiling",
               "round", "sqrt", "exp", "log", "list", "car", "cdr", "@", "@@", "reverse", "integers", "floats",
               "strings", "integer", "float", "string", "in", "nullp", "emptyp", "keys", "values", "iota", "join",
               "split", "trim", "typeof", "rho", "copy", "pop", "extend", "pushfirst", "set@", "chrbyte", "fill",
               "irange", "iota0", "nosuchfunction"]
lispe_leaves = st.sampled_from(["0", "1", "-2", "7", "12", "0.5", "-1.5", '"ab"', '""', "nil", "true", "false",
                                "'x", "(list 1 2 3)", '(list "a" 2)', "{a:1 b:2}", "x", "1e999", "0x1F"])


@st.composite
def lispe_expressions(draw, depth: int = 0) -> tuple[str, int]:
    """Integer arithmetic whose value the test knows."""
    if depth >= 3 or draw(st.integers(0, 2)) == 0:
        n = draw(st.integers(-5, 20))
        return str(n), n
    op = draw(st.sampled_from(["+", "-", "*", "if"]))
    if op == "if":
        (a, va), (b, vb) = draw(lispe_expressions(depth + 1)), draw(lispe_expressions(depth + 1))
        (x, vx), (y, vy) = draw(lispe_expressions(depth + 1)), draw(lispe_expressions(depth + 1))
        return f"(if (< {a} {b}) {x} {y})", vx if va < vb else vy
    args = [draw(lispe_expressions(depth + 1)) for _ in range(draw(st.integers(2, 3)))]
    value = args[0][1]
    for _, v in args[1:]:
        value = value + v if op == "+" else value - v if op == "-" else value * v
    return f"({op} {' '.join(a for a, _ in args)})", value


@st.composite
def lispe_calls(draw, depth: int = 0) -> str:
    if depth >= 3 or draw(st.integers(0, 2)) == 0:
        return draw(lispe_leaves)
    args = [draw(lispe_calls(depth + 1)) for _ in range(draw(st.integers(0, 3)))]
    return f"({draw(st.sampled_from(LISPE_CALLS))} {' '.join(args)})"


@st.composite
def lispe_scripts(draw) -> dict[str, bytes]:
    form = draw(st.sampled_from(["value", "value", "calls", "calls", "text", "nesting", "literal", "recursion",
                                 "bytes"]))
    if form == "value":
        text, value = draw(lispe_expressions())
        return {"script.lisp": f"(setq result {text})\n".encode(), "expected.json": json.dumps(value).encode()}
    if form == "calls":
        return {"script.lisp": "\n".join(draw(st.lists(lispe_calls(), min_size=1, max_size=3))).encode()}
    if form == "text":  # LispE's punctuation and a few letters: never the name of anything that acts outside
        return {"script.lisp": draw(st.text(alphabet="()'\"`;{}: .0123456789abx+-*\n\\\t", max_size=200)).encode()}
    if form == "nesting":
        n = draw(st.sampled_from([10, 500, 5000, 50000]))
        opening, closing = draw(st.sampled_from([("(", ")"), ("(+ 1 ", ")"), ("{a:", "}"), ("'", ""),
                                                 ("(list ", ")")]))
        close = draw(st.sampled_from([n, n - 1, n + 1]))
        return {"script.lisp": (opening * n + "1" + closing * max(close, 0)).encode()}
    if form == "literal":
        digits = draw(st.sampled_from([10, 4300, 4301, 20000]))
        literal = draw(st.sampled_from(["9" * digits, "-" + "9" * digits, "0x" + "f" * digits,
                                        "1" * digits + ".5", "1e" + "9" * min(digits, 50)]))
        return {"script.lisp": f"(setq result {literal})\n(+ result 1)\n".encode()}
    if form == "recursion":
        body = draw(st.sampled_from(["(f x)", "(+ 1 (f x))", "(list (f x))"]))
        return {"script.lisp": f"(defun f (x) {body})\n(f 1)\n".encode()}
    return {"script.lisp": draw(st.binary(max_size=100))}


@SETTINGS
@given(lispe_scripts())
def test_fuzz_lispe_scripts(files):
    check("LispE script", {**files, "__target__": b"script.lisp"}, ["lispe_run"])


def table(stats: dict) -> str:
    """The figures of a stats file: cases tried and outcomes per input kind and target, as Markdown."""
    cols = [("clean", "clean errors"), ("hang", "hangs"), ("signal", "signals"), ("wrong", "silent wrong results"),
            ("lost", "data lost"), ("escape", "other exceptions")]
    lines = ["| input kind → target | cases tried | succeeded, checked | " + " | ".join(c for _, c in cols) + " |",
             "|---" * (3 + len(cols)) + "|"]
    total = Counter()
    for kind, counts in stats["outcomes"].items():
        total.update(counts)
        lines.append(f"| {kind} | {sum(counts.values())} | {counts.get('ok', 0)} | "
                     + " | ".join(str(counts.get(k, 0)) for k, _ in cols) + " |")
    lines.append(f"| all | {sum(total.values())} | {total.get('ok', 0)} | "
                 + " | ".join(str(total.get(k, 0)) for k, _ in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(json.loads(Path(sys.argv[1]).read_text())))
