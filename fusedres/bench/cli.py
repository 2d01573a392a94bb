"""`fusedres-bench` / `python -m fusedres.bench`: argument parsing and the run from levels to files.

With CUDA: the requested levels are timed and written as JSON, CSV, markdown and PNG. Without CUDA, `auto`
(the default) runs the correctness demo and the count level (fusedres.bench.demo, fusedres.bench.count) instead,
because a time measured on a CPU through the Triton interpreter says nothing about the kernels; a timed level
asked for by name is refused.

Arguments are parsed before torch is imported (this module imports only the standard library and
fusedres.bench.vocab at load time), so --help and argument errors come back at once.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fusedres.bench.vocab import CPU_LEVELS, DTYPE_NAMES, EXTRA_MODELS, LEVELS, MEMORY_FORMAT_NAMES, MODELS

if TYPE_CHECKING:
    from fusedres.bench.common import Config

# Timed levels (LEVELS) need CUDA; CPU_LEVELS run anywhere. A new level goes into one of the two tuples.
LEVEL_CHOICES = ("auto", "all") + CPU_LEVELS + LEVELS


def _csv(kind, choices=None):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        if not items:
            raise argparse.ArgumentTypeError(f"empty {kind} list")
        if choices is not None:
            bad = [t for t in items if t not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {kind} {', '.join(bad)}; choose from {', '.join(choices)}")
        return items
    return parse


def _models(text: str) -> tuple[str, ...]:
    """Model names; the count level also takes timm models as timm/<name>."""
    names = _csv("model")(text)
    _csv("model", MODELS + EXTRA_MODELS + ("all",))(",".join(n for n in names if not n.startswith("timm/")) or "all")
    return names


def _size(text: str) -> tuple[int, int, int, int]:
    try:
        dims = tuple(int(t) for t in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if len(dims) != 4 or dims[1] != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected N,3,H,W (e.g. 2,3,64,64), got {text!r}")
    return dims


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusedres-bench",
        description="Benchmark fusedres against stock PyTorch (kernels, blocks, whole ResNets) on a CUDA GPU; "
                    "without one, check that the fused ResNet matches stock through the Triton interpreter.")
    p.add_argument("--level", type=_csv("level", LEVEL_CHOICES), default=("auto",), metavar="LEVELS",
                   help=f"comma list of {', '.join(LEVEL_CHOICES)} (default auto: the timed levels "
                        f"{', '.join(LEVELS)} with CUDA, the demo and the count without; all: every timed level; "
                        f"a timed level asked for on a machine without CUDA is an error; count: launches, bytes, "
                        f"FLOPs, saved memory and a modeled time, counted on fake tensors)")
    p.add_argument("--models", type=_models, default=None, metavar="NAMES",
                   help=f"models and count levels: comma list of {', '.join(MODELS + EXTRA_MODELS)} or all (default "
                        f"all = the torchvision ones; --quick and count: resnet50); count also takes timm/<name>")
    p.add_argument("--batch", type=_positive, default=None, metavar="N",
                   help="batch size of every timed level (default 128; count: 256)")
    p.add_argument("--dtype", type=_csv("dtype", DTYPE_NAMES), default=None, metavar="DTYPES",
                   help="dtypes of the fused and compiled candidates (default bf16); model baselines always "
                        "include eager fp32, bf16 and fp16")
    p.add_argument("--memory-format", type=_csv("memory format", MEMORY_FORMAT_NAMES + ("both",)),
                   default=None, metavar="FORMAT",
                   help="kernels and blocks: channels_last (default), contiguous or both")
    p.add_argument("--modes", type=_csv("mode", ("fwd", "bwd", "train", "infer")), default=None, metavar="MODES",
                   help="keep only these modes (kernels: fwd, bwd, infer; blocks: fwd, train, infer; models: "
                        "train, infer); default: kernels fwd,bwd,infer, blocks fwd,train, models train,infer")
    p.add_argument("--impl", type=_csv("impl pattern"), default=(), metavar="PATTERNS",
                   help="keep only impls matching these patterns (* and ? are wildcards, brackets literal), "
                        "e.g. 'eager,fusedres[triton]*' "
                        "(default: all, except fusedres[reference] in blocks and models)")
    p.add_argument("--repeats", type=_positive, default=None, metavar="N", help="interleaved samples per candidate "
                                                                    "(default 10, --quick 3)")
    p.add_argument("--warmup", type=_positive, default=3, metavar="N", help="untimed calls per candidate before timing")
    p.add_argument("--quick", action="store_true",
                   help="fewer kernel shapes, resnet50 only, 3 repeats, default-mode compile for inference")
    p.add_argument("--cuda-graphs", action="store_true", help="models: add CUDA-graph candidates")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="timed levels: directory for the JSON, CSV, markdown and PNG results (default "
                        "benchmarks/results); the demo writes a JSON only when --out is given")
    p.add_argument("--compare", type=Path, default=None, metavar="OLD.json",
                   help="print the change of every row against an earlier result")
    p.add_argument("--against", type=Path, default=None, metavar="NEW.json",
                   help="with --compare: compare two saved results without measuring anything")
    p.add_argument("--fail-threshold", type=float, default=None, metavar="PCT",
                   help="with --compare: exit 1 when a row got slower by more than PCT percent or now fails")
    p.add_argument("--size", type=_positive, default=None, metavar="PIXELS",
                   help="count: image size (default 224; the CIFAR pre-activation models always 32)")
    p.add_argument("--gpu", default="H200", choices=("H100 SXM", "H200", "A100"), metavar="GPU",
                   help="count: the GPU whose datasheet numbers model the time: H100 SXM, H200 (default) or A100")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--demo-model", default="resnet18", choices=MODELS, metavar="MODEL",
                   help=f"demo: model, one of {', '.join(MODELS)} (default resnet18)")
    p.add_argument("--demo-size", type=_size, default=(2, 3, 64, 64), metavar="N,3,H,W",
                   help="demo: input size (default 2,3,64,64)")
    return p


def flag_table() -> str:
    """The markdown table of every flag, generated from the parser (the README's copy is tested against it)."""
    rows = ["| flag | meaning |", "|---|---|"]
    for action in build_parser()._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        flag = action.option_strings[-1]
        if action.nargs != 0:
            flag += " " + (action.metavar or action.dest.upper())
        rows.append(f"| `{flag}` | {(action.help or '').replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.against is not None and args.compare is None:
        parser.error("--against needs --compare OLD.json")
    if args.fail_threshold is not None and args.compare is None:
        parser.error("--fail-threshold needs --compare OLD.json")
    return args


def resolve_levels(requested, cuda: bool) -> list[str]:
    """The levels to run, in order: 'auto' is the timed levels with CUDA, the demo and the count without."""
    out = []
    for level in requested:
        expanded = (LEVELS if cuda else ("demo", "count")) if level == "auto" else LEVELS if level == "all" \
            else (level,)
        out += [lv for lv in expanded if lv not in out]
    return out


def make_config(args) -> "Config":
    from fusedres.bench.common import MEMORY_FORMATS, Config

    fmts = args.memory_format or ("channels_last",)
    if "both" in fmts:
        fmts = tuple(MEMORY_FORMATS)
    models = args.models or (("resnet50",) if args.quick else MODELS)
    if "all" in models:
        models = MODELS
    cfg = Config(batch=args.batch or 128, dtypes=args.dtype or ("bf16",), memory_formats=fmts, models=models,
                 impls=tuple(args.impl), repeats=args.repeats or (3 if args.quick else 10), warmup=args.warmup,
                 quick=args.quick, cuda_graphs=args.cuda_graphs, target_ms=10.0 if args.quick else 25.0)
    if args.modes:
        cfg.kernel_modes = tuple(m for m in ("fwd", "bwd", "infer") if m in args.modes)
        cfg.block_modes = tuple(m for m in ("fwd", "train", "infer") if m in args.modes)
        cfg.model_modes = tuple(m for m in ("train", "infer") if m in args.modes)
    return cfg


def compare_files(old_path, new_path, threshold, log=print) -> int:
    from fusedres.bench.results import compare, load_json

    text, regressions = compare(load_json(old_path), load_json(new_path), threshold)
    log(f"compare {old_path} -> {new_path}")
    log(text)
    return 1 if regressions else 0


def headline(rows: list[dict]) -> list[str]:
    """One line per (ResNet-50, mode, dtype): the fastest fusedres candidate against eager and compile."""
    lines = []
    keys = dict.fromkeys((r["mode"], r["dtype"]) for r in rows if r["level"] == "models" and r["name"] == "resnet50")
    for mode, dtype in keys:
        fused = [r for r in rows if r["level"] == "models" and r["name"] == "resnet50" and r["mode"] == mode
                 and r["dtype"] == dtype and r["impl"].startswith("fusedres") and r.get("ms")]
        if not fused:
            continue
        best = min(fused, key=lambda r: r["ms"])
        s = best.get("speedup") or {}
        vs = ", ".join(f"{v:.2f}x {k}" for k, v in s.items())
        lines.append(f"resnet50 {mode} {dtype} batch {best['batch']}: best fused {best['impl']} "
                     f"{best['img_per_s']:.0f} img/s ({vs or 'no baseline in this run'})")
    return lines


def run_timed(args, levels: list[str], log=print, cfg: "Config | None" = None, device=None,
              timer_factory=None) -> int:
    """Time `levels`, write <stem>.json/.csv/.md/.png under --out, print tables and the --compare report.

    cfg, device and timer_factory(level) default to the CLI's config, CUDA and CUDA-event timers (tests
    pass a tiny config, the CPU and a wall-clock timer to exercise everything but the numbers).
    """
    import torch

    from fusedres.bench import blocks, kernels, models
    from fusedres.bench.common import raise_recompile_limits
    from fusedres.bench.env import environment, result_stem
    from fusedres.bench.plots import write_plots
    from fusedres.bench.progress import progress
    from fusedres.bench.results import (add_speedups, compare, document, format_tables, load_json, write_csv,
                                        write_json)
    from fusedres.bench.timing import CudaTimer

    cfg = cfg or make_config(args)
    device = torch.device(device or "cuda")
    if timer_factory is None:
        def timer_factory(level):
            return CudaTimer(flush_l2=(level == "kernels"), device=device)
    raise_recompile_limits()
    torch.backends.cudnn.benchmark = True
    meta = environment()
    meta["config"] = {k: v for k, v in vars(cfg).items() if k not in ("kernel_specs", "block_specs", "extra")}
    meta["levels"] = levels
    old = load_json(args.compare) if args.compare else None
    modules = {"kernels": kernels, "blocks": blocks, "models": models}
    from fusedres.bench.env import default_out

    out = args.out or default_out()
    stem = out / result_stem(meta)
    rows, level_errors, current = [], {}, []

    def checkpoint(level_rows):
        """Rewrite the JSON and CSV after every group, so a run cut short keeps what it measured."""
        current[:] = level_rows
        partial = [dict(r) for r in rows + level_rows]
        add_speedups(partial)
        write_json(document(dict(meta, complete=False), partial), f"{stem}.json")
        write_csv(partial, f"{stem}.csv")

    for level in levels:
        module = modules[level]
        bar = progress(len(module.groups(cfg)), level)
        timer = timer_factory(level)
        current.clear()
        try:
            rows += module.run(cfg, device, timer, bar, on_group=checkpoint)
        except Exception as exc:  # a level that cannot run is reported; the other levels still run
            from fusedres.bench.common import describe_error

            rows += current
            level_errors[level] = describe_error(exc, 1000)
            log(f"level {level} stopped: {level_errors[level]}")
        finally:
            bar.close()
            del timer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if level_errors:
        meta["level_errors"] = level_errors
    meta["complete"] = True
    add_speedups(rows)
    doc = document(meta, rows)
    tables = format_tables(rows, meta)
    paths = [write_json(doc, f"{stem}.json"), write_csv(rows, f"{stem}.csv")]
    Path(f"{stem}.md").write_text(tables)
    paths.append(Path(f"{stem}.md"))
    if not args.no_plots:
        paths += write_plots(rows, stem, log=log)
    log(tables)
    for line in headline(rows):
        log(line)
    log("results: " + ", ".join(str(p) for p in paths))
    rc = 1 if level_errors else 0
    if old is not None:
        text, regressions = compare(old, doc, args.fail_threshold)
        log(f"compare {args.compare} -> this run")
        log(text)
        rc = rc or (1 if regressions else 0)
    return rc


def run_demo_job(args, requested_timed: list[str], cuda: bool, log=print) -> int:
    from fusedres.bench.demo import run_demo

    result = run_demo(args.demo_model, args.demo_size, log=log)
    if args.out is not None:
        from fusedres.bench.env import environment, result_stem
        from fusedres.bench.results import write_json

        meta = environment()
        path = write_json(dict(meta, demo=result), args.out / f"demo_{result_stem(meta)}.json")
        log(f"demo results: {path}")
    if not cuda:
        skipped = requested_timed or list(LEVELS)
        log("")
        plural = len(skipped) > 1
        log(f"No CUDA GPU here, so no timings: the {', '.join(skipped)} level{'s' if plural else ''} "
            f"{'were' if plural else 'was'} skipped (kernel GB/s, block ms, model img/s and peak memory are "
            "measured on a GPU only). On a machine with an NVIDIA GPU, scripts/bench.sh runs the full benchmark.")
        if args.compare is not None:
            log(f"--compare {args.compare}: nothing to compare, no timings were taken.")
    return 0 if result["ok"] else 1


def refuse_timed(requested, cuda: bool) -> str | None:
    """The one-line reason to stop when timed levels were asked for by name on a machine without CUDA."""
    named = [lv for lv in requested if lv in LEVELS or lv == "all"]
    if cuda or not named:
        return None
    return (f"fusedres-bench: --level {','.join(named)} is timed on a CUDA GPU and this machine has none "
            f"(torch.cuda.is_available() is False); without a GPU run `python -m fusedres.bench --level demo` "
            f"(the default, auto, does the same): it checks the fused ResNet against stock through the Triton "
            f"interpreter.")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.against is not None:
        return compare_files(args.compare, args.against, args.fail_threshold)
    from fusedres.bench.common import ensure_interpreter

    ensure_interpreter()
    import torch

    cuda = torch.cuda.is_available()
    reason = refuse_timed(args.level, cuda)
    if reason:
        print(reason, file=sys.stderr)
        return 2
    levels = resolve_levels(args.level, cuda)
    timed = [lv for lv in levels if lv in LEVELS]
    rc = 0
    if "demo" in levels:
        rc = run_demo_job(args, timed, cuda)
    if cuda and timed:
        rc = run_timed(args, timed) or rc
    if "count" in levels:
        from fusedres.bench import count

        rc = count.run(args) or rc
    return rc


if __name__ == "__main__":
    sys.exit(main())
