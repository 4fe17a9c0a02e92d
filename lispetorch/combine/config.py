"""The checkpoint list: a YAML file in the optimizer's format, or a mapping name → path.

    checkpoints:
      annotated:
        path: "../runs/annotated/checkpoint-40000"     # relative paths are relative to this file
        description: "Annotated training data checkpoint"
      concatenationTrained:
        path: "../runs/concatenationTrained/checkpoint-40000"
    settings:
      verify_paths: true     # check every path before reading anything, and say which file is missing
      verbose_paths: true    # print what was checked
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .. import atomic, yaml_io
from ..errors import ConfigError
from ..peft_format import CONFIG_NAME, WEIGHTS_NAME

DEFAULT_CONFIG = """\
# LoRA checkpoints to combine. Relative paths are relative to this file.
# The target (the checkpoint to approximate) is named on the command line: --target NAME.
checkpoints:
  annotated:
    path: "checkpoints/annotated/checkpoint-40000"
    description: "Annotated training data checkpoint"

  multiline:
    path: "checkpoints/multiline/checkpoint-40000"
    description: "Multiline training data checkpoint"

  singleline:
    path: "checkpoints/singleline/checkpoint-40000"
    description: "Singleline training data checkpoint"

  concatenationTrained:
    path: "checkpoints/concatenationTrained/checkpoint-40000"
    description: "Concatenation trained checkpoint (target for optimization)"

settings:
  verify_paths: true
  verbose_paths: true
"""


@dataclass
class CheckpointEntry:
    """One checkpoint of the list: its name, its adapter directory and a free-text description."""

    name: str
    path: Path
    description: str = ""


@dataclass
class CombineConfig:
    """The parsed checkpoint list, in the file's order, with its settings."""

    checkpoints: dict[str, CheckpointEntry]
    verify_paths: bool = True
    verbose_paths: bool = False
    source: str = "<mapping>"

    @property
    def names(self) -> list[str]:
        return list(self.checkpoints)

    def select(self, names: Iterable[str] | None) -> list[str]:
        """The given names (checked against the list), or all names in the list's order when None."""
        if names is None:
            return self.names
        names = list(names)
        unknown = [n for n in names if n not in self.checkpoints]
        if unknown:
            raise ConfigError(f"checkpoint(s) {', '.join(map(repr, unknown))} are not in {self.source} "
                              f"(it lists {', '.join(self.names)})")
        if len(set(names)) != len(names):
            raise ConfigError(f"checkpoint names given more than once: {names}")
        return names


def _flag(value, key: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: settings.{key} must be true or false, got {value!r}")
    return value


def load_config(config: str | os.PathLike | Mapping | CombineConfig) -> CombineConfig:
    """Reads a checkpoint list: a YAML path, a mapping ``name → path`` (or ``name → {path, description}``).

    Raises:
        FileNotFoundError: the YAML file does not exist.
        ValueError: YAML that does not parse (with its line and column) or a list that is malformed (named).
    """
    if isinstance(config, CombineConfig):
        return config
    if isinstance(config, Mapping):
        data = {"checkpoints": dict(config)} if "checkpoints" not in config else dict(config)
        return _parse(data, "<mapping>", Path.cwd())
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"config must be a YAML path or a mapping name -> checkpoint path, got "
                        f"{type(config).__name__}")
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint list {path} does not exist (write one with "
                                "`lispetorch combine init-config`)")
    data = yaml_io.load(path, ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'checkpoints' key, got {type(data).__name__}")
    return _parse(data, str(path), path.parent)


def _parse(data: dict, source: str, base: Path) -> CombineConfig:
    entries = data.get("checkpoints")
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"{source}: 'checkpoints' must be a non-empty mapping name -> {{path, description}}")
    unknown = sorted(set(data) - {"checkpoints", "settings"}, key=str)
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; a checkpoint list has 'checkpoints' and "
                          "'settings'")
    checkpoints: dict[str, CheckpointEntry] = {}
    for name, entry in entries.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{source}: checkpoint names must be non-empty strings, got {name!r}")
        if isinstance(entry, (str, os.PathLike)):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), (str, os.PathLike)) \
                or not str(entry["path"]):
            raise ConfigError(f"{source}: checkpoint {name!r} needs a 'path' (a string), got {entry!r}")
        path = Path(os.path.expanduser(str(entry["path"])))
        if not path.is_absolute():
            path = base / path
        description = entry.get("description") or ""
        checkpoints[name] = CheckpointEntry(name, path, str(description))
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{source}: 'settings' must be a mapping, got {settings!r}")
    unknown = sorted(set(settings) - {"verify_paths", "verbose_paths"}, key=str)
    if unknown:
        raise ConfigError(f"{source}: unknown setting {unknown[0]!r}; the settings are 'verify_paths' and "
                          "'verbose_paths'")
    return CombineConfig(
        checkpoints,
        verify_paths=_flag(settings.get("verify_paths", True), "verify_paths", source),
        verbose_paths=_flag(settings.get("verbose_paths", False), "verbose_paths", source),
        source=source,
    )


def verify_paths(config: CombineConfig, names: Iterable[str], verbose: bool = False, log=print) -> None:
    """Checks that every named checkpoint is a directory holding the two adapter files.

    Raises:
        FileNotFoundError: one message listing each checkpoint that fails and why (which file is missing).
    """
    problems = []
    for name in names:
        path = config.checkpoints[name].path
        if not path.exists():
            problems.append(f"{name}: {path} does not exist")
        elif not path.is_dir():
            problems.append(f"{name}: {path} is not a directory")
        else:
            missing = [f for f in (CONFIG_NAME, WEIGHTS_NAME) if not (path / f).is_file()]
            if missing:
                problems.append(f"{name}: {path} lacks {' and '.join(missing)}")
            elif verbose:
                log(f"  ok  {name}: {path} ({CONFIG_NAME}, {WEIGHTS_NAME})")
        if verbose and problems and problems[-1].startswith(f"{name}:"):
            log(f"  BAD {problems[-1]}")
    if problems:
        raise FileNotFoundError(f"{config.source}: checkpoint paths that cannot be used:\n  " + "\n  ".join(problems))


def write_default_config(path: str | os.PathLike, checkpoints: Mapping[str, str] | None = None,
                         force: bool = False) -> Path:
    """Writes a checkpoint list in the optimizer's format (atomically); refuses to overwrite unless ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite it")
    if checkpoints:
        import yaml

        body = {"checkpoints": {n: {"path": str(p), "description": ""} for n, p in checkpoints.items()},
                "settings": {"verify_paths": True, "verbose_paths": True}}
        text = "# LoRA checkpoints to combine. Relative paths are relative to this file.\n" + \
            yaml.safe_dump(body, sort_keys=False)
    else:
        text = DEFAULT_CONFIG
    atomic.write_text(path, text)
    return path
