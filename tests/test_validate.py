"""``lispetorch validate``: the pass/fail table on tiny models, through the API and the command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lispetorch import checkup as validate

NAMES = ["adapters applied", "trainable share", "base frozen", "loss decreases", "save/load round trip",
         "merge equivalence", "PEFT loads the adapter"]


@pytest.mark.parametrize("arch,layers", [("llama", "4 layers (q_proj, v_proj)"), ("gpt2", "2 layers (c_attn)")])
def test_every_check_passes_on_a_sound_setup(model_dirs, arch, layers):
    checks = validate.run_checks(model_dirs[arch], rank=4)
    assert [c.name for c in checks] == NAMES
    assert all(c.passed for c in checks), validate.table(checks)
    assert checks[0].detail == layers  # the "standard" preset: q and v, GPT-2's fused c_attn
    assert "skipped" not in checks[-1].detail  # peft is installed in the tests


def test_table_and_command(model_dirs):
    text = validate.table([validate.Check("merge equivalence", False, "max |logit difference| 1.00e+00")])
    assert "FAIL" in text and "0/1 checks passed" in text
    proc = subprocess.run([sys.executable, "-m", "lispetorch.cli", "validate", str(model_dirs["qwen2"]), "--rank", "2",
                           "--targets", "extended"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "7/7 checks passed" in proc.stdout and "8 layers" in proc.stdout
