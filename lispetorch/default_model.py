"""The embedded default model: a small Llama pretrained on the Python standard library's own source code.

No model hub is needed. The first call to :func:`ensure` builds it (a byte-level BPE tokenizer trained with
``tokenizers``, then a few-million-parameter Llama trained from scratch on the same corpus) and saves it as an
ordinary Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load. Later calls reuse it.

Where it lives: ``$LISPETORCH_CACHE`` if set, else ``$XDG_CACHE_HOME/lispetorch``, else ``~/.cache/lispetorch``;
the model is the ``default-model/<name>`` directory below that. It is built in a temporary directory and
renamed into place, so a directory that exists is complete; one with missing files is rebuilt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import sys
import sysconfig
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch

from . import atomic
from .errors import DataError
from .schedule import make_scheduler

CACHE_ENV = "LISPETORCH_CACHE"
INFO_NAME = "lispetorch_default_model.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", INFO_NAME)
EOS, PAD = "<|endoftext|>", "<|pad|>"
# Llama 3's split pattern: the tokenizer has the layout of Llama 3's tokenizer.json (a Split pre-tokenizer with
# this regular expression, then byte-level), so tools that read Llama 3's file (LispE's tiktoken scripts) read it.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What to build: tokenizer and model sizes, and how long to pretrain."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 360
    warmup_steps: int = 36
    learning_rate: float = 3e-3
    corpus_chars: int = 6_000_000  # characters of source read (training and held-out)
    tokenizer_chars: int = 3_000_000  # of those, how many train the tokenizer
    eval_chunks: int = 64  # held-out sequences scored for the perplexity
    seed: int = 0


DEFAULT = ModelSpec("stdlib-llama-v1", vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                    intermediate_size=688)
# The same code path at a size that builds in seconds (tests).
TINY = ModelSpec("stdlib-llama-tiny", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=128, seq_len=64, batch_size=8, steps=30, warmup_steps=5, corpus_chars=400_000,
                 tokenizer_chars=200_000, eval_chunks=8)


def cache_root() -> Path:
    """``$LISPETORCH_CACHE``, else ``$XDG_CACHE_HOME/lispetorch``, else ``~/.cache/lispetorch``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lispetorch"


def model_dir(spec: ModelSpec = DEFAULT, root: str | os.PathLike | None = None) -> Path:
    """Where the model of ``spec`` lives (it may not be built yet)."""
    return Path(root if root is not None else cache_root()) / "default-model" / spec.name


