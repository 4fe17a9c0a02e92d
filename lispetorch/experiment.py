"""Experiments: a base training config and a grid over any of its keys, each point an ordinary training run, with
the results gathered in one table (mean ± std over seeds) and plotted against each swept axis.

    # experiment.yaml
    output_dir: runs/rank-ablation
    base: {task: stdlib-kind, max_steps: 60, lora: {target_modules: standard}}
    mode: ablation          # single | sweep | ablation
    ablation: rank          # rank [4, 8, 16], alpha 2r; alpha [8, 16, 32] at r 8; modules
    grid: {seed: [42, 1337]}
    full_baseline: true     # the same runs with every parameter trained, once per setting of the other axes

``lispetorch experiment experiment.yaml [--resume]`` or ``lt.experiment.run("experiment.yaml")``. Each run lives in
``output_dir/runs/NNN-<setting>`` (the engine's files and ``run.json``); the experiment writes ``results.json``,
``results.csv``, ``results.md`` and ``plot_<axis>.png`` into ``output_dir``.
"""

from __future__ import annotations

import concurrent.futures
import copy
import csv
import dataclasses
import difflib
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import statistics
import time
import traceback
from collections.abc import Mapping
from pathlib import Path

import torch

from . import atomic, yaml_io
from .adapters import adapter_layers, merge, unmerge
from .errors import ConfigError
from .train import data as data_mod
from .train.config import FULL, LoraSection, TrainConfig
from .train.engine import Trainer, checkpoints
from .validate import show

MODES = ("single", "sweep", "ablation")
ABLATIONS: dict[str, list[dict]] = {
    "rank": [{"lora.rank": r, "lora.alpha": 2 * r} for r in (4, 8, 16)],
    "alpha": [{"lora.rank": 8, "lora.alpha": a} for a in (8, 16, 32)],
    "modules": [{"lora.target_modules": m} for m in ("standard", "extended", "all-linear")],
}
SWEEP = {"learning_rate": [1e-4, 3e-4], "seed": [42, 1337, 2024]}
KEYS = ("output_dir", "base", "grid", "mode", "ablation", "full_baseline", "metric", "name")
MAX_RUNS = 10_000  # an experiment of more runs is a mistake in its grid (or a few bytes of YAML aliases)
RUN_NAME = "run.json"
RESULTS = ("results.json", "results.csv", "results.md")


def _known_keys() -> set[str]:
    top = {f.name for f in dataclasses.fields(TrainConfig)} - {"lora", "output_dir"}
    return top | {f"lora.{f.name}" for f in dataclasses.fields(LoraSection)}


def _set(config: dict, key: str, value) -> None:
    head, _, rest = key.partition(".")
    if rest:
        section = config.get(head)
        config[head] = section = dict(section) if isinstance(section, Mapping) else {}
        _set(section, rest, value)
    else:
        config[head] = value


def _slug(setting: dict) -> str:
    text = "_".join(f"{k.rsplit('.', 1)[-1]}={v if not isinstance(v, list) else '+'.join(map(str, v))}"
                    for k, v in setting.items())
    return re.sub(r"[^A-Za-z0-9=+._-]", "-", text)[:80] or "base"


@dataclasses.dataclass
class Plan:
    """The resolved experiment: its runs' settings and configs, checked."""

    output_dir: Path
    settings: list[dict]
    configs: list[dict]
    axes: list[str]
    metric: str | None
    name: str


