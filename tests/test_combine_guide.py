"""The checkpoint optimizer's guide, run as written: its directory layout, its flags (with underscores), its file
names, each step a real subprocess on real PEFT checkpoints of a tiny StarCoder2; the drop-in checkpoint it builds
(the template's shapes, ranks and config, the Eckart–Young truncation of the exact weighted sum) loaded by PEFT;
checkpoints carrying other tensors (a trained head); layer-wise weights."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import load, logits
from safetensors.torch import load_file, save_file

import lispetorch as lt
from lispetorch import combine
from lispetorch.cli import main as cli_main

peft = pytest.importorskip("peft")

NAMES = ("annotated", "multiline", "singleline", "concatenationTrained")
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
GUIDE_CONFIG = """\
# StarCoder2-7B LoRA Checkpoints Configuration
checkpoints:
  annotated:
    path: "../starcoder27b/annotated/checkpoint-40000"
    description: "Annotated training data checkpoint"

  multiline:
    path: "../starcoder27b/multiline/checkpoint-40000"
    description: "Multiline training data checkpoint"

  singleline:
    path: "../starcoder27b/singleline/checkpoint-40000"
    description: "Singleline training data checkpoint"

  concatenationTrained:
    path: "../starcoder27b/concatenationTrained/checkpoint-40000"
    description: "Concatenation trained checkpoint (target for optimization)"

settings:
  verify_paths: true
  verbose_paths: true
