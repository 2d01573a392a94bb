"""fusedres-bench's CPU-side logic: byte formulas, interleaved timing, rows, JSON/CSV/markdown, --compare, CLI
parsing, plots, the level runners (on CPU with a wall-clock timer, numbers ignored) and the CPU demo."""
import csv
import json

import pytest
import torch

from fusedres.bench import blocks, cli, kernels, models, results, traffic
from fusedres.bench.common import Config, backend_of, fused_impl, glob_match, keep_impl
from fusedres.bench.demo import max_diff, verdict
from fusedres.bench.timing import Measurement, WallTimer, measure, rotation

E = 2 * 8 * 4 * 4 * 2  # bytes of a [2, 8, 4, 4] bf16 activation


# ---------------------------------------------------------------- bytes moved
@pytest.mark.parametrize("mode,residual,relu,passes", [
    ("fwd", False, True, 3), ("fwd", True, True, 4), ("infer", False, True, 2), ("infer", True, False, 3),
    ("bwd", False, True, 5), ("bwd", False, False, 5), ("bwd", True, True, 8), ("bwd", True, False, 6)])
def test_bn_act_bytes(mode, residual, relu, passes):
    assert traffic.bn_act_bytes((2, 8, 4, 4), 2, mode, residual, relu) == passes * E


@pytest.mark.parametrize("mode,passes", [("fwd", 5), ("infer", 3), ("bwd", 8)])
def test_dual_and_copy_bytes(mode, passes):
    assert traffic.dual_bn_act_bytes((2, 8, 4, 4), 2, mode) == passes * E
    assert traffic.copy_bytes((2, 8, 4, 4), 2) == 2 * E


def test_bytes_reject_unknown_mode_and_gbps():
    with pytest.raises(ValueError):
        traffic.bn_act_bytes((1, 1, 1, 1), 4, "train", False, False)
    assert traffic.gbps(2_000_000, 1.0) == 2.0
    assert traffic.gbps(10, None) is None and traffic.gbps(10, 0.0) is None


def test_resnet50_kernel_specs():
    full, quick = kernels.resnet50_specs(), kernels.resnet50_specs(quick=True)
    assert len(full) == 13 and len(quick) == 6
    names = [s.name for s in full]
    assert "bn_act+relu stem 64x112x112" in names
    assert "bn_act+add+relu layer1 256x56x56" in names
    assert "dual_bn_act+relu layer4.0 2048x7x7" in names
    spec = kernels.KernelSpec("bn_act", "x", 8, 4, residual=True)
    assert spec.bytes(2, 2, "fwd") == 4 * E


# ---------------------------------------------------------------- impl names and filters
def test_impl_names_and_filters():
    assert fused_impl("triton") == "fusedres[triton]"
    assert fused_impl("cuda", "default") == "fusedres[cuda]+compile"
    assert fused_impl("cuda", "max-autotune") == "fusedres[cuda]+compile[max-autotune]"
    assert fused_impl("cuda", graphs=True) == "fusedres[cuda]+cudagraphs"
    assert backend_of("fusedres[triton]+compile") == "triton" and backend_of("eager") is None
    assert glob_match("fusedres[triton]", "fusedres[triton]")  # brackets are literal, not a class
    assert not glob_match("fusedres[triton]+compile", "fusedres[*]")
    assert glob_match("fusedres[triton]+compile", "fusedres*")
    assert not keep_impl("fusedres[reference]", "models", ())
    assert keep_impl("fusedres[reference]", "kernels", ())
    assert keep_impl("fusedres[reference]", "models", ("fusedres[reference]",))
    assert not keep_impl("eager", "models", ("fusedres*",))