def plan(config: Mapping | str | os.PathLike) -> Plan:
    """Every run of an experiment config, each run's training config checked, before anything runs.

    Raises:
        ConfigError: an unknown key (experiment or grid axis), an empty value list, a value of the wrong type (by
            the training config's own checks, naming the run's setting), an unknown mode or ablation.
    """
    source, base_dir = "experiment", Path.cwd()
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"{path}: no such experiment config")
        source, base_dir = str(path), path.resolve().parent
        config = yaml_io.load(path, ConfigError) or {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"{source}: an experiment config is a mapping, got {type(config).__name__}")
    for key in config:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            raise ConfigError(f"{source}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else
                                                                   f"; the keys are {', '.join(KEYS)}"))
    if "output_dir" not in config:
        raise ConfigError(f"{source}: missing required key 'output_dir'")
    if not isinstance(config["output_dir"], str) or not config["output_dir"].strip():
        raise ConfigError(f"{source}: 'output_dir' must be a directory's path, got {show(config['output_dir'])}")
    base = config.get("base") or {}
    if not isinstance(base, Mapping):
        raise ConfigError(f"{source}: 'base' must be a training config (a mapping), got {base!r}")
    if "output_dir" in base:
        raise ConfigError(f"{source}: 'base.output_dir' is set per run (under the experiment's output_dir)")
    mode = config.get("mode", "single")
    if mode not in MODES:
        raise ConfigError(f"{source}: 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    known = _known_keys()
    axes: list[list[dict]] = []
    names: list[str] = []
    if mode == "sweep":
        for key, values in SWEEP.items():
            if key not in (config.get("grid") or {}):
                axes.append([{key: v} for v in values])
                names.append(key)
    if mode == "ablation":
        which = config.get("ablation")
        if which not in ABLATIONS:
            raise ConfigError(f"{source}: 'ablation' must be one of {', '.join(ABLATIONS)}, got {which!r}")
        axes.append([dict(p) for p in ABLATIONS[which]])
        names.extend(ABLATIONS[which][0])
    elif "ablation" in config:
        raise ConfigError(f"{source}: 'ablation' applies to mode ablation, not {mode!r}")
    grid = config.get("grid") or {}
    if not isinstance(grid, Mapping):
        raise ConfigError(f"{source}: 'grid' must map config keys to lists of values, got {grid!r}")
    for key, values in grid.items():
        if key not in known and not (str(key).startswith("task.") and "task" in base):
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            raise ConfigError(f"{source}: grid axis {key!r} is not a training config key"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
        if not isinstance(values, list):
            raise ConfigError(f"{source}: grid axis {key!r} must be a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"{source}: grid axis {key!r} has an empty list of values")
        axes.append([{key: v} for v in values])
        names.append(key)
    runs = math.prod(len(a) for a in axes)
    if runs > MAX_RUNS:
        sizes = " × ".join(f"{'/'.join(a[0])} ({len(a)})" for a in axes)
        raise ConfigError(f"{source}: the grid makes {runs} runs ({sizes}); an experiment has at most {MAX_RUNS}")
    settings = [dict(itertools.chain.from_iterable(p.items() for p in point)) for point in itertools.product(*axes)]
    if config.get("full_baseline"):
        others = [n for n in names if not n.startswith("lora.")]
        seen = []
        for s in settings:
            full = {k: v for k, v in s.items() if k in others}
            full["lora.method"] = FULL
            if full not in seen:
                seen.append(full)
        settings += seen
        if "lora.method" not in names:
            names.append("lora.method")
    out = Path(config["output_dir"])
    out = out if out.is_absolute() else base_dir / out
    configs = []
    for i, setting in enumerate(settings):
        cfg = copy.deepcopy(dict(base))
        for key, value in setting.items():
            _set(cfg, key, value)
        if setting.get("lora.method") == FULL:  # full fine-tuning: no adapter keys apply, and no checkpoints
            cfg["lora"] = {"method": FULL}
            cfg["save_steps"] = 0
        cfg["output_dir"] = str(out / "runs" / f"{i + 1:03d}-{_slug(setting)}")
        for key in ("data", "model"):
            if isinstance(cfg.get(key), str) and not Path(cfg[key]).is_absolute() and (base_dir / cfg[key]).exists():
                cfg[key] = str(base_dir / cfg[key])
        if isinstance(cfg.get("task"), Mapping):
            for key in ("train_file", "eval_file"):
                v = cfg["task"].get(key)
                if isinstance(v, str) and not Path(v).is_absolute():
                    cfg["task"][key] = str(base_dir / v)
        try:
            TrainConfig.from_dict(cfg, f"{source}: run {i + 1} ({_describe(setting)})")
        except ConfigError as e:
            raise ConfigError(str(e)) from None
        configs.append(cfg)
    metric = config.get("metric")
    if metric is not None and not isinstance(metric, str):
        raise ConfigError(f"{source}: 'metric' must be a metric's name, got {metric!r}")
    return Plan(out, settings, configs, names, metric, str(config.get("name", out.name)))


def _describe(setting: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "base config"


# --- one run -------------------------------------------------------------------------------------------------
@torch.no_grad()
def merge_check(trainer: Trainer, examples: int = 4, repeats: int = 3) -> dict:
    """The largest |logit| difference between the merged and the unmerged adapter on a few validation examples,
    and the merged/unmerged inference time ratio (best of ``repeats``)."""
    model = trainer.model
    if not adapter_layers(model):
        return {}
    data = trainer.dataset.validation[:examples] or trainer.dataset.train[:examples]
    batch = data_mod.collate(data, trainer.pad_id)
    ids, mask = batch["input_ids"].to(trainer.device), batch["attention_mask"].to(trainer.device)
    was_training = model.training
    model.eval()

    def timed():
        best, out = math.inf, None
        for _ in range(repeats):
            t = time.perf_counter()
            out = model(input_ids=ids, attention_mask=mask).logits.float()
            best = min(best, time.perf_counter() - t)
        return out, best

    unmerged, t_unmerged = timed()
    merge(model)
    try:
        merged, t_merged = timed()
    finally:
        unmerge(model)
        model.train(was_training)
    diff = float((merged - unmerged).abs().max() * mask.unsqueeze(-1).any())
    return {"merge_max_abs_logit_diff": diff, "merged_unmerged_time_ratio": t_merged / t_unmerged}


def _last_record(output_dir: Path, key: str) -> dict:
    path = output_dir / "metrics.jsonl"
    found = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if key in r:
                    found = r
    return found


def run_one(index: int, setting: dict, config: dict, progress: bool = True) -> dict:
    """Trains one grid point (resuming from its newest checkpoint when it has one) and writes its ``run.json``;
    a failure is recorded there (status ``failed`` and the error) instead of raised."""
    out = Path(config["output_dir"])
    record = {"index": index, "setting": setting, "status": "running", "config": config}
    started = time.perf_counter()
    try:
        trainer = Trainer(config, progress=progress)
        result = trainer.train(resume=bool(checkpoints(out)))
        logged = _last_record(out, "efficiency/trainable_share")
        metrics = {"train_loss": result.train_loss, "eval_loss": result.eval_loss,
                   "initial_eval_loss": result.initial_eval_loss}
        for prefix, values in (("", result.task_metrics), ("initial_", result.initial_task_metrics)):
            for k, v in (values or {}).items():
                if k != "total":
                    metrics[f"{prefix}{k}"] = v
        record.update(
            status="done",
            metrics=metrics,
            trainable_parameters=result.trainable_parameters,
            total_parameters=result.total_parameters,
            trainable_share=result.trainable_parameters / max(result.total_parameters, 1),
            base_params_with_grad=logged.get("verification/base_params_with_grad"),
            base_unchanged=logged.get("verification/base_unchanged"),
            seconds=result.seconds,
            tokens_per_second=result.tokens_per_second,
            peak_memory_mb=logged.get("training_efficiency/peak_memory_mb"),
            adapter_dir=str(result.adapter_dir),
            **merge_check(trainer),
        )
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a failed run is a result of the experiment, recorded as such
        record.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=6),
                      seconds=time.perf_counter() - started)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / RUN_NAME, json.dumps(record, indent=2, default=str) + "\n")
    return record


# --- results -------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "+".join(map(str, v))
    return str(v)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict], axes: list[str], metric: str) -> list[dict]:
    """One row per setting other than the seed: the mean ± std over seeds of the metric and the validation loss,
    the trainable share, and the drop against the full fine-tuning baseline of the same other settings."""
    groups: dict[str, list[dict]] = {}
    keyed = [a for a in axes if a != "seed"]
    for r in runs:
        if r["status"] != "done":
            continue
        key = json.dumps({a: r["setting"][a] for a in keyed if a in r["setting"]}, default=str)
        groups.setdefault(key, []).append(r)
    rows = []
    for key, rs in groups.items():
        m, s = _mean_std([r["metrics"].get(metric) for r in rs])
        lm, ls = _mean_std([r["metrics"].get("eval_loss") for r in rs])
        rows.append({"setting": json.loads(key), "runs": len(rs), "metric": metric, "mean": m, "std": s,
                     "eval_loss_mean": lm, "eval_loss_std": ls, "trainable_share": rs[0]["trainable_share"],
                     "full": rs[0]["setting"].get("lora.method") == FULL})
    for row in rows:
        if row["full"]:
            continue
        others = {k: v for k, v in row["setting"].items() if not k.startswith("lora.")}
        for full in rows:
            if full["full"] and {k: v for k, v in full["setting"].items() if not k.startswith("lora.")} == others:
                row["drop_vs_full"] = full["mean"] - row["mean"]
    return rows