"""


def lispetorch(cwd, *args):
    """One `lispetorch` command in its own process, as a user types it; returns its output."""
    r = subprocess.run([sys.executable, "-m", "lispetorch.cli", *args], cwd=cwd, capture_output=True, text=True,
                       env={"TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert r.returncode == 0, f"lispetorch {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def adapters(model_dir, root, specs, modules_to_save=None):
    """Real PEFT checkpoints with random non-zero factors; returns their paths and PEFT's own deltas."""
    paths, deltas = {}, {}
    for i, (name, spec) in enumerate(specs.items()):
        torch.manual_seed(20 + i)
        model = peft.get_peft_model(load(model_dir), peft.LoraConfig(
            target_modules=ATTN, init_lora_weights=False, modules_to_save=modules_to_save, **spec))
        if modules_to_save:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "modules_to_save" in n:
                        p.add_(torch.randn_like(p) * 0.1)  # a trained head, different in every checkpoint
        path = root / name / "checkpoint-40000"
        model.save_pretrained(path)
        (path / "tokenizer.json").write_text("{}")
        (path / "trainer_state.json").write_text("{\"global_step\": 40000}")
        paths[name] = path
        deltas[name] = {n.removeprefix("base_model.model."): m.get_delta_weight("default").detach().double()
                        for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    return paths, deltas


SPECS = {"annotated": dict(r=4, lora_alpha=8), "multiline": dict(r=2, lora_alpha=4),
         "singleline": dict(r=3, lora_alpha=3, use_rslora=True), "concatenationTrained": dict(r=4, lora_alpha=16)}


@pytest.fixture
def guide_tree(model_dirs, tmp_path):
    """The guide's layout: starcoder27b/NAME/checkpoint-40000, LoRAExtraction/, optimizer/ (the working dir)."""
    paths, deltas = adapters(model_dirs["starcoder2"], tmp_path / "starcoder27b", SPECS)
    (tmp_path / "LoRAExtraction").mkdir()
    (tmp_path / "optimizer").mkdir()
    return tmp_path, paths, deltas


def truncated(exact, r):
    U, S, Vh = torch.linalg.svd(exact)
    return U[:, :r] * S[:r] @ Vh[:r], float(S[r:].square().sum()), float(S.square().sum())


def test_the_guide_runs_as_written(guide_tree, model_dirs, input_ids):
    root, paths, deltas = guide_tree
    opt = root / "optimizer"
    cfg = "../LoRAExtraction/checkpoints_config.yml"
    # Step 1, option 1: a default list is written where --config says; option 2: the guide's own list
    lispetorch(opt, "combine", "extract", "--create_default_config", "--config", cfg)
    assert "concatenationTrained" in (root / "LoRAExtraction" / "checkpoints_config.yml").read_text()
    (root / "LoRAExtraction" / "checkpoints_config.yml").write_text(GUIDE_CONFIG)
    out = lispetorch(opt, "combine", "extract", "--config", cfg, "--output_dir", "../extracted_starcoder27b_matrices",
                     "--verbose")
    assert "ok  annotated" in out
    extracted = root / "extracted_starcoder27b_matrices"
    for n in NAMES:
        assert (extracted / f"{n}_A_matrices.safetensors").is_file()
        assert (extracted / f"{n}_metadata.json").is_file()
    assert (extracted / "checkpoints_config.yml").is_file()
    # Step 2
    lispetorch(opt, "combine", "organize", "--input_dir", "../extracted_starcoder27b_matrices",
               "--output_dir", "../extracted_starcoder27b_matrices/organized_by_layer_module")
    index = json.loads((extracted / "organized_by_layer_module" / "master_index.json").read_text())
    assert index["checkpoints"] == list(NAMES) and index["num_combinations"] == 2 * 4
    # Step 3: the organised files are the input; the target is the list's last checkpoint
    out = lispetorch(opt, "combine", "optimize", "--input_dir",
                     "../extracted_starcoder27b_matrices/organized_by_layer_module",
                     "--output_dir", "memory_efficient_global_optimization", "--layerwise")
    results_file = opt / "memory_efficient_global_optimization" / "memory_efficient_global_results.json"
    r = json.loads(results_file.read_text())
    assert r["target"] == "concatenationTrained" and r["checkpoint_names"] == list(NAMES[:3])
    direct = combine.optimize(root / "LoRAExtraction" / "checkpoints_config.yml", "concatenationTrained")
    np.testing.assert_allclose(r["global_weights"], direct["global_weights"], rtol=1e-9, atol=1e-12)
    assert r["evaluation"]["constraint_violation"] < 1e-9 and sum(r["global_weights"]) == pytest.approx(1)
    # the results' weights solve the dense problem of PEFT's own deltas
    mods = list(deltas["annotated"])
    X = np.stack([np.concatenate([deltas[n][m].flatten().numpy() for m in mods]) for n in NAMES[:3]], 1)
    t = np.concatenate([deltas["concatenationTrained"][m].flatten().numpy() for m in mods])
    np.testing.assert_allclose(r["evaluation"]["residual_norm"], np.linalg.norm(X @ np.array(r["global_weights"]) - t),
                               rtol=1e-6)
    # the summary step prints the analysis of the file
    out = lispetorch(opt, "combine", "summary", "--results_file",
                     "memory_efficient_global_optimization/memory_efficient_global_results.json")
    for n, w in zip(NAMES[:3], r["global_weights"], strict=True):
        assert n in out and f"{w: .6f}" in out
    assert "R²" in out and "dominant:" in out and "KKT conditions: satisfied" in out
    # Step 4: a drop-in for the template
    template = root / "starcoder27b" / "concatenationTrained" / "checkpoint-40000"
    out = lispetorch(opt, "combine", "build", "--extracted_dir", "../extracted_starcoder27b_matrices",
                     "--results_file", "memory_efficient_global_optimization/memory_efficient_global_results.json",
                     "--template_checkpoint", "../starcoder27b/concatenationTrained/checkpoint-40000",
                     "--output_checkpoint", "../optimally_combined_checkpoint")
    assert "mode template" in out
    built_dir = root / "optimally_combined_checkpoint"
    assert json.loads((built_dir / "adapter_config.json").read_text()) == \
        json.loads((template / "adapter_config.json").read_text())
    tmpl_t = load_file(str(template / "adapter_model.safetensors"))
    built_t = load_file(str(built_dir / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in built_t.items()} == {k: v.shape for k, v in tmpl_t.items()}
    assert {k: v.dtype for k, v in built_t.items()} == {k: v.dtype for k, v in tmpl_t.items()}
    for name in ("tokenizer.json", "trainer_state.json", "COMBINATION_README.md"):
        assert (built_dir / name).is_file()
    w = dict(zip(r["checkpoint_names"], r["global_weights"], strict=True))
    model = peft.PeftModel.from_pretrained(load(model_dirs["starcoder2"]), built_dir)
    disc = total = 0.0
    base = load(model_dirs["starcoder2"])
    for name, mod in model.named_modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer):
            key = name.removeprefix("base_model.model.")
            exact = sum(wi * deltas[n][key] for n, wi in w.items())
            best, d, tot = truncated(exact, 4)
            torch.testing.assert_close(mod.get_delta_weight("default").double(), best, rtol=1e-5, atol=1e-5)
            disc, total = disc + d, total + tot
            with torch.no_grad():
                base.get_submodule(key).weight += best.float()
    torch.testing.assert_close(logits(model.eval(), input_ids), logits(base, input_ids), rtol=1e-4, atol=1e-4)
    readme = (built_dir / "COMBINATION_README.md").read_text()
    assert f"{math.sqrt(disc / total):.6f}" in readme  # the reported distance from the exact sum


def test_guide_flags_for_subsets_and_layerwise_weights_build_a_checkpoint(guide_tree, model_dirs, tmp_path):
    root, paths, deltas = guide_tree
    yml = root / "LoRAExtraction" / "checkpoints_config.yml"
    yml.write_text(GUIDE_CONFIG)
    assert cli_main(["combine", "extract", "--config", str(yml), "--output_dir", str(tmp_path / "ex"),
                     "--checkpoints", "annotated", "multiline", "singleline"]) == 0
    assert sorted(p.name for p in (tmp_path / "ex").glob("*_metadata.json")) == \
        ["annotated_metadata.json", "multiline_metadata.json", "singleline_metadata.json"]
    res = tmp_path / "res" / "memory_efficient_global_results.json"
    assert cli_main(["combine", "optimize", "--config", str(yml), "--output_dir", str(res.parent),
                     "--layerwise"]) == 0
    r = json.loads(res.read_text())
    for how in ("module", "layer"):
        out = tmp_path / f"lw_{how}"
        assert cli_main(["combine", "build", "--config", str(yml), "--results_file", str(res), "--layerwise", how,
                         "--output_checkpoint", str(out), "--mode", "cat"]) == 0
        assert f"its own {how}'s weights" in (out / "COMBINATION_README.md").read_text()
        model = peft.PeftModel.from_pretrained(load(model_dirs["starcoder2"]), out)
        lw = r["layerwise"]
        for name, mod in model.named_modules():
            if isinstance(mod, peft.tuners.lora.LoraLayer):
                key = name.removeprefix("base_model.model.")
                entry = lw["modules"][key] if how == "module" else lw["layers"][str(r["modules"][key]["layer"])]
                exact = sum(wi * deltas[n][key] for n, wi in zip(lw["checkpoint_names"], entry["weights"],
                                                                   strict=True))
                torch.testing.assert_close(mod.get_delta_weight("default").double(), exact, rtol=1e-5, atol=1e-6)
    # the guide's `linear` mode (A and B combined separately) stays available, with equal ranks
    assert cli_main(["combine", "build", "--config", str(yml), "--weights", "annotated=0.5",
                     "concatenationTrained=0.5", "--output_checkpoint", str(tmp_path / "lin"), "--mode",
                     "linear"]) == 0
    with pytest.raises(lt.AdapterFormatError, match="layerwise"):
        combine.build(yml, {"annotated": 1.0}, tmp_path / "x", layerwise="module")


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_template_mode_is_the_truncated_svd_of_the_exact_sum(model_dirs, tmp_path, rank):
    specs = {"a": dict(r=3, lora_alpha=6), "b": dict(r=2, lora_alpha=2, use_rslora=True), "t": dict(r=rank,
                                                                                                 lora_alpha=5)}
    paths, deltas = adapters(model_dirs["starcoder2"], tmp_path / "ck", specs)
    w = {"a": 0.7, "b": -0.4}
    out = combine.build({n: str(p) for n, p in paths.items()}, w, tmp_path / "out", template=paths["t"])
    assert out["mode"] == "template" and out["rank"] == rank
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    disc = total = 0.0
    for m in deltas["a"]:
        exact = sum(wi * deltas[n][m] for n, wi in w.items())
        best, d, tot = truncated(exact, rank)  # rank 6 > 3 + 2: the exact sum, zero-padded to the template's rank
        A = tensors[f"base_model.model.{m}.lora_A.weight"].double()
        B = tensors[f"base_model.model.{m}.lora_B.weight"].double()
        assert A.shape[0] == B.shape[1] == rank
        torch.testing.assert_close((5 / rank) * B @ A, best, rtol=1e-5, atol=1e-5)
        disc, total = disc + d, total + tot
    np.testing.assert_allclose(out["relative_deviation"], math.sqrt(disc / total), rtol=1e-4, atol=1e-7)
    if rank == 6:
        assert out["relative_deviation"] < 1e-6
    # `cat` stays the exact sum at rank Σ r
    exact = combine.build({n: str(p) for n, p in paths.items()}, w, tmp_path / "cat", mode="cat",
                          template=paths["t"])
    assert exact["rank"] == 5 and exact["relative_deviation"] < 1e-6


def test_checkpoints_with_a_trained_head_are_combined_keeping_the_templates_head(model_dirs, tmp_path, input_ids):
    specs = {"a": dict(r=2, lora_alpha=4), "b": dict(r=2, lora_alpha=4), "t": dict(r=2, lora_alpha=8)}
    paths, deltas = adapters(model_dirs["starcoder2"], tmp_path / "ck", specs, modules_to_save=["lm_head"])
    head_key = "base_model.model.lm_head.weight"
    tmpl = load_file(str(paths["t"] / "adapter_model.safetensors"))
    assert head_key in tmpl  # PEFT's own file: a modules_to_save tensor beside the factors
    cfg = {n: str(p) for n, p in paths.items()}
    r = combine.optimize(cfg, "t")
    out = combine.build(cfg, r, tmp_path / "out", template=paths["t"])
    assert out["kept_tensors"] == [head_key]
    built = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert torch.equal(built[head_key], tmpl[head_key])
    assert "lm_head" in (tmp_path / "out" / "COMBINATION_README.md").read_text()
    model = peft.PeftModel.from_pretrained(load(model_dirs["starcoder2"]), tmp_path / "out")
    torch.testing.assert_close(model.base_model.model.lm_head.modules_to_save["default"].weight, tmpl[head_key])
    # without a template the first checkpoint's head is kept
    out = combine.build(cfg, {"a": 0.5, "b": 0.5}, tmp_path / "cat")
    assert torch.equal(load_file(str(tmp_path / "cat" / "adapter_model.safetensors"))[head_key],
                       load_file(str(paths["a"] / "adapter_model.safetensors"))[head_key])
    # a non-finite head is refused, and nothing is written
    bad = dict(tmpl)
    bad[head_key] = bad[head_key].clone()
    bad[head_key][0, 0] = float("nan")
    save_file(bad, str(paths["t"] / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"lm_head\.weight holds 1 NaN"):
        combine.build(cfg, r, tmp_path / "bad", template=paths["t"])
    assert not (tmp_path / "bad").exists()


def test_template_mode_refuses_a_template_of_other_modules_and_summary_refuses_a_bad_file(guide_tree, tmp_path,
                                                                                          model_dirs, capsys):
    root, paths, _ = guide_tree
    cfg = {n: str(p) for n, p in paths.items()}
    other, _ = adapters(model_dirs["starcoder2"], tmp_path / "o", {"q": dict(r=2, lora_alpha=2)})
    conf = json.loads((other["q"] / "adapter_config.json").read_text())
    t = load_file(str(other["q"] / "adapter_model.safetensors"))
    save_file({k: v for k, v in t.items() if "q_proj" in k}, str(other["q"] / "adapter_model.safetensors"))
    conf["target_modules"] = ["q_proj"]
    (other["q"] / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="does not adapt the combined modules.*lacks .*k_proj"):
        combine.build(cfg, {"annotated": 1.0}, tmp_path / "x", template=other["q"])
    with pytest.raises(ValueError, match="mode 'template' needs a template"):
        combine.build(cfg, {"annotated": 1.0}, tmp_path / "x", mode="template")
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"global_weights": [0.5, "x"]}))
    assert cli_main(["combine", "summary", "--results_file", str(bad)]) == 2
    assert "global_weights" in capsys.readouterr().err
    bad.write_text(json.dumps({"global_weights": [0.263141, 0.284697, 0.452163], "method": "lagrange_multipliers",
                               "evaluation": {"objective_value": 3219.643, "residual_norm": 158.061809,
                                              "constraint_violation": 0.0}}))
    assert cli_main(["combine", "summary", "--results_file", str(bad)]) == 0  # the guide's own results file
    out = capsys.readouterr().out
    assert "w3" in out and "45.2%" in out and "158.061809" in out
