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
import dataclasses
import hashlib
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
                                                "options": json_values}),
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
