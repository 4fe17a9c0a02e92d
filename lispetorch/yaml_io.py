"""Reading a YAML file with errors that name the file, and the line and column of a syntax error."""

from __future__ import annotations

from pathlib import Path


def load(path: str | Path, error: type[Exception] = ValueError):
    """The parsed content of ``path``; ``error`` (a ValueError subclass) for text that is not UTF-8 or not YAML:
    ``config.yaml: not valid YAML at line 3, column 7: <problem>``."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise error(f"{path}: not valid YAML{where}: {problem}") from None
