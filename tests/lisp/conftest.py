"""Collects the Hy tests (``test_*.hy``): each is imported as a module and its ``test_*`` functions run."""

from __future__ import annotations

import importlib.util
import sys

import hy.importer
import pytest


class HyModule(pytest.Module):
    """A test module written in Hy. It is loaded by Hy's own loader, not through the import system, where
    pytest's assertion rewriter would try to read it as Python (it does so for files named on the command line)."""

    def _getobj(self):
        name = self.path.stem
        loader = hy.importer.HyLoader(name, str(self.path))
        spec = importlib.util.spec_from_file_location(name, str(self.path), loader=loader)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loader.exec_module(module)
        return module


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".hy" and file_path.name.startswith("test_"):
        return HyModule.from_parent(parent, path=file_path)
    return None