def test_models_plan_new_backends_appear_without_changes():
    cfg = Config(dtypes=("bf16",))
    train = models.plan(cfg, "train", lambda d, f: ["cuda", "triton", "reference", "newbackend"])
    impls = [(c.impl, c.dtype, c.memory_format) for c in train]
    assert impls[:3] == [("eager", "fp32", "contiguous"), ("eager", "bf16", "channels_last"),
                         ("eager", "fp16", "channels_last")]
    names = [c.impl for c in train]
    assert "compile" in names and "fusedres[newbackend]" in names and "fusedres[newbackend]+compile" in names
    assert "fusedres[reference]" not in names  # default exclusion at the models level
    infer = [c.impl for c in models.plan(cfg, "infer", lambda d, f: ["triton"])]
    assert "compile[max-autotune]" in infer and "fusedres[triton]+compile[max-autotune]" in infer
    quick = [c.impl for c in models.plan(Config(quick=True), "infer", lambda d, f: ["triton"])]
    assert "compile" in quick and "compile[max-autotune]" not in quick
    graphs = [c.impl for c in models.plan(Config(cuda_graphs=True), "train", lambda d, f: ["triton"])]
    assert "eager+cudagraphs" in graphs and "fusedres[triton]+cudagraphs" in graphs
    only = models.plan(Config(impls=("eager",)), "train", lambda d, f: ["triton"])
    assert {c.impl for c in only} == {"eager"}


# ---------------------------------------------------------------- timing
class FakeTimer:
    """Deterministic timer: fn() returns its impl's name, the time comes from that impl's queue; records the
    order of timed calls."""

    def __init__(self, ms_of):
        self.ms_of = {k: iter(v) for k, v in ms_of.items()}
        self.order = []

    def sync(self):
        pass

    def time(self, fn, iters):
        impl = fn()
        self.order.append(impl)
        return next(self.ms_of[impl])

    def peak_memory(self, fn):
        fn()
        return 1234

    def recover(self):
        pass


def test_measure_interleaves_takes_medians_and_isolates_failures():
    timer = FakeTimer({"a": [1.0, 5.0, 1.0, 3.0], "b": [2.0] * 4, "flaky": [1.0] * 4})
    calls = {"flaky": 0}

    def flaky():
        calls["flaky"] += 1
        if calls["flaky"] == 5:  # warm-up, calibration, peak memory and the first sample pass
            raise RuntimeError("boom\nsecond line")
        return "flaky"

    def broken_build():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    builders = {"a": lambda: (lambda: "a"), "b": lambda: (lambda: "b"), "flaky": lambda: flaky,
                "broken": broken_build}
    out = measure(builders, timer, repeats=3, warmup=1, target_ms=10.0, memory=True)
    assert out["a"].samples_ms == [5.0, 1.0, 3.0] and out["a"].ms == 3.0
    assert out["a"].iters == 10 and out["b"].iters == 5
    assert out["a"].peak_mem_bytes == 1234
    assert out["broken"].ms is None and out["broken"].error.startswith("OutOfMemoryError: CUDA out of memory")
    assert out["flaky"].ms is None and out["flaky"].error == "RuntimeError: boom"
    assert timer.order[:3] == ["a", "b", "flaky"]  # calibration
    assert timer.order[3:] == ["a", "b", "flaky", "b", "a", "a", "b"]  # rotated each round, flaky dropped
    assert rotation(["x", "y", "z"], 4) == ["y", "z", "x"] and rotation([], 1) == []


def test_wall_timer_and_measurement():
    assert WallTimer().time(lambda: None, 3) >= 0
    assert Measurement("x").ms is None
    assert Measurement("x", samples_ms=[1.0, 9.0, 2.0]).ms == 2.0


# ---------------------------------------------------------------- rows, files, tables, compare
META = {"device": "NVIDIA H100 80GB HBM3", "driver": "580.1", "torch": "2.11.0", "triton": "3.6.0",
        "cuda": "13.0", "commit": "0123456789abcdef", "date": "2026-11-23T10:40:00+00:00"}


def sample_rows(scale: float = 1.0):
    rows = [
        results.make_row("models", "resnet50", "train", "eager", "bf16", "channels_last", 256,
                         Measurement("eager", [100.0 * scale]), img_per_s=2560.0 / scale),
        results.make_row("models", "resnet50", "train", "compile", "bf16", "channels_last", 256,
                         Measurement("compile", [80.0 * scale]), img_per_s=3200.0 / scale),
        results.make_row("models", "resnet50", "train", "fusedres[triton]", "bf16", "channels_last", 256,
                         Measurement("fusedres[triton]", [50.0]), img_per_s=5120.0),
        results.make_row("models", "resnet50", "train", "fusedres[triton]+compile", "bf16", "channels_last", 256,
                         Measurement("x", error="BackendCompilerFailed: inductor raised")),
        results.make_row("kernels", "bn_act+relu layer1 64x56x56", "fwd", "copy", "bf16", "channels_last", 256,
                         Measurement("copy", [0.5]), gbps=2000.0),
        results.make_row("kernels", "bn_act+relu layer1 64x56x56", "fwd", "pytorch", "bf16", "channels_last", 256,
                         Measurement("pytorch", [2.0]), gbps=750.0, pct_of_copy=37.5),
        results.make_row("kernels", "bn_act+relu layer1 64x56x56", "fwd", "fusedres[triton]", "bf16",
                         "channels_last", 256, Measurement("t", [1.0]), gbps=1500.0, pct_of_copy=75.0),
    ]
    return results.add_speedups(rows)


