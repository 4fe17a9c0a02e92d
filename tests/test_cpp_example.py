"""The C++ example builds against the installed core library (no Python at run time) and runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpp_example_builds_and_runs():
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.fail("cmake is needed to build the C++ example")
    prefix = subprocess.run([sys.executable, "-m", "lispetorch.cmake_prefix_path"], check=True,
                            capture_output=True, text=True).stdout.strip()
    build = ROOT / "build" / "examples-cpp"  # persistent: rebuilds are incremental
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run([cmake, "-S", str(ROOT / "examples" / "cpp"), "-B", str(build), *generator,
                    f"-DCMAKE_PREFIX_PATH={prefix}"], check=True, capture_output=True, text=True)
    done = subprocess.run([cmake, "--build", str(build)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    run = subprocess.run([str(build / "lora_train")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "adapted 3 linear layers, 6 trainable tensors" in out
    assert "unmerge restores the weights bit for bit: yes" in out
    assert "bad input: input has 5 features" in out
    assert out.rstrip().endswith("ok")
