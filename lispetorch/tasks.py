"""Tasks with metrics: classification by verbalizers and extractive QA scored as SQuAD v2, in the JSONL layouts
that ``datasets`` exports, and two tasks built from the standard library.

Layouts (one JSON object a line):

- single sentence (SST-2): ``{"sentence": ..., "label": 0}``
- sentence pair (MRPC, RTE): ``{"sentence1": ..., "sentence2": ..., "label": 1}``
- extractive QA with unanswerable questions (SQuAD v2): ``{"question": ..., "context": ...,
  "answers": {"text": [...], "answer_start": [...]}}`` (empty lists: no answer)

Classification asks the model for the log-probability of each label's word (its *verbalizer*) after a prompt and
predicts the likeliest; QA generates greedily after a prompt and scores the answer with SQuAD v2's exact match and
F1 (its normalisation; an unanswerable question is answered by :data:`NO_ANSWER`, which counts as the empty
answer).

    task = lt.tasks.load_task({"kind": "classification", "train_file": "sst2/train.jsonl",
                               "eval_file": "sst2/validation.jsonl", "verbalizers": {0: "negative", 1: "positive"}})
    task.evaluate(model, tokenizer)   # {"accuracy": ..., "f1": ...}
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import json
import os
import re
import string
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch

from . import atomic, default_model, validate
from .adapters import caching_while_generating
from .errors import ConfigError, DataError

KINDS = ("classification", "qa")
NO_ANSWER = "unanswerable"  # what the model is taught to answer to a question without an answer
SINGLE = "Sentence: {sentence}\nLabel:"
PAIR = "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nLabel:"
QUESTION = "Context: {context}\nQuestion: {question}\nAnswer:"
TASK_KEYS = ("kind", "name", "train_file", "eval_file", "verbalizers", "max_eval_examples", "max_new_tokens")


# --- records -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Record:
    """One example: its prompt fields, its gold label (classification) or answers (QA, empty: none), and where it
    was read (``file:line``)."""

    fields: dict
    label: str | None
    answers: tuple[str, ...]
    where: str


def _field(obj: dict, key: str, where: str, kind=str):
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r} (the record has {sorted(obj)})")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise DataError(f"{where}: field {key!r} must be {getattr(kind, '__name__', kind)}, got "
                        f"{type(value).__name__}")
    return value


def layout_of(obj: dict) -> str:
    """``"single"``, ``"pair"`` or ``"qa"`` by the record's fields."""
    if "question" in obj or "context" in obj or "answers" in obj:
        return "qa"
    if "sentence1" in obj or "sentence2" in obj:
        return "pair"
    return "single"


def parse_record(obj, where: str, verbalizers: Mapping[str, str] | None = None) -> Record:
    """A :class:`Record` from one JSON object, every field checked; errors start with ``where``."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    layout = layout_of(obj)
    if layout == "qa":
        question, context = _field(obj, "question", where), _field(obj, "context", where)
        answers = _field(obj, "answers", where, dict)
        texts, starts = answers.get("text"), answers.get("answer_start")
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise DataError(f"{where}: field 'answers' must hold lists 'text' and 'answer_start' of one length, got "
                            f"{answers!r}")
        for text, start in zip(texts, starts, strict=True):
            if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool):
                raise DataError(f"{where}: field 'answers': text {text!r} / answer_start {start!r} must be a string "
                                "and an integer")
            if context[start:start + len(text)] != text:
                raise DataError(f"{where}: field 'answers.answer_start' {start} does not point at the answer "
                                f"{text!r} in the context (it finds {context[start:start + len(text)]!r})")
        return Record({"question": question, "context": context}, None, tuple(texts), where)
    keys = ("sentence",) if layout == "single" else ("sentence1", "sentence2")
    fields = {k: _field(obj, k, where) for k in keys}
    if "label" not in obj:
        raise DataError(f"{where}: missing field 'label' (the record has {sorted(obj)})")
    label = obj["label"]
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise DataError(f"{where}: field 'label' must be an integer or a string, got {label!r}")
    label = str(label)
    if verbalizers is not None and label not in verbalizers:
        raise DataError(f"{where}: field 'label' is {obj['label']!r}, which is not one of the verbalizer labels "
                        f"{sorted(verbalizers)}")
    return Record(fields, label, (), where)


def read_records(path: str | os.PathLike, verbalizers: Mapping[str, str] | None = None) -> list[Record]:
    """The records of a JSONL file, in one layout (checked: a file mixing layouts is refused)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such task file")
    out, layouts = [], set()
    for where, obj in validate.jsonl(path, "task files are read from regular files only"):
        rec = parse_record(obj, where, verbalizers)
        layouts.add(layout_of(obj))
        if len(layouts) > 1:
            raise DataError(f"{where}: a {layout_of(obj)} record in a file of {layouts - {layout_of(obj)}} records")
        out.append(rec)
    if not out:
        raise DataError(f"{path}: holds no records")
    return out


