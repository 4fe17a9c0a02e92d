"""Prints the CMAKE_PREFIX_PATH entries a C++ program needs to find the lispetorch core library and Torch.

    cmake -S examples/cpp -B build/cpp -DCMAKE_PREFIX_PATH="$(python -m lispetorch.cmake_prefix_path)"
"""

from pathlib import Path

import torch.utils

from .ops import native_library


def prefix_paths() -> list[str]:
    """The directories holding ``lispetorchConfig.cmake`` and ``TorchConfig.cmake``."""
    root = Path(native_library()).resolve().parent
    return [str(root / "share" / "cmake"), torch.utils.cmake_prefix_path]


if __name__ == "__main__":
    print(";".join(prefix_paths()))