def test_rows_and_speedups():
    rows = sample_rows()
    for row in rows:
        assert all(k in row for k in results.ROW_KEYS)
    fused = rows[2]
    assert fused["speedup"] == {"eager": 2.0, "compile": 1.6}
    assert "speedup" not in rows[3] and rows[3]["error"].startswith("BackendCompilerFailed")
    assert "speedup" not in rows[4]  # the copy is the roofline, not a contender
    assert rows[6]["speedup"] == {"pytorch": 2.0}
    assert rows[0]["repeats"] == 1 and rows[0]["ms_min"] == 100.0


def test_json_round_trip_schema_and_csv(tmp_path):
    rows = sample_rows()
    rows[0]["gbps"] = float("nan")
    doc = results.document(dict(META, extra="kept"), rows)
    assert list(doc)[:7] == list(results.META_KEYS) and doc["extra"] == "kept"
    path = results.write_json(doc, tmp_path / "sub" / "r.json")
    loaded = results.load_json(path)
    assert loaded["rows"][0]["gbps"] is None and loaded["rows"][2]["speedup"]["eager"] == 2.0
    assert results.validate({"rows": [{"mode": "sideways"}]})  # problems reported
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="missing top-level key"):
        results.load_json(bad)
    csv_path = results.write_csv(rows, tmp_path / "r.csv")
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert list(table[0])[:len(results.ROW_KEYS)] == list(results.ROW_KEYS)
    assert table[2]["speedup_vs_eager"] == "2.0" and table[2]["speedup_vs_compile"] == "1.6"
    assert table[3]["ms"] == "" and table[3]["error"].startswith("BackendCompilerFailed")


def test_markdown_tables():
    table = results.markdown_table(["a", "bb"], [["x", "1"], ["yyy", "22"]], ["l", "r"])
    assert table.splitlines() == ["| a   | bb |", "|-----|---:|", "| x   |  1 |", "| yyy | 22 |"]
    text = results.format_tables(sample_rows(), META)
    assert "NVIDIA H100 80GB HBM3" in text and "### models" in text and "### kernels" in text
    assert "### blocks" not in text
    line = next(ln for ln in text.splitlines() if "| fusedres[triton]  " in ln and "resnet50" in ln)
    assert "5,120" in line and "2.00x" in line and "1.60x" in line
    assert "error: BackendCompilerFailed" in text
    assert results.fmt_num(0.012345) == "0.0123" and results.fmt_num(1234.6, 4) == "1,235"
    assert results.fmt_num(None) == "" and results.fmt_num(0) == "0"


def test_compare_changes_and_threshold(tmp_path):
    old = results.document(META, sample_rows())
    new = results.document(META, sample_rows(scale=1.10))  # eager and compile 10 % slower
    new["rows"][2]["ms"] = None
    new["rows"][2]["error"] = "RuntimeError: gone"
    text, regressions = results.compare(old, new, threshold_pct=5.0)
    assert "+10.0%" in text and "REGRESSION" in text
    assert {r["id"][3] for r in regressions} == {"eager", "compile", "fusedres[triton]"}
    assert next(r for r in regressions if r["id"][3] == "fusedres[triton]")["failed"]
    _, none = results.compare(old, new, threshold_pct=15.0)
    assert [r["id"][3] for r in none] == ["fusedres[triton]"]  # failing still counts
    _, unchecked = results.compare(old, new)
    assert unchecked == []
    old_path = results.write_json(old, tmp_path / "old.json")
    new_path = results.write_json(new, tmp_path / "new.json")
    assert cli.main(["--compare", str(old_path), "--against", str(new_path), "--fail-threshold", "5"]) == 1
    assert cli.main(["--compare", str(old_path), "--against", str(old_path), "--fail-threshold", "5"]) == 0
    assert cli.main(["--compare", str(old_path), "--against", str(new_path)]) == 0


