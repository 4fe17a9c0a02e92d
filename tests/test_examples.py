"""The Python examples run end to end (on the tiny default model, few steps)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_combine_tasks_example(tiny_default_model, tmp_path, capsys):
    example = load_example("combine_tasks")
    assert example.main(["--steps", "2", "--seq", "128", "--model", str(tiny_default_model),
                         "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "optimization_results.json").read_text())
    weights = result["weights"]
    assert set(weights) == {"singleline", "multiline", "annotated"}
    assert abs(sum(weights.values()) - 1) < 1e-9 and min(weights.values()) >= 0
    assert (tmp_path / "combined" / "adapter_model.safetensors").is_file()
    assert "| combined |" in out and "| concatenationTrained |" in out