# --- metrics -------------------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """SQuAD's token F1; when either side is empty (no answer), 1 if both are, else 0."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_v2(predictions: list[str], answers: list[tuple[str, ...]]) -> dict:
    """SQuAD v2 exact match and F1 (in %), overall and on the questions with (``HasAns``) and without
    (``NoAns``) an answer: each prediction is scored against its best gold answer; a question without answers has
    the empty answer as its gold."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    em, f1, has = [], [], []
    for pred, golds in zip(predictions, answers, strict=True):
        golds = [g for g in golds if normalize_answer(g)] or [""]
        em.append(max(exact_match(pred, g) for g in golds))
        f1.append(max(f1_score(pred, g) for g in golds))
        has.append(golds != [""])

    def pct(values):
        return 100.0 * sum(values) / len(values) if values else float("nan")

    out = {"exact": pct(em), "f1": pct(f1), "total": len(em)}
    for name, flag in (("HasAns", True), ("NoAns", False)):
        idx = [i for i, h in enumerate(has) if h == flag]
        if idx:
            out[f"{name}_exact"], out[f"{name}_f1"] = pct([em[i] for i in idx]), pct([f1[i] for i in idx])
            out[f"{name}_total"] = len(idx)
    return out


def classification_metrics(predictions: list[str], labels: list[str], positive: str | None = None) -> dict:
    """Accuracy and F1 (in %): with two labels the F1 of ``positive`` (default: the larger label, as GLUE's 1),
    with more the macro average; ``macro_f1`` always."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    classes = sorted(set(labels) | set(predictions))

    def f1_of(c):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels, strict=True))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels, strict=True))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels, strict=True))
        return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)

    accuracy = 100.0 * sum(p == y for p, y in zip(predictions, labels, strict=True)) / max(len(labels), 1)
    macro = 100.0 * sum(f1_of(c) for c in classes) / max(len(classes), 1)
    if positive is None and len(classes) == 2:
        positive = classes[-1]
    f1 = 100.0 * f1_of(positive) if positive is not None else macro
    return {"accuracy": accuracy, "f1": f1, "macro_f1": macro, "total": len(labels)}


# --- the task ------------------------------------------------------------------------------------------------
def _answer_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


