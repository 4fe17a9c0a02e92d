"""Training data: text files, directories, and JSON/JSONL records, tokenized with the model's own tokenizer.

Records are ``{"text": ...}`` or ``{"instruction": ..., "response": ...}`` (with an optional ``"input"``), as in
the LispeTorch guide's dataset. Instruction records become a prompt in the usual instruction format followed by
the response; with ``mask_prompt`` the prompt tokens get label -100 and only the response is learned.
Examples are packed into full ``max_seq_length`` windows (``packing``) or truncated and padded per batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .. import validate
from ..errors import DataError
from ..validate import show

IGNORE_INDEX = -100
RECORD_SUFFIXES = {".json", ".jsonl"}
# What a data directory contributes: text and source files, and records.
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".hy", ".lisp", ".lsp", ".c", ".h", ".cc", ".cpp", ".hpp", ".js",
                 ".ts", ".java", ".go", ".rs", ".rb", ".sh", ".toml", ".yaml", ".yml", ".csv", ".html", ".tex"}

PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"



@dataclasses.dataclass(frozen=True)
class Document:
    """One training text: ``prompt`` (empty for plain text) followed by ``completion``."""

    prompt: str
    completion: str
    source: str


@dataclasses.dataclass
class Example:
    input_ids: torch.Tensor  # (L,) int64
    labels: torch.Tensor  # (L,) int64, IGNORE_INDEX where nothing is learned


# --- reading -------------------------------------------------------------------------------------------------
def record_document(obj, where: str) -> Document | None:
    """The Document of a JSON record (``text``, or ``instruction``/``response`` with an optional ``input``);
    None for an empty text. ``where`` (file and line) starts every error message."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: 'text' must be a string, got {type(obj['text']).__name__}")
        return Document("", obj["text"], where) if obj["text"].strip() else None
    missing = [k for k in ("instruction", "response") if k not in obj]
    if missing:
        raise DataError(f"{where}: a record needs 'text', or 'instruction' and 'response'; it lacks "
                        f"{' and '.join(repr(k) for k in missing)} (keys: {show(sorted(obj))})")
    for key in ("instruction", "response", "input"):
        if key in obj and not isinstance(obj[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    template = PROMPT_WITH_INPUT if obj.get("input", "").strip() else PROMPT
    return Document(template.format(instruction=obj["instruction"], input=obj.get("input", "")), obj["response"],
                    where)


def _not_regular(path: Path) -> str | None:
    """None for a regular file (or a link to one); else what ``path`` is (``"a FIFO"``, ``"a broken link"``…)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return "a broken link" if os.path.islink(path) else f"unreadable ({e.strerror})"
    return None if stat.S_ISREG(mode) else validate.file_kind(mode)


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    for where, obj in validate.jsonl(path, "training data is read from regular files only"):
        doc = record_document(obj, where)
        if doc is not None:
            docs.append(doc)
    return docs


def _read_json(path: Path) -> list[Document]:
    with validate.open_regular(path, "training data is read from regular files only") as fh:
        text = fh.read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    records = obj if isinstance(obj, list) else [obj]
    docs = [record_document(rec, f"{path}[{i}]") for i, rec in enumerate(records)]
    return [d for d in docs if d is not None]


def _read_file(path: Path) -> list[Document]:
    try:
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        if path.suffix == ".json":
            return _read_json(path)
        with validate.open_regular(path, "training data is read from regular files only") as fh:
            text = fh.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [Document("", text, str(path))] if text.strip() else []


def data_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The files a ``data`` setting names: files as given, directories walked (sorted, hidden entries skipped)
    for text, source and record files.

    Only regular files (or links to them) are read: in a directory, a FIFO, socket, device or broken link is
    skipped with a warning naming it; named directly, reading it is a :class:`DataError`."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
                for f in sorted(filenames):
                    if f.startswith(".") or Path(f).suffix.lower() not in TEXT_SUFFIXES | RECORD_SUFFIXES:
                        continue
                    what = _not_regular(Path(dirpath) / f)
                    if what is None:
                        found.append(Path(dirpath) / f)
                    else:
                        warnings.warn(f"{Path(dirpath) / f}: skipped, {what} (training data is read from regular "
                                      "files only)", stacklevel=2)
            if not found:
                raise DataError(f"{p}: the directory holds no text or record files "
                                f"({', '.join(sorted(TEXT_SUFFIXES | RECORD_SUFFIXES))})")
            files += found
        elif os.path.lexists(p):  # a FIFO, a device, a broken link: the reader names what it is
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    return files


def read_documents(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Document]:
    """Every document under ``paths``; raises :class:`DataError` on a malformed file or when there is no text."""
    files = data_files(paths)
    docs = [doc for f in files for doc in _read_file(f)]
    if not docs:
        raise DataError(f"no training text in {', '.join(str(f) for f in files) or 'the data setting'}: "
                        "every file is empty")
    return docs


# --- tokenizing ----------------------------------------------------------------------------------------------
def _special_ids(tokenizer) -> tuple[list[int], int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no end-of-sequence token; set tokenizer.eos_token")
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None and bos != eos else []), eos


def pad_id(tokenizer) -> int:
    """The tokenizer's padding id, or its end-of-sequence id when it has none (padding is masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def tokenize(tokenizer, docs: Iterable[Document], mask_prompt: bool = False) -> list[Example]:
    """One example per document: ``[bos] prompt completion eos``, labels masked on the prompt if asked."""
    docs = list(docs)
    prefix, eos = _special_ids(tokenizer)
    prompts = tokenizer([d.prompt for d in docs], add_special_tokens=False, verbose=False)["input_ids"]
    completions = tokenizer([d.completion for d in docs], add_special_tokens=False, verbose=False)["input_ids"]
    out = []
    for p, c in zip(prompts, completions, strict=True):
        ids = torch.tensor(prefix + p + c + [eos], dtype=torch.long)
        labels = ids.clone()
        if mask_prompt:
            labels[: len(prefix) + len(p)] = IGNORE_INDEX
        out.append(Example(ids, labels))
    return out


def pack(examples: Sequence[Example], seq_len: int) -> list[Example]:
    """Concatenates the examples and cuts the stream into windows of ``seq_len`` tokens (the last may be
    shorter; one of fewer than 2 tokens is dropped, having nothing to predict)."""
    if not examples:
        return []
    ids = torch.cat([e.input_ids for e in examples])
    labels = torch.cat([e.labels for e in examples])
    return [Example(ids[i:i + seq_len], labels[i:i + seq_len]) for i in range(0, ids.numel(), seq_len)
            if ids[i:i + seq_len].numel() >= 2]


def truncate(examples: Sequence[Example], seq_len: int) -> list[Example]:
    return [Example(e.input_ids[:seq_len], e.labels[:seq_len]) for e in examples]


def collate(examples: Sequence[Example], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` (0 on padding) and ``labels`` (-100 on padding)."""
    length = max(e.input_ids.numel() for e in examples)
    n = len(examples)
    input_ids = torch.full((n, length), pad, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, e in enumerate(examples):
        k = e.input_ids.numel()
        input_ids[i, :k], labels[i, :k], mask[i, :k] = e.input_ids, e.labels, 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many next-token targets a batch has (labels shifted by one, -100 excluded)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# --- the data set --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dataset:
    train: list[Example]
    validation: list[Example]
    documents: int

    def epoch_order(self, seed: int, epoch: int) -> list[int]:
        """The order of the training examples in ``epoch``: a fixed permutation of (seed, epoch)."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train), generator=gen).tolist()

    def micro_batches(self, seed: int, epoch: int, batch_size: int) -> list[list[int]]:
        """The epoch's order cut into batches of ``batch_size`` example indices (the last may be smaller)."""
        order = self.epoch_order(seed, epoch)
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def split_examples(examples: list[Example], validation_split: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded, shuffled split; a positive ``validation_split`` holds out at least one example."""
    n = len(examples)
    if not 0 <= validation_split < 1:
        raise DataError(f"validation_split must be in [0, 1), got {validation_split}")
    n_val = 0
    if validation_split > 0 and n >= 2:
        n_val = min(max(1, round(n * validation_split)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [examples[i] for i in perm[n_val:]], [examples[i] for i in sorted(perm[:n_val])]


def load_dataset(paths, tokenizer, max_seq_length: int, packing: bool = True, mask_prompt: bool = False,
                 validation_split: float = 0.1, seed: int = 0, documents: list[Document] | None = None) -> Dataset:
    """Reads, tokenizes, packs (or truncates) and splits; raises :class:`DataError` naming what is wrong."""
    docs = documents if documents is not None else read_documents(paths)
    examples = tokenize(tokenizer, docs, mask_prompt=mask_prompt)
    examples = pack(examples, max_seq_length) if packing else truncate(examples, max_seq_length)
    examples = [e for e in examples if (e.labels[1:] != IGNORE_INDEX).any()]
    if not examples:
        raise DataError("the data set has no tokens to learn from (every example is empty or fully masked)")
    train, validation = split_examples(examples, validation_split, seed)
    return Dataset(train, validation, len(docs))
