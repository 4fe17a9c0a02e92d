"""Reading a YAML file with errors that name the file, and the line and column of a syntax error.

Every YAML file the project reads goes through :func:`load`. Anchors and aliases (``&defaults`` …
``<<: *defaults``) are allowed, but the document they make is bounded: one whose aliases, expanded, would make
more than :data:`MAX_NODES` values (the "billion laughs" of nested aliases), or an alias that contains itself, is
refused before anything is built from it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .validate import show

MAX_NODES = 100_000  # values in a document with its aliases expanded; a config has tens


def _expanded_size(node, memo: dict[int, int], open_nodes: set[int]) -> int:
    """The number of values ``node`` stands for with every alias expanded (shared nodes counted each time)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_nodes:
        raise _Recursive(node)
    open_nodes.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            size += _expanded_size(child, memo, open_nodes)
            if size > MAX_NODES:
                break
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            size += _expanded_size(k, memo, open_nodes) + _expanded_size(v, memo, open_nodes)
            if size > MAX_NODES:
                break
    open_nodes.discard(key)
    memo[key] = size
    return size


class _Recursive(Exception):
    def __init__(self, node) -> None:
        super().__init__(node)
        self.node = node


def load(path: str | Path, error: type[Exception] = ValueError):
    """The parsed content of ``path``; ``error`` (a ValueError subclass) for text that is not UTF-8 or not YAML
    (``config.yaml: not valid YAML at line 3, column 7: <problem>``), or whose aliases make it too large or
    recursive."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e})") from None
    try:
        loader = yaml.SafeLoader(text)  # reads the whole text first: a character YAML forbids is an error here
    except yaml.YAMLError as e:
        raise _syntax_error(e, path, error) from None
    try:
        node = _parse(loader, path, error)
        return None if node is None else _construct(loader, node, path, error)
    finally:
        loader.dispose()


def _syntax_error(e: yaml.YAMLError, path: Path, error: type[Exception]) -> Exception:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e)
    return error(f"{path}: not valid YAML{where}: {problem}")


def _parse(loader: yaml.SafeLoader, path: Path, error: type[Exception]):
    """The document's node graph (aliases as shared nodes), checked to be acyclic and of bounded size."""
    try:
        node = loader.get_single_node()
    except yaml.YAMLError as e:
        raise _syntax_error(e, path, error) from None
    except RecursionError:
        raise error(f"{path}: nested too deeply to be read as YAML") from None
    if node is None:
        return None
    try:
        size = _expanded_size(node, {}, set())
    except _Recursive as e:
        mark = e.node.start_mark
        raise error(f"{path}: the node at line {mark.line + 1}, column {mark.column + 1} contains itself through "
                    "an alias; a recursive YAML document is refused") from None
    if size > MAX_NODES:
        raise error(f"{path}: its aliases expand to more than {MAX_NODES:,} values; a document that large is "
                    "refused (nested aliases, a \"billion laughs\")")
    return node


def _construct(loader: yaml.SafeLoader, node, path: Path, error: type[Exception]):
    try:
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise _syntax_error(e, path, error) from None
    except RecursionError:
        raise error(f"{path}: nested too deeply to be read as YAML") from None
    except ValueError as e:  # a value the YAML types cannot hold, e.g. an integer of more than 4300 digits
        raise error(f"{path}: not valid YAML: {show(str(e))}") from None