def write_results(p: Plan, runs: list[dict]) -> dict:
    """``results.json``, ``results.csv`` and ``results.md`` (one row per run; mean ± std per setting) and the
    plots, in the experiment's output_dir."""
    done = [r for r in runs if r["status"] == "done"]
    metric = p.metric
    if metric is None:
        for candidate in ("accuracy", "f1", "eval_loss"):
            if any(candidate in r["metrics"] for r in done):
                metric = candidate
                break
        else:
            metric = "eval_loss"
    summary = summarize(runs, p.axes, metric)
    metric_keys = sorted({k for r in done for k in r["metrics"]})
    columns = (["run", "status", *p.axes, *metric_keys, "trainable_parameters", "trainable_share",
                "base_params_with_grad", "base_unchanged", "merge_max_abs_logit_diff", "merged_unmerged_time_ratio",
                "seconds", "tokens_per_second", "peak_memory_mb", "error"])
    rows = []
    for r in runs:
        row = {"run": r["index"], "status": r["status"], **{a: r["setting"].get(a) for a in p.axes},
               **{k: (r.get("metrics") or {}).get(k) for k in metric_keys}}
        for c in columns[2 + len(p.axes) + len(metric_keys):]:
            row[c] = r.get(c)
        rows.append(row)
    p.output_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(v) if isinstance(v, list) else v for k, v in row.items()})
    atomic.write_text(p.output_dir / "results.csv", buf.getvalue())
    md = [f"# {p.name}", "", f"Metric: `{metric}` (mean ± std over seeds).", ""]
    head = ["setting", "runs", metric, "eval_loss", "trainable share", "drop vs full"]
    md += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for s in summary:
        md.append(f"| {_describe(s['setting'])} | {s['runs']} | {s['mean']:.2f} ± {s['std']:.2f} | "
                  f"{s['eval_loss_mean']:.4f} ± {s['eval_loss_std']:.4f} | {100 * s['trainable_share']:.3f} % | "
                  + (f"{s['drop_vs_full']:+.2f}" if "drop_vs_full" in s else "") + " |")
    shown = ["run", "status", *p.axes, metric, "eval_loss", "trainable_share", "base_params_with_grad",
             "merge_max_abs_logit_diff", "merged_unmerged_time_ratio", "seconds", "tokens_per_second", "error"]
    shown = list(dict.fromkeys(shown))
    md += ["", "## Runs", "", "| " + " | ".join(shown) + " |", "|" + " --- |" * len(shown)]
    for row in rows:
        md.append("| " + " | ".join(_fmt(row.get(c)).replace("|", "/") for c in shown) + " |")
    atomic.write_text(p.output_dir / "results.md", "\n".join(md) + "\n")
    result = {"name": p.name, "metric": metric, "axes": p.axes, "runs": runs, "summary": summary,
              "plots": [str(x) for x in plot(p, summary, metric)]}
    atomic.write_text(p.output_dir / "results.json", json.dumps(result, indent=2, default=str) + "\n")
    return result


