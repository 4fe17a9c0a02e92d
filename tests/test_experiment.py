"""Experiments: modes and grids resolved and checked before any run, runs on a tiny model and task, the results
files with every run, mean ± std over seeds, a failed run recorded while the others go on, and --resume."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

import lispetorch as lt
from lispetorch import experiment


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    rows = [{"sentence": s, "label": i % 2} for i, s in enumerate(
        ["Return the sum of a and b.", "A class that holds things.", "Open the file and read it.",
         "Base class of all errors.", "Return a copy of the list.", "Mixin class for dialogs."] * 2)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    return {"kind": "classification", "train_file": str(d / "train.jsonl"), "eval_file": str(d / "eval.jsonl"),
            "verbalizers": {0: "function", 1: "class"}}


def _base(model, task):
    return {"task": task, "model": str(model), "max_steps": 2, "batch_size": 4, "gradient_accumulation_steps": 1,
            "learning_rate": 1e-3, "logging_steps": 1, "eval_steps": 2, "save_steps": 0, "warmup_ratio": 0.06,
            "max_seq_length": 48, "plot": False, "lora": {"rank": 4, "alpha": 8, "target_modules": "standard"}}


def test_modes_resolve_to_the_documented_grids(tmp_path):
    sweep = experiment.plan({"output_dir": str(tmp_path), "base": {"data": "x"}, "mode": "sweep"})
    assert [(s["learning_rate"], s["seed"]) for s in sweep.settings] == [
        (lr, seed) for lr in (1e-4, 3e-4) for seed in (42, 1337, 2024)]
    rank = experiment.plan({"output_dir": str(tmp_path), "base": {"data": "x"}, "mode": "ablation", "ablation": "rank"})
    assert [(s["lora.rank"], s["lora.alpha"]) for s in rank.settings] == [(4, 8), (8, 16), (16, 32)]
    assert [c["lora"]["rank"] for c in rank.configs] == [4, 8, 16]
    alpha = experiment.plan({"output_dir": str(tmp_path), "base": {"data": "x"}, "mode": "ablation",
                             "ablation": "alpha"})
    assert [(s["lora.rank"], s["lora.alpha"]) for s in alpha.settings] == [(8, 8), (8, 16), (8, 32)]
    modules = experiment.plan({"output_dir": str(tmp_path), "base": {"data": "x"}, "mode": "ablation",
                               "ablation": "modules", "grid": {"seed": [1, 2]}, "full_baseline": True})
    assert [s.get("lora.target_modules") for s in modules.settings] == [
        "standard", "standard", "extended", "extended", "all-linear", "all-linear", None, None]
    assert [s.get("lora.method") for s in modules.settings[-2:]] == ["full", "full"]
    assert modules.configs[-1]["lora"] == {"method": "full"} and modules.configs[-1]["seed"] == 2


@pytest.mark.parametrize("config,match", [
    ({"grid": {"lora.rnk": [4]}}, "grid axis 'lora.rnk' is not a training config key.*lora.rank"),
    ({"grid": {"learning_rate": []}}, "grid axis 'learning_rate' has an empty list"),
    ({"grid": {"lora.rank": [4, "eight"]}}, r"run 2 \(lora.rank=eight\).*'lora.rank' must be an integer"),
    ({"mode": "ablation", "ablation": "depth"}, "'ablation' must be one of rank, alpha, modules, got 'depth'"),
    ({"mode": "sweeep"}, "'mode' must be one of"),
    ({"grids": {}}, "unknown key 'grids' \\(did you mean 'grid'\\?\\)"),
])
def test_bad_configs_fail_before_any_run(tmp_path, config, match):
    with pytest.raises(lt.ConfigError, match=match):
        experiment.run({"output_dir": str(tmp_path / "e"), "base": {"data": "x"}, **config}, progress=False)
    assert not (tmp_path / "e").exists()


def test_ablation_with_seeds_full_baseline_failure_and_resume(tiny_default_model, tiny_task, tmp_path):
    cfg = {"output_dir": str(tmp_path / "exp"), "base": _base(tiny_default_model, tiny_task),
           "grid": {"lora.target_modules": ["standard", "extended", ["no_such_module"]], "seed": [1, 2]}}
    result = experiment.run(cfg, progress=False)
    runs = result["runs"]
    assert len(runs) == 6
    failed = [r for r in runs if r["status"] == "failed"]
    assert len(failed) == 2 and all("no_such_module" in r["error"] for r in failed)
    done = [r for r in runs if r["status"] == "done"]
    for r in done:
        assert "accuracy" in r["metrics"] and "initial_accuracy" in r["metrics"]
        assert r["base_params_with_grad"] == 0 and r["seconds"] > 0 and r["tokens_per_second"] > 0
        lora = r["setting"].get("lora.method") != "full"
        assert (r["trainable_share"] < 0.2) if lora else r["trainable_share"] == 1.0
        if lora:
            assert r["merge_max_abs_logit_diff"] < 1e-3 and r["merged_unmerged_time_ratio"] > 0
            assert r["base_unchanged"] == 1.0
    out = tmp_path / "exp"
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["run"]) for r in rows] == list(range(1, 7))
    for col in ("lora.target_modules", "seed", "accuracy", "f1", "eval_loss", "trainable_share",
                "base_params_with_grad", "merge_max_abs_logit_diff", "merged_unmerged_time_ratio", "seconds",
                "tokens_per_second", "peak_memory_mb", "error"):
        assert col in rows[0], col
    md = (out / "results.md").read_text()
    summary = {json.dumps(s["setting"], sort_keys=True): s for s in result["summary"]}
    std = [s for s in summary.values() if s["setting"].get("lora.target_modules") == "standard"][0]
    accs = [r["metrics"]["accuracy"] for r in done if r["setting"].get("lora.target_modules") == "standard"]
    assert std["runs"] == 2 and std["mean"] == pytest.approx(sum(accs) / 2)
    assert f"{std['mean']:.2f} ± {std['std']:.2f}" in md
    assert md.count("\n| ") >= 2 + 2 + 6  # two header rows, the two settings that ran, every run
    assert (out / "plot_lora_target_modules.png").read_bytes()[:4] == b"\x89PNG"
    # resume: finished runs are read back, an unfinished one is run again
    times = {r["index"]: (out / "runs").joinpath(
        next(p.name for p in (out / "runs").iterdir() if p.name.startswith(f"{r['index']:03d}")), "run.json")
        .stat().st_mtime_ns for r in runs}
    unfinished = next(p for p in (out / "runs").iterdir() if p.name.startswith("002"))
    (unfinished / "run.json").unlink()
    with pytest.raises(lt.ConfigError, match="resume it"):
        experiment.run(cfg, progress=False)
    again = experiment.run(cfg, resume=True, progress=False)
    assert [r["status"] for r in again["runs"]] == [r["status"] for r in runs]
    for p in (out / "runs").iterdir():
        i = int(p.name[:3])
        if runs[i - 1]["status"] == "done" and i != 2:  # read back, not rerun
            assert (p / "run.json").stat().st_mtime_ns == times[i], p.name
    assert (unfinished / "run.json").is_file() and again["runs"][1]["status"] == "done"


def test_command(tiny_default_model, tiny_task, tmp_path):
    import yaml

    cfg = {"output_dir": "exp", "base": _base(tiny_default_model, tiny_task), "grid": {"lora.rank": [2, 4]},
           "full_baseline": True}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "lispetorch.cli", "experiment", str(tmp_path / "e.yaml"),
                           "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| lora.rank=2 | 1 |" in proc.stdout and "| lora.method=full | 1 |" in proc.stdout
    result = json.loads((tmp_path / "exp" / "results.json").read_text())
    full = [s for s in result["summary"] if s["full"]][0]
    for s in result["summary"]:
        if not s["full"]:
            assert s["drop_vs_full"] == pytest.approx(full["mean"] - s["mean"])
    assert (tmp_path / "exp" / "plot_lora_rank.png").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**cfg, "grid": {"lora.rank": []}}))
    proc = subprocess.run([sys.executable, "-m", "lispetorch.cli", "experiment", str(bad)], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "'lora.rank' has an empty list" in proc.stderr


def test_the_example_experiment_plans():
    from pathlib import Path

    p = experiment.plan(Path(__file__).resolve().parent.parent / "examples" / "rank_presets_experiment.yaml")
    assert len(p.settings) == 2 * 2 * 2 + 2  # rank × preset × seed, and full fine-tuning per seed
    assert {c["lora"].get("target_modules") for c in p.configs} == {"standard", "all-linear", None}
    assert p.metric == "accuracy" and p.output_dir.name == "rank-presets"


def test_grid_points_spread_over_processes_give_the_same_results(tiny_default_model, tiny_task, tmp_path):
    def cfg(name):
        return {"output_dir": str(tmp_path / name), "base": _base(tiny_default_model, tiny_task),
                "grid": {"lora.rank": [2, 4], "seed": [1, 2]}}

    one = experiment.run(cfg("one"), progress=False)
    two = experiment.run(cfg("two"), progress=False, workers=2)
    assert [r["setting"] for r in two["runs"]] == [r["setting"] for r in one["runs"]]
    assert all(r["status"] == "done" for r in two["runs"])
    for a, b in zip(one["runs"], two["runs"], strict=True):
        # each point trains the same steps from the same seed; only the threads per process differ
        assert b["metrics"]["eval_loss"] == pytest.approx(a["metrics"]["eval_loss"], rel=1e-4)
    assert (tmp_path / "two" / "results.csv").read_text().count("\n") == (tmp_path / "one" / "results.csv"
                                                                           ).read_text().count("\n")
    with pytest.raises(lt.ConfigError, match="workers"):
        experiment.run(cfg("three"), progress=False, workers=0)