# ---------------------------------------------------------------- CLI
def test_cli_parsing():
    args = cli.parse_args([])
    assert args.level == ("auto",) and args.compare is None and args.impl == ()
    cfg = cli.make_config(args)
    assert cfg.batch == 128 and cfg.dtypes == ("bf16",) and cfg.repeats == 10 and len(cfg.models) == 7
    quick = cli.make_config(cli.parse_args(["--quick"]))
    assert quick.models == ("resnet50",) and quick.repeats == 3
    args = cli.parse_args(["--level", "kernels,models", "--models", "resnet18,resnet50", "--batch", "64",
                           "--dtype", "bf16,fp16", "--memory-format", "both", "--impl", "eager,fusedres*",
                           "--repeats", "5", "--out", "/tmp/x", "--cuda-graphs"])
    cfg = cli.make_config(args)
    assert args.level == ("kernels", "models") and cfg.models == ("resnet18", "resnet50")
    assert cfg.batch == 64 and cfg.dtypes == ("bf16", "fp16") and cfg.repeats == 5 and cfg.cuda_graphs
    assert set(cfg.memory_formats) == {"channels_last", "contiguous"} and cfg.impls == ("eager", "fusedres*")
    assert cli.parse_args(["--demo-size", "4x3x32x32"]).demo_size == (4, 3, 32, 32)
    assert cfg.block_modes == ("fwd", "train") and cfg.model_modes == ("train", "infer")
    modes = cli.make_config(cli.parse_args(["--modes", "infer,train"]))
    assert modes.kernel_modes == ("infer",) and modes.block_modes == ("train", "infer")
    assert modes.model_modes == ("train", "infer")
    for bad in (["--dtype", "fp8"], ["--level", "everything"], ["--models", "vgg16"], ["--batch", "0"],
                ["--against", "new.json"], ["--fail-threshold", "5"], ["--demo-size", "2,1,8,8"]):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)
    assert cli.resolve_levels(("auto",), cuda=True) == ["kernels", "blocks", "models"]
    assert cli.resolve_levels(("auto",), cuda=False) == ["demo", "count"]
    assert cli.resolve_levels(("all", "demo", "kernels"), cuda=False) == ["kernels", "blocks", "models", "demo"]


def test_result_stem_and_environment():
    from fusedres.bench.env import environment, result_stem

    assert result_stem(dict(META, dirty=True)) == "20261123-104000_nvidia-h100-80gb-hbm3_0123456-dirty"
    assert result_stem(dict(META, levels=["kernels", "models"])).endswith("_0123456_kernels-models")
    assert result_stem({}) == "undated_unknown_nocommit"
    env = environment()
    assert all(k in env for k in results.META_KEYS) and env["torch"] == torch.__version__


def test_headline():
    lines = cli.headline(sample_rows())
    assert lines == ["resnet50 train bf16 batch 256: best fused fusedres[triton] 5120 img/s "
                     "(2.00x eager, 1.60x compile)"]


