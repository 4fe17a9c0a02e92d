"""The quickstart and the main job run as users run them, in processes of their own, so that they cannot rot:
``examples/quickstart.py`` and ``examples/lora_training.hy`` on the tiny default model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(args: list[str], tmp_path: Path) -> str:
    env = {**os.environ, "LISPETORCH_CACHE": str(tmp_path / "cache"), "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def test_quickstart(tmp_path):
    out = run([sys.executable, str(ROOT / "examples" / "quickstart.py")], tmp_path)
    assert "reloaded logits identical: True" in out
    first, last = (float(v) for v in out.split("loss ")[-1].split(" in ")[0].split(" -> "))
    assert last < first  # it trained


def test_main_job_on_the_tiny_default_model(tmp_path, tiny_default_model):
    out_dir = tmp_path / "run"
    out = run([str(BIN / "lispetorch"), "run", str(ROOT / "examples" / "lora_training.hy"), str(tiny_default_model),
               str(out_dir)], tmp_path)
    assert "unmerged again: logits identical to before the merge" in out
    assert "epoch 2: train" in out
    last = out_dir / "checkpoints" / "lora_adapters_epoch_2.pt"  # the guide's names: a PEFT adapter directory
    assert (last / "adapter_model.safetensors").is_file() and (last / "adapter_config.json").is_file()
    assert not (tmp_path / "cache").exists()  # the model given was used, nothing was built