def is_complete(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    return all((directory / name).is_file() for name in REQUIRED_FILES)


def info(directory: str | os.PathLike) -> dict:
    """The build record: spec, corpus sizes, parameter count, held-out perplexity, build time."""
    return json.loads((Path(directory) / INFO_NAME).read_text())


# --- corpus --------------------------------------------------------------------------------------------------
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_files() -> list[tuple[str, Path]]:
    """The standard library's ``.py`` files as (relative path, path), test suites and installed packages left
    out, in a fixed order that mixes packages (sorted by a hash of the relative path)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the Python standard library was not found at {root}")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                files.append((path.relative_to(root).as_posix(), path))
    if not files:
        raise FileNotFoundError(f"no .py files under {root}")
    return sorted(files, key=lambda item: (zlib.crc32(item[0].encode()), item[0]))


def is_held_out(relative_path: str) -> bool:
    """About one file in 25 is held out for the perplexity, chosen by a hash of its path."""
    return zlib.crc32(relative_path.encode()) % 25 == 0


def read_corpus(max_chars: int) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) from the standard library, about ``max_chars`` characters in all."""
    train, held_out, total = [], [], 0
    for rel, path in stdlib_files():
        if total >= max_chars:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        (held_out if is_held_out(rel) else train).append(text)
        total += len(text)
    if not held_out:
        held_out.append(train.pop())
    return train, held_out


# --- build ---------------------------------------------------------------------------------------------------
def _train_tokenizer(texts: list[str], spec: ModelSpec):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def limited() -> Iterator[str]:
        used = 0
        for text in texts:
            if used >= spec.tokenizer_chars:
                return
            yield text
            used += len(text)

    tok.train_from_iterator(limited(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=None, model_max_length=4 * spec.seq_len,
                                   clean_up_tokenization_spaces=False)


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def _model_config(spec: ModelSpec, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
                       intermediate_size=spec.intermediate_size,
                       num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                       num_key_value_heads=spec.num_kv_heads, max_position_embeddings=4 * spec.seq_len,
                       rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


@torch.no_grad()
def held_out_perplexity(model, tokens: torch.Tensor, seq_len: int, max_chunks: int) -> float:
    """exp(mean next-token loss) over up to ``max_chunks`` consecutive windows of ``seq_len`` tokens."""
    model.eval()
    n = min(max_chunks, max(1, (tokens.numel() - 1) // seq_len))
    total, count = 0.0, 0
    for i in range(n):
        chunk = tokens[i * seq_len:(i + 1) * seq_len + 1]
        if chunk.numel() < 2:
            break
        logits = model(input_ids=chunk[:-1].unsqueeze(0)).logits[0]
        total += torch.nn.functional.cross_entropy(logits.float(), chunk[1:], reduction="sum").item()
        count += chunk.numel() - 1
    return math.exp(total / count)


def build(directory: str | os.PathLike, spec: ModelSpec = DEFAULT, progress: bool = True) -> Path:
    """Builds the model of ``spec`` into ``directory`` (atomically: a temporary sibling, then a rename)."""
    from transformers import LlamaForCausalLM


    start = time.perf_counter()
    torch.manual_seed(spec.seed)
    train_texts, held_texts = read_corpus(spec.corpus_chars)
    tokenizer = _train_tokenizer(train_texts, spec)
    train_tokens = _token_stream(tokenizer, train_texts)
    held_tokens = _token_stream(tokenizer, held_texts)
    tokenizer_time = time.perf_counter() - start

    model = LlamaForCausalLM(_model_config(spec, tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01, betas=(0.9, 0.95))
    scheduler = make_scheduler(optimizer, "linear_warmup_cosine", {"warmup_steps": spec.warmup_steps,
                                                                   "total_steps": spec.steps, "min_lr": 0.0})
    n_windows = (train_tokens.numel() - 1) // spec.seq_len
    if n_windows < spec.batch_size:
        raise DataError(f"the corpus gives {n_windows} training windows of {spec.seq_len} tokens; "
                        f"{spec.batch_size} are needed for one batch")
    windows = train_tokens[: n_windows * spec.seq_len + 1]
    gen = torch.Generator().manual_seed(spec.seed)
    bar = _progress(spec.steps, f"building the default model {spec.name} (once)", progress)
    model.train()
    loss_value = float("nan")
    for _step in range(spec.steps):
        idx = torch.randint(0, n_windows, (spec.batch_size,), generator=gen) * spec.seq_len
        batch = torch.stack([windows[i:i + spec.seq_len + 1] for i in idx.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
        bar.update(1)
    bar.close()
    perplexity = held_out_perplexity(model, held_tokens, spec.seq_len, spec.eval_chunks)
    record = {
        "spec": dataclasses.asdict(spec),
        "parameters": n_params,
        "corpus": {"source": "Python standard library .py files", "python": sys.version.split()[0],
                   "train_documents": len(train_texts), "held_out_documents": len(held_texts),
                   "train_tokens": int(train_tokens.numel()), "held_out_tokens": int(held_tokens.numel())},
        "pretraining_tokens": spec.steps * spec.batch_size * spec.seq_len,
        "final_train_loss": loss_value,
        "held_out_perplexity": perplexity,
        "held_out_tokens_scored": min(spec.eval_chunks, (held_tokens.numel() - 1) // spec.seq_len) * spec.seq_len,
        "tokenizer_seconds": round(tokenizer_time, 1),
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    directory = Path(directory)
    with atomic.directory(directory) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "special_tokens_map.json").write_text(json.dumps(_special_tokens_map(), indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(record))
        (tmp / INFO_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return directory


def _special_tokens_map() -> dict:
    """``special_tokens_map.json`` as Llama 3 writes it: each token as a dictionary with its ``content``."""
    def entry(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {"bos_token": entry(EOS), "eos_token": entry(EOS), "pad_token": entry(PAD)}


def _model_card(record: dict) -> str:
    spec = record["spec"]
    return (f"# {spec['name']}\n\nA small Llama-architecture causal language model "
            f"({record['parameters']:,} parameters, "
            f"{spec['num_layers']} layers, hidden size {spec['hidden_size']}, vocabulary {spec['vocab_size']}) with a "
            f"byte-level BPE tokenizer, both trained from scratch on the Python {record['corpus']['python']} standard "
            f"library's own source files ({record['pretraining_tokens']:,} training tokens). Held-out perplexity "
            f"{record['held_out_perplexity']:.2f} on files the model never saw. Built by lispetorch as its default "
            f"base model for examples and tests.\n")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure(spec: ModelSpec = DEFAULT, root: str | os.PathLike | None = None, rebuild: bool = False,
           progress: bool = True) -> Path:
    """The directory of the default model, building it first if it is missing or incomplete.

    Safe to call from several processes at once: one builds, the others wait for it.
    """
    directory = model_dir(spec, root)
    if not rebuild and is_complete(directory):
        return directory
    with _lock(directory.parent):
        if rebuild or not is_complete(directory):
            build(directory, spec, progress=progress)
    return directory


# --- `lispetorch default-model` ------------------------------------------------------------------------------
def configure(parser) -> None:
    parser.add_argument("--rebuild", action="store_true", help="build again even if the model is in the cache")
    parser.add_argument("--tiny", action="store_true", help="the tiny variant used by the tests")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    spec = TINY if args.tiny else DEFAULT
    directory = ensure(spec, rebuild=args.rebuild, progress=not args.quiet)
    record = info(directory)
    print(directory)
    print(f"{record['parameters']:,} parameters, held-out perplexity {record['held_out_perplexity']:.2f}, "
          f"built in {record['build_seconds']} s")
    return 0
