"""``lispetorch combine``: the checkpoint optimizer's steps as subcommands.

    lispetorch combine init-config --config checkpoints_config.yml
    lispetorch combine extract  --config checkpoints_config.yml --output-dir extracted [--delta]
    lispetorch combine organize --input-dir extracted [--output-dir extracted/organized_by_layer_module]
    lispetorch combine optimize --config checkpoints_config.yml --target concatenationTrained \\
        --output combination_results.json [--layerwise] [--constraint simplex|nonnegative|unconstrained]
    lispetorch combine optimize --input-dir extracted/organized_by_layer_module --output-dir results
    lispetorch combine summary  --results-file results/memory_efficient_global_results.json
    lispetorch combine build    --config checkpoints_config.yml --results combination_results.json \\
        --output combined [--template DIR] [--mode template|cat|svd|linear] [--rank R] [--layerwise module|layer]
    lispetorch combine build    --extracted-dir extracted --results-file R.json --template-checkpoint DIR \\
        --output-checkpoint combined
    lispetorch combine all      --config checkpoints_config.yml --target concatenationTrained \\
        --work-dir work --output combined

Every ``--long-option`` is also accepted as the optimizer guide writes it, with underscores (``--input_dir``,
``--output_dir``, ``--create_default_config``, ``--results_file``, ``--template_checkpoint``, …).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import AdapterFormatError, ConfigError
from .build import build
from .config import write_default_config
from .optimize import optimize
from .steps import extract, organize, run_all, summarize, write_results

STEPS = ("init-config", "extract", "organize", "optimize", "summary", "build", "all")
RESULTS_NAME = "memory_efficient_global_results.json"
_CONFIG_HELP = ("checkpoint list (YAML): checkpoints: {name: {path, description}}, settings: {verify_paths, "
                "verbose_paths}")


def _flag(*names: str) -> tuple[str, ...]:
    """Each ``--long-name`` with its underscore spelling (the optimizer guide's) as an alias."""
    out = []
    for n in names:
        out.append(n)
        if "-" in n[2:]:
            out.append("--" + n[2:].replace("-", "_"))
    return tuple(out)


def _common(p: argparse.ArgumentParser, config=True, checkpoints=True) -> None:
    if config:
        p.add_argument("--config", required=True, help=_CONFIG_HELP)
    if checkpoints:
        p.add_argument("--checkpoints", nargs="+", metavar="NAME", help="use only these checkpoints of the list")
    p.add_argument("--verbose", action="store_true", default=None, help="explain path validation and progress")


def _mismatch(p):
    p.add_argument("--intersect", action="store_true",
                   help="when checkpoints adapt different modules, combine the modules all adapt (with a warning "
                        "listing the others) instead of stopping")


def _optimize_args(p):
    p.add_argument("--target", help="name of the checkpoint to approximate (default: the last of the list)")
    p.add_argument("--layerwise", action="store_true", help="also solve per module and per layer")
    p.add_argument("--constraint", default="simplex", choices=("simplex", "nonnegative", "unconstrained"),
                   help="simplex: weights >= 0 summing to 1 (default)")
    _mismatch(p)


def _build_args(p, results=True):
    p.add_argument(*_flag("--output", "--output-checkpoint"), dest="output", required=True,
                   help="the adapter directory to write")
    p.add_argument("--mode", choices=("template", "cat", "svd", "linear"),
                   help="template: a drop-in for the template (its shapes, ranks and config; the best approximation "
                        "at its ranks; the default with a template); cat: exact, rank = sum of ranks (the default "
                        "without one); svd: best rank-R approximation; linear: A and B averaged separately "
                        "(approximation)")
    p.add_argument("--rank", type=int, help="rank of --mode svd (default: the largest rank combined)")
    p.add_argument(*_flag("--template", "--template-checkpoint"), dest="template",
                   help="checkpoint directory whose shapes and ranks (mode template), tokenizer, configs, other files "
                        "and other tensors (modules_to_save) the output takes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    if results:
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument(*_flag("--results", "--results-file"), dest="results",
                         help="an optimize results JSON (its global_weights)")
        src.add_argument("--weights", nargs="+", metavar="NAME=W", help="weights given directly")
        p.add_argument("--layerwise", choices=("module", "layer"),
                       help="use the per-module or per-layer weights of a results file written with --layerwise")
        _mismatch(p)


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="step", metavar="STEP", required=True)
    p = sub.add_parser("init-config", help="write a default checkpoint list (YAML)")
    p.add_argument("--config", default="checkpoints_config.yml", help="where to write it")
    p.add_argument("--checkpoint", nargs="+", metavar="NAME=PATH", help="fill it with these checkpoints")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p = sub.add_parser("extract", help="write A, B (and with --delta ΔW) of every checkpoint, with metadata")
    p.add_argument("--config", help=_CONFIG_HELP + " (default with --create_default_config: checkpoints_config.yml)")
    p.add_argument("--checkpoints", nargs="+", metavar="NAME", help="use only these checkpoints of the list")
    p.add_argument("--verbose", action="store_true", default=None, help="explain path validation and progress")
    p.add_argument(*_flag("--create-default-config"), dest="create_default_config", action="store_true",
                   help="write a default checkpoint list at --config and stop")
    p.add_argument("--force", action="store_true", help="with --create_default_config: overwrite an existing file")
    p.add_argument(*_flag("--output-dir"), dest="output_dir")
    p.add_argument("--delta", action="store_true", help="also write ΔW = scale·B A (large: out×in per module)")
    p = sub.add_parser("organize", help="regroup extracted factors by module, with master_index.json")
    p.add_argument(*_flag("--input-dir"), dest="input_dir", required=True, help="an extract output directory")
    p.add_argument(*_flag("--output-dir"), dest="output_dir", help="default INPUT_DIR/organized_by_layer_module")
    p = sub.add_parser("optimize", help="find the combination weights; write the results JSON")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help=_CONFIG_HELP)
    src.add_argument(*_flag("--input-dir"), dest="input_dir",
                     help="the organize (or extract) step's output directory, whose files are read")
    p.add_argument("--checkpoints", nargs="+", metavar="NAME", help="use only these checkpoints of the list")
    p.add_argument("--verbose", action="store_true", default=None, help="explain path validation and progress")
    _optimize_args(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--output", help="results JSON to write (default combination_results.json)")
    out.add_argument(*_flag("--output-dir"), dest="output_dir", help=f"write DIR/{RESULTS_NAME}")
    p = sub.add_parser("summary", help="print the analysis of an existing results file")
    p.add_argument(*_flag("--results", "--results-file"), dest="results", required=True, help="an optimize results "
                   "JSON")
    p = sub.add_parser("build", help="write the combined PEFT adapter directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help=_CONFIG_HELP)
    src.add_argument(*_flag("--extracted-dir"), dest="extracted_dir",
                     help="the extract (or organize) step's output directory, whose factor files are read")
    p.add_argument("--verbose", action="store_true", default=None, help="explain path validation and progress")
    _build_args(p)
    p = sub.add_parser("all", help="extract, organize, optimize and build")
    _common(p)
    _optimize_args(p)
    _build_args(p, results=False)
    p.add_argument(*_flag("--work-dir"), dest="work_dir", required=True,
                   help="where extracted files and the results JSON go")
    p.add_argument("--delta", action="store_true", help="also extract ΔW")


def _pairs(items, what, convert):
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"{what} must be NAME=VALUE, got {item!r}")
        try:
            out[name] = convert(value)
        except ValueError:
            raise ConfigError(f"{what} {item!r}: {value!r} is not a valid value") from None
    return out


def _print_results(r: dict) -> None:
    ev = r["evaluation"]
    print(f"target {r['target']}; {r['num_modules']} modules, {r['total_elements']:,} ΔW elements per checkpoint; "
          f"method {r['method']}")
    for n, w in r["weights"].items():
        print(f"  {n:>24s}  {w: .6f}")
    rel = ev["relative_error"]
    print(f"residual norm {ev['residual_norm']:.6g}, relative error {rel if rel is None else f'{rel:.6f}'}, "
          f"R² {ev['r_squared'] if ev['r_squared'] is None else format(ev['r_squared'], '.6f')}, "
          f"constraint violation {ev['constraint_violation']:.2e}, KKT {'ok' if r['kkt']['satisfied'] else 'FAILED'}")
    if "layerwise" in r:
        lw = r["layerwise"]
        print(f"layerwise: per-module weights residual {lw['per_module']['residual_norm']:.6g} "
              f"({lw['per_module']['improvement']:.2%} closer), per-layer {lw['per_layer']['residual_norm']:.6g} "
              f"({lw['per_layer']['improvement']:.2%} closer)")
    t = r["timings"]
    print(f"time {t['total_s']:.3f} s (read {t.get('read_s', 0):.3f} s, Gram {t.get('gram_s', 0):.3f} s)")


def _print_build(s: dict) -> None:
    note = " (approximation with cross terms)" if s["mode"] == "linear" else ""
    print(f"wrote {s['output_dir']}: mode {s['mode']}{note}, {s['num_modules']} modules, rank {s['rank']}, "
          f"relative distance from the exact combination {s['relative_deviation']:.3e}")
    if s.get("kept_tensors"):
        print(f"kept {len(s['kept_tensors'])} other tensor(s) from {s['kept_from']}: {', '.join(s['kept_tensors'])}")


def _read_results(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"results file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def main(args: argparse.Namespace) -> int:
    on_mismatch = "intersect" if getattr(args, "intersect", False) else "error"
    if args.step == "init-config":
        pairs = _pairs(args.checkpoint, "--checkpoint", str) if args.checkpoint else None
        path = write_default_config(args.config, pairs, force=args.force)
        print(f"wrote {path}; edit the paths, then run `lispetorch combine optimize --config {path} --target NAME`")
        return 0
    if args.step == "extract":
        if args.create_default_config:
            path = write_default_config(args.config or "checkpoints_config.yml", force=args.force)
            print(f"wrote {path}; edit the paths, then run `lispetorch combine extract --config {path} --output_dir "
                  "DIR`")
            return 0
        if not args.config or not args.output_dir:
            raise ConfigError("extract needs --config and --output_dir (or --create_default_config)")
        meta = extract(args.config, args.output_dir, args.checkpoints, delta=args.delta, verbose=args.verbose)
        print(f"extracted {len(meta)} checkpoint(s) into {args.output_dir}")
        return 0
    if args.step == "organize":
        index = organize(args.input_dir, args.output_dir)
        print(f"organized {index['num_combinations']} modules of {len(index['checkpoints'])} checkpoints")
        return 0
    if args.step == "optimize":
        r = optimize(args.config or args.input_dir, args.target, args.layerwise, constraint=args.constraint,
                     checkpoints=args.checkpoints, on_mismatch=on_mismatch, verbose=args.verbose)
        output = Path(args.output_dir) / RESULTS_NAME if args.output_dir else Path(args.output or
                                                                                   "combination_results.json")
        write_results(r, output)
        _print_results(r)
        print(f"results: {output}")
        return 0 if r["kkt"]["satisfied"] else 1
    if args.step == "summary":
        path = Path(args.results)
        print(summarize(_read_results(path), path))
        return 0
    if args.step == "build":
        if args.results:
            weights = _read_results(Path(args.results))
        else:
            if args.layerwise:
                raise ConfigError("--layerwise needs --results_file (a results file written with --layerwise)")
            weights = _pairs(args.weights, "--weights", float)
        s = build(args.config or args.extracted_dir, weights, args.output, args.mode, args.rank, args.template,
                  overwrite=args.overwrite, on_mismatch=on_mismatch, verbose=args.verbose, layerwise=args.layerwise)
        _print_build(s)
        return 0
    out = run_all(args.config, args.target, args.work_dir, args.output, args.mode, args.rank, args.template,
                  layerwise=args.layerwise, constraint=args.constraint, checkpoints=args.checkpoints,
                  on_mismatch=on_mismatch, delta=args.delta, overwrite=args.overwrite, verbose=args.verbose)
    _print_results(out["results"])
    _print_build(out["build"])
    return 0
