"""Adapter analysis: the spectrum of ΔW from the factors against a dense SVD, the statistics, the files and the
errors, through the API and the command."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import load, randomize_adapters
from safetensors.torch import load_file

import lispetorch as lt
from lispetorch.analysis import singular_values, spectrum_stats
from lispetorch.peft_format import parse_key


def _dense_spectra(directory):
    """{module: singular values of s·B A}, by a dense SVD of the out×in matrix."""
    config = json.loads((directory / "adapter_config.json").read_text())
    weights = load_file(str(directory / "adapter_model.safetensors"))
    pairs = {}
    for key, t in weights.items():
        name, which = parse_key(key)
        pairs.setdefault(name, {})[which] = t.double()
    out = {}
    for name, p in pairs.items():
        r = p["lora_A"].shape[0]
        alpha = config.get("alpha_pattern", {}).get(name, config["lora_alpha"])
        out[name] = torch.linalg.svdvals((alpha / r) * p["lora_B"] @ p["lora_A"])
    return out


def _check_against_dense(directory, model_dir):
    result = lt.analyze(directory, model=model_dir)
    dense = _dense_spectra(directory)
    assert set(result.modules) == set(dense)
    for name, m in result.modules.items():
        ref = dense[name][: len(m["singular_values"])]
        got = torch.tensor(m["singular_values"], dtype=torch.float64)
        assert torch.linalg.norm(got - ref) <= 1e-5 * torch.linalg.norm(ref), name
        assert math.isclose(m["delta_norm"], float(ref.norm()), rel_tol=1e-5)
        assert 0 < m["effective_rank"] <= m["rank"] + 1e-9
        assert m["utilisation"] == pytest.approx(m["effective_rank"] / m["rank"])
        assert 1 <= m["rank_90"] <= m["rank_99"] <= m["rank"]
        assert m["relative_delta_norm"] > 0
    return result


def test_lora_agrees_with_dense_svd(model_dirs, tmp_path):
    model = load(model_dirs["llama"])
    lt.inject(model, lt.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(model)
    lt.save_adapter(model, tmp_path / "a")
    result = _check_against_dense(tmp_path / "a", model_dirs["llama"])
    assert len(result.modules) == 14  # 7 linear layers × 2 blocks
    assert result.summary["by_kind"]["q_proj"]["modules"] == 2
    # the same numbers from the live model
    live = lt.analyze(model)
    for name, m in live.modules.items():
        assert m["singular_values"] == pytest.approx(result.modules[name]["singular_values"], rel=1e-9, abs=1e-12)


def test_svd_family_agrees_with_dense_svd(model_dirs, tmp_path):
    """Rotational PiSSA, analysed as its plain-LoRA equivalent on the original weights (rank 2r)."""
    model = load(model_dirs["gpt2"])
    lt.inject(model, lt.RotationalPiSSAConfig(r=4, method="way1", target_modules=["c_attn", "c_fc"]))
    with torch.no_grad():
        for p in lt.trainable_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    lt.save_as_lora(model, tmp_path / "rot")
    result = _check_against_dense(tmp_path / "rot", model_dirs["gpt2"])
    assert {m["rank"] for m in result.modules.values()} == {8}
    live = lt.analyze(model)  # the live model is analysed as the same equivalent
    for name, m in live.modules.items():
        assert m["singular_values"] == pytest.approx(result.modules[name]["singular_values"], rel=1e-6, abs=1e-9)


def test_spectrum_statistics_by_hand():
    # a flat spectrum of rank 4: effective rank 4, stable rank 4, 90 % energy needs 4 directions
    s = spectrum_stats(torch.tensor([1.0, 1.0, 1.0, 1.0]), 8)
    assert s["effective_rank"] == pytest.approx(4.0)
    assert s["stable_rank"] == pytest.approx(4.0)
    assert (s["rank_90"], s["rank_99"]) == (4, 4)
    assert s["utilisation"] == pytest.approx(0.5)
    # σ = (3, 1): p = (3/4, 1/4), H = -(.75 ln .75 + .25 ln .25); energy 9/10 at one direction
    s = spectrum_stats(torch.tensor([3.0, 1.0]), 2)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert s["effective_rank"] == pytest.approx(math.exp(h))
    assert s["stable_rank"] == pytest.approx(10 / 9)
    assert (s["rank_90"], s["rank_99"]) == (1, 2)
    # ΔW = 0 (B at its zero init)
    assert spectrum_stats(torch.zeros(4), 4)["effective_rank"] == 0.0
    # exact singular values of a known product: B A = diag(2, 1) padded
    A = torch.zeros(2, 5)
    A[0, 0], A[1, 1] = 1.0, 1.0
    B = torch.zeros(6, 2)
    B[0, 0], B[1, 1] = 2.0, 1.0
    assert singular_values(A, B, 0.5).tolist() == pytest.approx([1.0, 0.5])


def test_errors_name_file_and_module(model_dirs, tmp_path):
    with pytest.raises(lt.AdapterFormatError, match="adapter_config.json"):
        lt.analyze(tmp_path)  # exists, but is not an adapter
    model = load(model_dirs["llama"])
    lt.inject(model, lt.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(model)
    lt.save_adapter(model, tmp_path / "a")
    # a model without that module, then one whose q_proj is narrower
    with pytest.raises(lt.AdapterFormatError, match=r"adapter_model\.safetensors.*model\.layers\.0\.self_attn\.q_proj"):
        lt.analyze(tmp_path / "a", model=model_dirs["gpt2"])
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(lt.ShapeError, match=r"adapter_model\.safetensors: module 'model\.layers\.0\.self_attn\.q_proj'"
                                            r".*64×64.*32×32"):
        lt.analyze(tmp_path / "a", model=wide)


def test_command_writes_json_and_plots(model_dirs, tmp_path):
    model = load(model_dirs["gpt2"])
    lt.inject(model, lt.LoraConfig(r=4, target_modules=["c_attn", "c_proj"]))
    randomize_adapters(model)
    lt.save_adapter(model, tmp_path / "a")
    proc = subprocess.run([sys.executable, "-m", "lispetorch.cli", "analyze", str(tmp_path / "a"), "--model",
                           str(model_dirs["gpt2"]), "--json", str(tmp_path / "a.json"), "--plots", str(tmp_path / "p")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "a.json").read_text())
    assert len(data["modules"]) == 6
    for m in data["modules"].values():
        assert len(m["singular_values"]) == 4 and m["effective_rank"] > 0 and "relative_delta_norm" in m
    for name in ("heatmap.png", "spectra.png"):
        assert (tmp_path / "p" / name).read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, "-m", "lispetorch.cli", "analyze", str(tmp_path)], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "adapter_config.json" in bad.stderr