@dataclasses.dataclass
class Task:
    """A task: its kind, its training and evaluation records, and (classification) its verbalizers
    (label → word)."""

    kind: str
    train: list[Record]
    eval: list[Record]
    verbalizers: dict[str, str] = dataclasses.field(default_factory=dict)
    max_eval_examples: int = 0  # 0: all
    max_new_tokens: int = 16
    name: str = ""

    @property
    def metric(self) -> str:
        """The headline metric: ``accuracy`` or ``f1`` (SQuAD v2 F1)."""
        return "accuracy" if self.kind == "classification" else "f1"

    def prompt(self, rec: Record) -> str:
        if self.kind == "qa":
            return QUESTION.format(**rec.fields)
        return (SINGLE if "sentence" in rec.fields else PAIR).format(**rec.fields)

    def target(self, rec: Record) -> str:
        """What the model learns to write after the prompt."""
        if self.kind == "qa":
            return " " + (rec.answers[0] if rec.answers else NO_ANSWER) + "\n"
        return " " + self.verbalizers[rec.label]

    def documents(self, split: str = "train"):
        """``(prompt, completion)`` pairs of a split (``train`` or ``eval``)."""
        records = self.train if split == "train" else self.eval
        return [(self.prompt(r), self.target(r), r.where) for r in records]

    def eval_records(self) -> list[Record]:
        return self.eval[: self.max_eval_examples] if self.max_eval_examples > 0 else self.eval

    @torch.no_grad()
    def predict(self, model, tokenizer, records: list[Record] | None = None) -> list[str]:
        """The model's answers: a label (classification) or the generated answer text (QA, the empty string for
        :data:`NO_ANSWER`)."""
        records = self.eval_records() if records is None else records
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        bos = tokenizer.bos_token_id
        prefix = [bos] if bos is not None and bos != tokenizer.eos_token_id else []
        try:
            if self.kind == "classification":
                return self._classify(model, tokenizer, records, prefix, device)
            return self._generate(model, tokenizer, records, prefix, device)
        finally:
            model.train(was_training)

    def _classify(self, model, tokenizer, records, prefix, device) -> list[str]:
        labels = list(self.verbalizers)
        words = [tokenizer(" " + self.verbalizers[label], add_special_tokens=False)["input_ids"] for label in labels]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out = []
        for rec in records:
            p = prefix + tokenizer(self.prompt(rec), add_special_tokens=False)["input_ids"]
            seqs = [p + w for w in words]
            length = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), length), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(seqs):
                ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
            logp = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
            scores = []
            for i, w in enumerate(words):
                pos = torch.arange(len(p) - 1, len(p) - 1 + len(w), device=device)
                scores.append(float(logp[i, pos, torch.tensor(w, device=device)].sum()))
            out.append(labels[max(range(len(labels)), key=scores.__getitem__)])
        return out

    def _generate(self, model, tokenizer, records, prefix, device) -> list[str]:
        eos = tokenizer.eos_token_id
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        stops = {eos, *newline[-1:]}
        out = []
        with caching_while_generating(model):  # DoRA layers keep their row scaling from one token to the next
            for rec in records:
                out.append(self._generate_one(model, tokenizer, rec, prefix, device, stops))
        return out

    def _generate_one(self, model, tokenizer, rec, prefix, device, stops) -> str:
        """The greedy answer to one record, up to ``max_new_tokens`` or a stop token."""
        step_ids = torch.tensor([prefix + tokenizer(self.prompt(rec), add_special_tokens=False)["input_ids"]],
                                device=device)
        new: list[int] = []
        past = None
        for _ in range(self.max_new_tokens):
            res = model(input_ids=step_ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            if nxt in stops:
                break
            new.append(nxt)
            step_ids = torch.tensor([[nxt]], device=device)
        text = _answer_line(tokenizer.decode(new, skip_special_tokens=True))
        return "" if normalize_answer(text) == NO_ANSWER else text

    def score(self, predictions: list[str], records: list[Record] | None = None) -> dict:
        records = self.eval_records() if records is None else records
        if self.kind == "classification":
            return classification_metrics(predictions, [r.label for r in records])
        return squad_v2(predictions, [r.answers for r in records])

    def evaluate(self, model, tokenizer, records: list[Record] | None = None) -> dict:
        """The task metrics of ``model`` on the evaluation split (or ``records``)."""
        records = self.eval_records() if records is None else records
        return self.score(self.predict(model, tokenizer, records), records)


def _verbalizers(value, source: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not value or not all(isinstance(v, str) and v.strip() for v in value.values()):
        raise ConfigError(f"{source}: 'task.verbalizers' must map each label to a word, got {value!r}")
    return {str(k): v.strip() for k, v in value.items()}


def load_task(spec: Mapping | str, base: str | os.PathLike | None = None, source: str = "config") -> Task:
    """A :class:`Task` from a config mapping (``kind``, ``train_file``, ``eval_file``, ``verbalizers``,
    ``max_eval_examples``, ``max_new_tokens``) or the name of a shipped task (:data:`SHIPPED`), also as
    ``{"name": ...}``. Relative files are relative to ``base``.

    Raises:
        ConfigError: an unknown key, kind or shipped task, missing files or verbalizers. DataError: a bad record
            (``file:line`` and the field).
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{source}: 'task' must be a mapping or the name of a shipped task, got {spec!r}")
    for key in spec:
        if key not in TASK_KEYS:
            raise ConfigError(f"{source}: unknown key 'task.{key}'; the keys are {', '.join(TASK_KEYS)}")
    spec = dict(spec)
    if "name" in spec:
        name = spec["name"]
        if name not in SHIPPED:
            raise ConfigError(f"{source}: 'task.name' {name!r} is not a shipped task; choose one of "
                              f"{', '.join(SHIPPED)}")
        if "train_file" not in spec or "eval_file" not in spec:  # else built already (build_shipped's spec)
            spec = {**build_shipped(name), **spec}
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{source}: 'task.kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    for key in ("train_file", "eval_file"):
        if not isinstance(spec.get(key), (str, os.PathLike)):
            raise ConfigError(f"{source}: 'task.{key}' must be a path, got {spec.get(key)!r}")
    for key, default in (("max_eval_examples", 0), ("max_new_tokens", 16)):
        v = spec.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{source}: 'task.{key}' must be an integer ≥ 0, got {v!r}")
    verbalizers = None
    if kind == "classification":
        verbalizers = _verbalizers(spec.get("verbalizers"), source)
    root = Path(base) if base is not None else Path.cwd()
    files = [Path(spec[k]) if Path(spec[k]).is_absolute() else root / spec[k] for k in ("train_file", "eval_file")]
    train, ev = (read_records(f, verbalizers) for f in files)
    for recs, f in ((train, files[0]), (ev, files[1])):
        if (kind == "qa") != ("question" in recs[0].fields):
            raise DataError(f"{f}:1: a {'QA' if 'question' in recs[0].fields else 'classification'} record in a "
                            f"{kind} task")
    return Task(kind, train, ev, verbalizers or {}, spec.get("max_eval_examples", 0), spec.get("max_new_tokens", 16),
                str(spec.get("name", files[0].parent.name)))


# --- tasks built from the standard library -------------------------------------------------------------------
def _held_out(relative_path: str) -> bool:
    """The evaluation split: about one source file in five, by a hash of its path (so no file is in both)."""
    return zlib.crc32(b"task:" + relative_path.encode()) % 5 == 0


def _definitions(limit_files: int):
    """(relative path, kind "function"/"class", name, first parameter or None, first docstring line) of the
    public top-level definitions of the standard library's files, in a fixed order."""
    for rel, path in default_model.stdlib_files()[:limit_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            line = doc.strip().split("\n", 1)[0].strip() if doc else ""
            if not (10 <= len(line) <= 120):
                continue
            first = None
            if isinstance(node, ast.FunctionDef):
                args = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                first = args[0] if args else None
            yield rel, "class" if isinstance(node, ast.ClassDef) else "function", node.name, first, line


def _stdlib_kind(limit_files: int) -> tuple[list[dict], list[dict]]:
    """SST-2 layout: a docstring's first line; label 1 when it documents a class, 0 a function (verbalized as the
    keywords ``class`` and ``def``). Balanced."""
    train, ev = {0: [], 1: []}, {0: [], 1: []}
    for rel, kind, _name, _first, line in _definitions(limit_files):
        label = int(kind == "class")
        (ev if _held_out(rel) else train)[label].append({"sentence": line, "label": label})
    out = []
    for split in (train, ev):
        n = min(len(split[0]), len(split[1]))
        rows = [r for pair in zip(split[0][:n], split[1][:n], strict=True) for r in pair]
        out.append(rows)
    return out[0], out[1]


def _stdlib_signature(limit_files: int) -> tuple[list[dict], list[dict]]:
    """SQuAD v2 layout: the context is a function's signature and docstring line; the question asks for its first
    parameter (no answer when it has none) or its name."""
    train, ev = [], []
    for i, (rel, kind, name, first, line) in enumerate(_definitions(limit_files)):
        if kind != "function":
            continue
        context = f"def {name}({first or ''}): {line}"
        if i % 2:
            q, answer, start = "What is the name of the function?", name, 4
        else:
            q = "What is the first parameter of the function?"
            answer, start = (first, 5 + len(name)) if first else (None, None)
        rec = {"question": q, "context": context,
               "answers": {"text": [answer] if answer else [], "answer_start": [start] if answer else []}}
        (ev if _held_out(rel) else train).append(rec)
    return train, ev


SHIPPED = {
    "stdlib-kind": ("classification", _stdlib_kind, {"0": "def", "1": "class"},
                    "does a docstring's first line document a class or a function (SST-2 layout)"),
    "stdlib-signature": ("qa", _stdlib_signature, None,
                         "a function's name or first parameter from its signature, unanswerable when it has none "
                         "(SQuAD v2 layout)"),
}
SHIPPED_FILES = 400  # standard library files read


def build_shipped(name: str, root: str | os.PathLike | None = None) -> dict:
    """Writes the shipped task ``name`` (once) as ``train.jsonl`` and ``eval.jsonl`` under
    ``<cache>/tasks/<name>`` and returns its task config. Deterministic: the same Python gives the same files."""
    kind, make, verbalizers, _ = SHIPPED[name]
    directory = Path(root if root is not None else default_model.cache_root()) / "tasks" / name
    files = {"train": directory / "train.jsonl", "eval": directory / "eval.jsonl"}
    if not all(f.is_file() for f in files.values()):
        train, ev = make(SHIPPED_FILES)
        directory.mkdir(parents=True, exist_ok=True)
        for split, rows in (("train", train), ("eval", ev)):
            atomic.write_text(files[split], "".join(json.dumps(r) + "\n" for r in rows))
    spec = {"kind": kind, "train_file": str(files["train"]), "eval_file": str(files["eval"]), "name": name}
    if verbalizers:
        spec["verbalizers"] = dict(verbalizers)
    return spec