# ---------------------------------------------------------------- plots and progress
def test_plots(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from fusedres.bench import plots

    written = plots.write_plots(sample_rows(), tmp_path / "run")
    assert sorted(p.name for p in written) == ["run-kernels.png", "run-models.png"]
    assert all(p.stat().st_size > 1000 for p in written)
    messages = []
    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    assert plots.write_plots(sample_rows(), tmp_path / "none", log=messages.append) == []
    assert "matplotlib is not installed" in messages[0]


def test_plain_progress_lines(capsys):
    from fusedres.bench.progress import progress

    bar = progress(2, "models", use_tqdm=False)
    bar.set_description("resnet50 train")
    bar.update()
    bar.close()
    err = capsys.readouterr().err
    assert "models 1/2: resnet50 train" in err and "1/2 done" in err


# ---------------------------------------------------------------- level runners on CPU (numbers ignored)
def test_timed_pipeline_on_cpu(tmp_path, capsys):
    """Every level, the writers and --compare, exactly as on a GPU but with tiny shapes on the CPU."""
    cfg = Config(batch=2, dtypes=("fp32",), repeats=2, warmup=1, target_ms=0.1, max_iters=1,
                 kernel_specs=[kernels.KernelSpec("bn_act", "t", 8, 4, residual=True),
                               kernels.KernelSpec("dual_bn_act", "t", 8, 4)],
                 block_specs=[blocks.BlockSpec("bottleneck", 16, 4, 4, stride=2, downsample=True)],
                 block_modes=("fwd", "train", "infer"),
                 models=("resnet18",), model_modes=("train",), image_size=32, num_classes=10,
                 impls=("copy", "pytorch", "eager", "fusedres[reference]", "fusedres[triton]"))
    old = results.write_json(results.document(META, sample_rows()), tmp_path / "old.json")
    args = cli.parse_args(["--out", str(tmp_path / "out"), "--compare", str(old)])
    rc = cli.run_timed(args, ["kernels", "blocks", "models"], cfg=cfg, device="cpu",
                       timer_factory=lambda level: WallTimer())
    assert rc == 0
    [json_path] = (tmp_path / "out").glob("*.json")
    doc = results.load_json(json_path)
    assert doc["complete"] is True and doc["device"].startswith("cpu")
    by = {(r["level"], r["name"], r["mode"], r["impl"], r["dtype"]): r for r in doc["rows"]}
    assert all(r.get("error") is None for r in doc["rows"]), [r["error"] for r in doc["rows"] if r.get("error")]
    k = by[("kernels", "bn_act+add+relu t 8x4x4", "bwd", "fusedres[reference]", "fp32")]
    assert k["bytes"] == 8 * 2 * 8 * 4 * 4 * 4 and k["gbps"] > 0 and k["copy_gbps"] > 0 and "pytorch" in k["speedup"]
    modes = {m for (lv, _, m, _, _) in by if lv == "kernels"}
    assert modes == {"fwd", "bwd", "infer"}
    impls = {i for (lv, _, _, i, _) in by if lv == "kernels"}
    assert {"copy", "pytorch", "fusedres[reference]"} <= impls
    assert {m for (lv, _, m, _, _) in by if lv == "blocks"} == {"fwd", "train", "infer"}
    assert ("blocks", "Bottleneck+downsample 16x4x4->16x2x2", "train", "fusedres[reference]", "fp32") in by
    m = by[("models", "resnet18", "train", "fusedres[reference]", "fp32")]
    assert m["img_per_s"] == pytest.approx(2e3 / m["ms"]) and m["memory_format"] == "contiguous"
    assert by[("models", "resnet18", "train", "eager", "bf16")]["memory_format"] == "channels_last"
    stem = json_path.with_suffix("")
    assert stem.with_suffix(".csv").exists() and stem.with_suffix(".md").exists()
    out = capsys.readouterr().out
    assert "### kernels" in out and "### models" in out and "compare" in out and "rows compared" in out


# ---------------------------------------------------------------- the CPU demo
def test_demo_verdict_rules():
    assert max_diff(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])) == (2.0, 0.5)
    assert verdict(1e-4, 1e-3) == "ok"
    assert verdict(1e-1, 1e-3, rel_fused_truth=1e-5, rel_stock_truth=1e-1) == "ok*"
    assert verdict(1e-1, 1e-3, rel_fused_truth=1e-1, rel_stock_truth=1e-5) == "MISMATCH"
    assert verdict(1e-1, 1e-3) == "MISMATCH"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the demo is the no-GPU main job")
def test_main_without_gpu_runs_the_demo_end_to_end(tmp_path, capsys):
    rc = cli.main(["--level", "auto", "--demo-size", "4,3,32,32", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "backends: triton, reference" in out and "interpreter" in out
    assert "MISMATCH" not in out and "every comparison passes" in out
    assert "No CUDA GPU here, so no timings" in out and "kernels, blocks, models" in out
    [path] = tmp_path.glob("demo_*.json")
    demo = json.loads(path.read_text())["demo"]
    assert demo["ok"] and {r["dtype"] for r in demo["rows"]} == {"float64", "float32"}
    assert {r["backend"] for r in demo["rows"]} == {"triton", "reference"}
    assert not list(tmp_path.glob("*.csv"))  # no timings, no timing files
