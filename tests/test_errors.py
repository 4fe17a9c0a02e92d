"""One exception hierarchy: every error the library raises on purpose is an ``lt.LispetorchError`` and also the
built-in type callers caught before."""

from __future__ import annotations

import pytest
import torch
from conftest import load

import lispetorch as lt


def test_hierarchy():
    for cls in (lt.ConfigError, lt.ShapeError, lt.AdapterFormatError, lt.AdapterStateError, lt.DataError,
                lt.TinyLoraFormatError, lt.train.ConfigError, lt.train.DataError):
        assert issubclass(cls, lt.LispetorchError) and issubclass(cls, ValueError)
    assert issubclass(lt.AdapterStateError, RuntimeError)
    assert issubclass(lt.TinyLoraFormatError, lt.AdapterFormatError)
    assert lt.train.ConfigError is lt.ConfigError and lt.train.DataError is lt.DataError


def test_kinds_raised(model_dirs, tmp_path):
    with pytest.raises(lt.ConfigError, match="LoraConfig.r must be a positive integer"):
        lt.LoraConfig(r=0)
    with pytest.raises(lt.ConfigError, match="RotationalPiSSAConfig.method must be one of"):
        lt.RotationalPiSSAConfig(method="way9")
    model = load(model_dirs["llama"])
    with pytest.raises(lt.ConfigError, match="matches no adaptable module"):
        lt.inject(model, lt.LoraConfig(target_modules=["nothing_here"]))
    with pytest.raises(lt.AdapterStateError, match="no adapters"):
        lt.merge(model)
    lt.inject(model, lt.LoraConfig(r=2))
    lt.merge(model)
    layer = next(iter(lt.adapter_layers(model).values()))
    for caught in (RuntimeError, ValueError, lt.AdapterStateError):  # "merged" is one condition, one type
        with pytest.raises(caught, match="is merged"):
            layer.set_factors("default", torch.zeros(2, layer.in_features), torch.zeros(layer.out_features, 2), 4)
    with pytest.raises(lt.AdapterStateError, match="is merged"):
        lt.save_as_lora(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    lt.unmerge(model)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{")
    with pytest.raises(lt.AdapterFormatError, match="not valid JSON"):
        lt.load_adapter(model, tmp_path / "bad")


def test_rotation_names_and_aliases():
    for alias, name in (("way0", "penalty"), ("way1", "givens"), ("way2", "cayley"), ("way3", "exp")):
        assert lt.RotationalPiSSAConfig(method=alias).rotation == name
        assert lt.RotationalPiSSAConfig(method=name).rotation == name


def test_descriptive_rotation_names_inject(model_dirs):
    for name in ("penalty", "givens", "cayley", "exp"):
        model = load(model_dirs["llama"])
        lt.inject(model, lt.RotationalPiSSAConfig(r=2, method=name, orthogonality_reg_weight=0.5))
        loss = lt.orthogonality_loss(model)
        if name == "penalty":  # free matrices: a differentiable penalty (zero at the identity)
            assert loss.requires_grad and float(loss) == 0.0
        else:  # exactly orthogonal: no penalty
            assert not loss.requires_grad and float(loss) == 0.0
