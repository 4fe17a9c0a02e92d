"""Training past one process: real torchrun jobs of two processes on 127.0.0.1 (gloo), the tiny default model.

Every job's adapter is compared with one run of one process over the same config (dropout on): data parallel,
sharded, two "nodes", and a job killed on one rank and resumed in one process all end with the same adapter."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lispetorch as lt
from lispetorch.train import ConfigError, TrainConfig, checkpoints, distributed
from lispetorch.train import train as train_run

WORKER = Path(__file__).with_name("distributed_worker.py")
JOB_TIMEOUT = 240  # seconds a job may take on a loaded machine before the test fails
ENV = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "OMP_NUM_THREADS": "1"}
for _key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_key, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, nnodes: str | None = None) -> list[str]:
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if nnodes is None:
        head += ["--standalone"]
    return head + list(args)


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=JOB_TIMEOUT)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_default_model):
    """A corpus, the tiny default model, and the config every job trains (written per output directory)."""
    import sysconfig

    root = tmp_path_factory.mktemp("distributed")
    model = tiny_default_model
    src = Path(sysconfig.get_paths()["stdlib"])
    corpus = root / "corpus"
    corpus.mkdir()
    for name in ("colorsys.py", "bisect.py", "keyword.py"):
        (corpus / name).write_text((src / name).read_text())
    base = {"model": str(model), "data": str(corpus), "max_steps": 4, "batch_size": 2,
            "gradient_accumulation_steps": 4, "max_seq_length": 32, "logging_steps": 2, "save_steps": 2,
            "eval_steps": 2, "warmup_steps": 1, "learning_rate": 5e-3, "seed": 7, "plot": False,
            "distributed": {"strategy": "ddp", "timeout": 60},
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.2, "target_modules": ["q_proj", "v_proj", "down_proj"]}}

    def config(name: str, **over) -> Path:
        cfg = {**base, "output_dir": str(root / name), **over}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    reference = train_run(config("reference"), progress=False)  # one process
    return {"root": root, "config": config, "reference": reference.adapter_dir}


def adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def assert_same_adapter(a_dir: Path, b_dir: Path) -> None:
    a, b = adapter(a_dir), adapter(b_dir)
    assert a.keys() == b.keys()
    moved = 0.0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5 * float(a[key].abs().max()))
        moved = max(moved, float(a[key].abs().max()))
    assert moved > 0


def test_two_processes_end_with_the_adapter_of_one(setup):
    cfg = setup["config"]("ddp")
    proc = run([sys.executable, "-m", "lispetorch", "train", str(cfg), "--nproc", "2", "--no-progress"],
               setup["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes (ddp)" in proc.stdout
    out = setup["root"] / "ddp"
    assert_same_adapter(setup["reference"], out / "adapter")
    # rank 0 alone wrote the metrics: one record per logging step, no duplicates
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [2, 4]
    assert [s for s, _ in checkpoints(out)] == [2, 4]


def test_sharded_base_holds_half_per_process_and_trains_the_same_adapter(setup):
    cfg = setup["config"]("fsdp", distributed={"strategy": "fsdp", "timeout": 60})
    shares = setup["root"] / "shares"
    shares.mkdir()
    proc = run(torchrun(str(WORKER), str(cfg), "--shares", str(shares)), setup["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    held = [json.loads((shares / f"shares-{r}.json").read_text()) for r in range(2)]
    whole = held[0]["whole"]
    assert whole > 100_000
    for h in held:  # about half of the frozen base in each process (the shards' rounding aside)
        assert 0.45 < h["held"] / whole < 0.55, held
    assert abs(held[0]["held"] + held[1]["held"] - whole) <= whole * 0.01
    assert_same_adapter(setup["reference"], setup["root"] / "fsdp" / "adapter")
    # the saved adapter is whole and loads in PEFT
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = Path(yaml.safe_load(cfg.read_text())["model"])
    ids = torch.randint(0, 200, (1, 12))
    ours = AutoModelForCausalLM.from_pretrained(model_dir)
    lt.load_adapter(ours, setup["root"] / "fsdp" / "adapter")
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                       setup["root"] / "fsdp" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, theirs.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_killed_rank_stops_the_job_and_resume_with_one_process_ends_the_same(setup):
    cfg = setup["config"]("killed")
    started = time.monotonic()
    proc = run(torchrun(str(WORKER), str(cfg), "--fail", "1", "3", "kill"), setup["root"])
    assert proc.returncode != 0
    assert time.monotonic() - started < 60 + 30  # the collective timeout with room to start
    out = setup["root"] / "killed"
    assert [s for s, _ in checkpoints(out)] == [2]
    assert lt.train.check_checkpoint(out / "checkpoint-2") is None
    assert not (out / "adapter").exists()
    resumed = train_run(cfg, resume=True, progress=False)  # one process now
    assert resumed.global_step == 4
    assert_same_adapter(setup["reference"], resumed.adapter_dir)


def test_a_rank_that_raises_stops_every_rank_with_its_message(setup):
    cfg = setup["config"]("raises")
    started = time.monotonic()
    proc = run(torchrun(str(WORKER), str(cfg), "--fail", "1", "2", "raise"), setup["root"])
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert elapsed < 60 + 30  # the collective timeout with room to start; in practice rank 0 stops at once
    assert "RuntimeError: injected failure at step 2" in proc.stderr
    for line in proc.stderr.splitlines():  # rank 0, if it got to say why it stopped, names rank 1's failure
        if "DistributedError" in line:
            assert "stopped because rank 1: RuntimeError: injected failure at step 2" in line
    assert [s for s, _ in checkpoints(setup["root"] / "raises")] == [2]


def test_two_nodes_on_one_machine_end_with_the_adapter_of_one(setup):
    cfg = setup["config"]("nodes")
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "nodes", "-m",
           "lispetorch", "train", str(cfg), "--no-progress"]
    nodes = [subprocess.Popen(cmd, cwd=setup["root"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=JOB_TIMEOUT) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert_same_adapter(setup["reference"], setup["root"] / "nodes" / "adapter")


def test_processes_with_different_configs_are_refused(setup):
    cfg = setup["config"]("mixed")
    other = setup["config"]("mixed", seed=8)
    other = other.rename(other.with_name("mixed-other.yaml"))
    cfg = setup["config"]("mixed")
    proc = run(torchrun(str(WORKER), str(cfg), "--rank1-config", str(other)), setup["root"])
    assert proc.returncode != 0
    assert f"{cfg}: the processes were started with different configs" in proc.stderr
    assert not (setup["root"] / "mixed" / "adapter").exists()


# --- in one process ------------------------------------------------------------------------------------------
def test_distributed_section_is_checked_by_name(tmp_path):
    base = {"data": "x", "output_dir": "o"}
    for value, message in ((3, "'distributed' must be a mapping"),
                           ({"strategy": "zero3"}, "'distributed.strategy' must be one of ddp, fsdp, got 'zero3'"),
                           ({"strategy": 1}, "'distributed.strategy' must be a string"),
                           ({"timeout": 0}, "distributed.timeout"),
                           ({"timeout": float("nan")}, "distributed.timeout"),
                           ({"stratgy": "ddp"}, "did you mean 'strategy'")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
            TrainConfig.from_dict({**base, "distributed": value}, "run.yaml")
    with pytest.raises(ConfigError, match="fsdp.*init pissa"):
        TrainConfig.from_dict({**base, "distributed": {"strategy": "fsdp"}, "lora": {"init": "pissa"}}, "run.yaml")
    cfg = TrainConfig.from_dict({**base, "batch_size": 3, "gradient_accumulation_steps": 1,
                                 "distributed": {"strategy": "ddp"}})
    cfg.check_world_size(3)
    with pytest.raises(ConfigError, match=r"global batch \(batch_size 3 × gradient_accumulation_steps 1 = 3 "
                                          r"samples\) does not divide among 2 processes"):
        cfg.check_world_size(2)
    assert TrainConfig.from_dict(base).distributed is None


def test_shares_are_disjoint_and_cover_the_window():
    items = list(range(11))
    for size in (1, 2, 3, 4):
        parts = [distributed.share(items, r, size) for r in range(size)]
        assert sum(parts, []) == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    seeds = {distributed.sample_seed(7, s, j, k) for s in range(3) for j in range(5) for k in range(4)}
    assert len(seeds) == 60 and all(0 <= s < 2**62 for s in seeds)
    assert distributed.sample_seed(7, 1, 2, 3) == distributed.sample_seed(7, 1, 2, 3)


def test_per_sample_dropout_does_not_depend_on_the_batch():
    """A sample's output (and gradient) is the same alone or in a padded batch beside another: its mask is its
    own seed's over its own rows."""
    torch.manual_seed(0)
    layer = lt.LoraLinear(torch.nn.Linear(16, 12))
    layer.add_adapter("default", 4, 8, dropout=0.5)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    layer.train()
    x = torch.randn(2, 6, 16)
    layer.dropout_seeds = [11, 22]
    both = layer(x)
    layer.dropout_seeds = [22]
    alone = layer(x[1:, :4])
    torch.testing.assert_close(both[1, :4], alone[0], rtol=0, atol=0)
    layer.dropout_seeds = [23]
    assert not torch.equal(layer(x[1:, :4]), alone)
    layer.dropout_seeds = [11, 22]  # the tokens flattened sample after sample: the same masks
    torch.testing.assert_close(layer(x.reshape(12, 16)), both.reshape(12, 12), rtol=0, atol=0)
    layer.dropout_seeds = [1, 2, 3, 4]
    with pytest.raises(lt.ShapeError, match="4 seeds for an input of shape"):
        layer(x)


