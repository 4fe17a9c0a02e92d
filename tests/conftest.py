"""Fixtures: tiny Hugging Face models built from a config, saved to a temporary directory and loaded back
through ``from_pretrained`` (the real loading path), and a seed for reproducible runs."""

from __future__ import annotations

import importlib.util
import os
import random
import sys

import hy.importer
import pytest
import torch

ARCHS = ("llama", "qwen2", "gpt2")


@pytest.fixture(autouse=True)
def seed():
    random.seed(0)
    torch.manual_seed(0)
    return 0


def tiny_config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0,
                             eos_token_id=0)
    if arch == "starcoder2":
        return tf.Starcoder2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    raise ValueError(arch)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Saved tiny models by architecture: ``{arch: directory}``."""
    from transformers import AutoModelForCausalLM

    dirs = {}
    for arch in (*ARCHS, "starcoder2"):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(tiny_config(arch))
        d = tmp_path_factory.mktemp(arch)
        model.save_pretrained(d)
        dirs[arch] = d
    return dirs


def load(directory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    return model


def logits(model, ids):
    """The model's logits for ``ids``, without autograd."""
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (2, 12))


def randomize_adapters(model, adapter_name="default", std=0.05):
    """Gives every adapter a non-zero B (and a fresh A), so adapted and base outputs differ."""
    import lispetorch as lt

    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for layer in lt.adapter_layers(model).values():
            if adapter_name in layer.lora_A:
                A, B, _ = layer.factors(adapter_name)
                A.copy_(torch.randn(A.shape, generator=g) * std)
                B.copy_(torch.randn(B.shape, generator=g) * std)


@pytest.fixture(scope="session")
def tiny_default_model(tmp_path_factory):
    """The embedded default model at its tiny size, built through the same code path as the real one."""
    from lispetorch import default_model

    root = tmp_path_factory.mktemp("lispetorch-cache")
    return default_model.ensure(default_model.TINY, root=root, progress=False)


# --- Hy tests (tests/lisp/test_*.hy): each is imported as a module and its test_* functions run. This lives here,
# not in a tests/lisp/conftest.py, because two conftest modules would both be imported as `conftest` and the
# Python tests import their helpers from this one.
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


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves during fn(), each storage once."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# --- hypothesis: few examples in `make test`, many with HYPOTHESIS_PROFILE=fuzz (`make fuzz`); no deadline, since
# the machine's load, not the code, decides how long one example takes.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("quick", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))


@pytest.fixture
def corpus(tmp_path):
    """Real code to train on: three standard-library modules as a data directory (a test file may define its
    own)."""
    import sysconfig
    from pathlib import Path

    src = Path(sysconfig.get_paths()["stdlib"])
    d = tmp_path / "corpus"
    d.mkdir()
    for name in ("colorsys.py", "bisect.py", "keyword.py"):
        (d / name).write_text((src / name).read_text())
    return d
