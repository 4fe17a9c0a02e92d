"""LispE's ``lispe_tiktoken`` library on the ``tiktoken`` package: byte-level BPE from a ``tokenizer.json``.

``(use 'lispe_tiktoken)`` puts these primitives in a LispE script's scope (Hy scripts have them from the start):

- ``(tiktoken_create vocab added_tokens pattern)``: a tokenizer from a ``tokenizer.json``'s ``model.vocab``
  (token text in the byte-level alphabet → id; the ids are the merge ranks), its ``added_tokens`` (a list of
  dictionaries with ``content`` and ``id``: the special tokens) and the split pattern of its ``Split``
  pre-tokenizer;
- ``(tiktoken_encode tok text)``: the ids of ``text`` (special tokens written in the text are recognised);
- ``(tiktoken_special_encode tok text)``: the id of one special token, -1 when there is none;
- ``(tiktoken_decode tok ids)``: the text of ``ids``; ``(tiktoken_decode_bytes tok ids)``: its bytes as a list
  of integers (0-255);
- ``(tiktoken_vocab_size tok)``: ordinary tokens plus special tokens.
"""

from __future__ import annotations

import tiktoken

from .checks import describe, fail, primitive


def byte_alphabet() -> dict[str, int]:
    """The byte-level alphabet of GPT-2-style tokenizers: one printable character per byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_ALPHABET = byte_alphabet()


class Tiktoken:
    """A ``tiktoken_`` object: the encoding and its special tokens."""

    def __init__(self, encoding: tiktoken.Encoding, special: dict[str, int], size: int):
        self.encoding = encoding
        self.special = special
        self.size = size

    def __repr__(self) -> str:
        return f"<tiktoken_ {self.size} tokens>"


def _token_bytes(token: str) -> bytes:
    try:
        return bytes(_ALPHABET[c] for c in token)
    except KeyError as err:
        fail("tiktoken_create", f"vocab token {token!r} is not written in the byte-level alphabet "
                                f"(character {err.args[0]!r}); a byte-level BPE tokenizer.json is needed")


def _tok(name: str, value) -> Tiktoken:
    if not isinstance(value, Tiktoken):
        fail(name, f"expects a tiktoken_ object (from tiktoken_create), got {describe(value)}")
    return value


def _ids(name: str, ids) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        fail(name, f"expects a list of integer ids, got {describe(ids)}")
    return list(ids)


@primitive
def tiktoken_create(vocab, special_tokens, pattern):
    """A byte-level BPE tokenizer from a vocabulary, its special tokens and its split pattern."""
    if not isinstance(vocab, dict) or not vocab:
        fail("tiktoken_create", f"vocab must be a dictionary of token → id, got {describe(vocab)}")
    special: dict[str, int] = {}
    for i, entry in enumerate(special_tokens or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) \
                or not isinstance(entry.get("id"), int):
            fail("tiktoken_create", f"special token {i} must be a dictionary with content and id, got "
                                    f"{describe(entry)}")
        special[entry["content"]] = entry["id"]
    if not isinstance(pattern, str) or not pattern:
        fail("tiktoken_create", f"pattern must be a regular expression, got {describe(pattern)}")
    special_ids = set(special.values())
    ranks: dict[bytes, int] = {}
    for token, rank in vocab.items():
        if not isinstance(rank, int) or isinstance(rank, bool):
            fail("tiktoken_create", f"vocab id of {token!r} must be an integer, got {describe(rank)}")
        if rank in special_ids:  # a special token also listed in the vocabulary: it stays special
            continue
        data = _token_bytes(token)
        if data in ranks:
            fail("tiktoken_create", f"vocab tokens {token!r} and id {ranks[data]} are the same bytes")
        ranks[data] = rank
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        fail("tiktoken_create", f"the vocabulary lacks {len(missing)} of the 256 single bytes (first: {missing[0]}); "
                                f"a byte-level BPE vocabulary has them all")
    try:
        encoding = tiktoken.Encoding("lispe_tiktoken", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
    except ValueError as err:
        fail("tiktoken_create", f"the tokenizer cannot be built: {err}")
    return Tiktoken(encoding, special, len(ranks) + len(special))


@primitive
def tiktoken_encode(tokenizer, text):
    """The ids of ``text``; special tokens written in it are encoded as themselves."""
    tok = _tok("tiktoken_encode", tokenizer)
    if not isinstance(text, str):
        fail("tiktoken_encode", f"text must be a string, got {describe(text)}")
    return tok.encoding.encode(text, allowed_special="all")


@primitive
def tiktoken_special_encode(tokenizer, text):
    """The id of the special token ``text``, or -1."""
    return _tok("tiktoken_special_encode", tokenizer).special.get(text, -1)


@primitive
def tiktoken_decode(tokenizer, ids):
    """The text of ``ids`` (bytes that are not valid UTF-8 become U+FFFD)."""
    return _tok("tiktoken_decode", tokenizer).encoding.decode(_ids("tiktoken_decode", ids))


@primitive
def tiktoken_decode_bytes(tokenizer, ids):
    """The bytes of ``ids``, as a list of integers."""
    return list(_tok("tiktoken_decode_bytes", tokenizer).encoding.decode_bytes(_ids("tiktoken_decode_bytes", ids)))


@primitive
def tiktoken_vocab_size(tokenizer):
    """Ordinary tokens plus special tokens."""
    return _tok("tiktoken_vocab_size", tokenizer).size


__all__ = ["tiktoken_create", "tiktoken_encode", "tiktoken_special_encode", "tiktoken_decode",
           "tiktoken_decode_bytes", "tiktoken_vocab_size"]
PRIMITIVES = {f.__name__: f for f in (tiktoken_create, tiktoken_encode, tiktoken_special_encode, tiktoken_decode,
                                      tiktoken_decode_bytes, tiktoken_vocab_size)}