def test_a_run_of_one_keyed_without_dropout_is_the_plain_run_bit_for_bit(setup):
    """Without dropout, the keyed path (a share of every window, the gradients summed) is the plain loop's
    arithmetic: the same micro-batches in the same order."""
    over = {"lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "max_steps": 2, "save_steps": 0, "eval_steps": 0}
    keyed = train_run(setup["config"]("keyed0", **over), progress=False)
    plain = train_run(setup["config"]("plain0", distributed=None, **over), progress=False)
    a, b = adapter(keyed.adapter_dir), adapter(plain.adapter_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert keyed.train_loss == plain.train_loss


def test_nproc_is_checked(setup, capsys):
    from lispetorch.cli import main

    cfg = setup["config"]("nproc")
    assert main(["train", str(cfg), "--nproc", "0"]) == 2
    assert "--nproc must be a number of processes from 1 to 4096, got 0" in capsys.readouterr().err


def test_keyed_masks_are_drawn_again_alike_under_gradient_checkpointing(setup):
    """Recomputed in backward, each layer runs with the same per-sample seeds: the same adapter as without."""
    over = {"max_steps": 2, "save_steps": 0, "eval_steps": 0}
    plain = train_run(setup["config"]("keyed-ckpt0", **over), progress=False)
    ckpt = train_run(setup["config"]("keyed-ckpt1", gradient_checkpointing=True, **over), progress=False)
    assert_same_adapter(plain.adapter_dir, ckpt.adapter_dir)



def test_merge_and_unmerge_under_fsdp_gather_what_they_need(setup):
    cfg = setup["config"]("fsdp_merge", distributed={"strategy": "fsdp", "timeout": 60}, max_steps=2, save_steps=0)
    out = setup["root"] / "merge"
    proc = run(torchrun(str(WORKER), str(cfg), "--merge", str(out)), setup["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads(Path(f"{out}-{r}.json").read_text()) for r in range(2)]
    for s in seen:  # merged logits equal the adapter's; unmerge gives every shard back bit for bit
        assert s["merged_vs_adapted"] <= 1e-5 * s["scale"] and s["unmerged_vs_adapted"] == 0.0 and s["exact"], s
        assert s["adapted_vs_base"] > 100 * s["merged_vs_adapted"] and s["adapted_vs_base"] > 1e-4, s
    assert seen[0]["logits"] == seen[1]["logits"]


def test_expert_adapters_merge_and_unmerge_under_fsdp(setup, tiny_default_model):
    """A mixture of experts trained under FSDP2 with adapters on its expert weights: merging gathers each sharded
    expert stack whole and writes the shards back; unmerge gives every shard back bit for bit."""
    import shutil

    import transformers

    d = setup["root"] / "moe-model"
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=512, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)).save_pretrained(d)
    for f in tiny_default_model.iterdir():
        if "token" in f.name:
            shutil.copy(f, d / f.name)
    cfg = setup["config"]("fsdp_moe_merge", model=str(d), distributed={"strategy": "fsdp", "timeout": 60},
                          max_steps=2, save_steps=0,
                          lora={"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"],
                                "target_parameters": ["gate_up_proj", "down_proj"]})
    out = setup["root"] / "moe-merge"
    proc = run(torchrun(str(WORKER), str(cfg), "--merge", str(out)), setup["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads(Path(f"{out}-{r}.json").read_text()) for r in range(2)]
    for s in seen:
        assert s["merged_vs_adapted"] <= 1e-5 * s["scale"] and s["unmerged_vs_adapted"] == 0.0 and s["exact"], s
        assert s["adapted_vs_base"] > 100 * s["merged_vs_adapted"] and s["adapted_vs_base"] > 1e-4, s
    assert seen[0]["logits"] == seen[1]["logits"]