def plot(p: Plan, summary: list[dict], metric: str) -> list[Path]:
    """``plot_<axis>.png``: the metric (mean ± std over seeds) against each swept axis, one line per setting of
    the others; full fine-tuning as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for axis in p.axes:
        if axis in ("seed", "lora.method"):
            continue
        values = list(dict.fromkeys(_fmt(s["setting"].get(axis)) for s in summary if not s["full"]))
        if len(values) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        lines: dict[str, list] = {}
        for s in summary:
            if s["full"]:
                continue
            rest = _describe({k: v for k, v in s["setting"].items() if k != axis}) or "all"
            lines.setdefault(rest, []).append((values.index(_fmt(s["setting"].get(axis))), s["mean"], s["std"]))
        for label, pts in lines.items():
            pts.sort()
            ax.errorbar([x for x, _, _ in pts], [m for _, m, _ in pts], yerr=[e for _, _, e in pts], marker="o",
                        capsize=3, label=label)
        for i, s in enumerate(x for x in summary if x["full"]):
            ax.axhline(s["mean"], color="k", ls="--", alpha=0.6, label="full fine-tuning" if i == 0 else None)
        ax.set_xticks(range(len(values)), values)
        ax.set_xlabel(axis)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        out = p.output_dir / f"plot_{axis.replace('.', '_')}.png"
        tmp = out.with_name(f".{out.name}.tmp")
        fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        os.replace(tmp, out)
        paths.append(out)
    return paths


def _worker_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def run(config: Mapping | str | os.PathLike, resume: bool = False, progress: bool = True, workers: int = 1) -> dict:
    """Runs every point of an experiment (see the module's docstring) and writes its results; with ``resume``
    finished runs are read back, not rerun, and an interrupted one continues from its newest checkpoint.

    Args:
        workers (int): grid points trained at once, each in a process of its own (started fresh, ``spawn``),
            the machine's cores shared out between them; 1 trains them one after the other in this process.
            The results are the same files, in the grid's order.

    Returns:
        dict: what ``results.json`` holds (``runs``, ``summary``, ``metric``, ``plots``).

    Raises:
        ConfigError: a bad experiment config, or ``workers`` not a positive integer.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    p = plan(config)
    if not resume and (p.output_dir / "runs").is_dir() and any((p.output_dir / "runs").iterdir()):
        raise ConfigError(f"output_dir {p.output_dir} holds runs of an earlier experiment: resume it (--resume) or "
                          "choose another output_dir")
    runs: dict[int, dict] = {}
    todo = []
    for i, (setting, cfg) in enumerate(zip(p.settings, p.configs, strict=True), 1):
        done = Path(cfg["output_dir"]) / RUN_NAME
        if resume and done.is_file():
            previous = json.loads(done.read_text())
            if previous.get("status") == "done":
                if progress:
                    print(f"run {i}/{len(p.settings)}: {_describe(setting)}: finished already")
                runs[i] = previous
                continue
        todo.append((i, setting, cfg))

    def report(i: int, record: dict) -> None:
        if progress and record["status"] == "failed":
            print(f"run {i}/{len(p.settings)} failed: {record['error']}", flush=True)
        runs[i] = record

    if workers == 1 or len(todo) <= 1:
        for i, setting, cfg in todo:
            if progress:
                print(f"run {i}/{len(p.settings)}: {_describe(setting)}", flush=True)
            report(i, run_one(i, setting, cfg, progress))
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(todo)),
                                                    mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_worker_threads, initargs=(threads,)) as pool:
            futures = {}
            for i, setting, cfg in todo:
                if progress:
                    print(f"run {i}/{len(p.settings)}: {_describe(setting)} (in a process of its own)", flush=True)
                futures[pool.submit(run_one, i, setting, cfg, False)] = i
            for future in concurrent.futures.as_completed(futures):
                report(futures[future], future.result())
    return write_results(p, [runs[i] for i in sorted(runs)])


# --- the command ---------------------------------------------------------------------------------------------
def configure(parser) -> None:
    parser.add_argument("config", help="an experiment YAML: output_dir, base (a training config), grid, mode, "
                                       "ablation, full_baseline, metric (see docs/experiments.md)")
    parser.add_argument("--resume", action="store_true", help="skip finished runs, continue the interrupted one")
    parser.add_argument("--no-progress", action="store_true", help="no progress output")
    parser.add_argument("--workers", type=int, default=1,
                        help="grid points trained at once, each in its own process (default 1)")


def main(args) -> int:
    result = run(args.config, resume=args.resume, progress=not args.no_progress, workers=args.workers)
    out = Path(plan(args.config).output_dir)
    failed = [r for r in result["runs"] if r["status"] != "done"]
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.csv'}, {out / 'results.md'}, {out / 'results.json'}"
          + "".join(f", {x}" for x in result["plots"]))
    if failed:
        print(f"{len(failed)} of {len(result['runs'])} runs failed: " + "; ".join(
            f"run {r['index']}: {r['error']}" for r in failed))
    return 1 if failed else 0
