"""The benchmark's pre-activation model rows (CPU side): preact_resnet164 / preact_resnet1001 are accepted by
--models (not in the default run), built stock and converted by the fused candidates, run at 32x32, and every
models / blocks row gets its peak memory against eager's (`peak_mem_ratio`)."""
import torch

from fusedres import preact
from fusedres.bench import cli, models, results
from fusedres.bench.common import MODELS, Config
from fusedres.bench.timing import WallTimer


def test_preact_models_named_not_default():
    args = cli.parse_args(["--level", "models", "--models", "preact_resnet1001,resnet50"])
    assert cli.make_config(args).models == ("preact_resnet1001", "resnet50")
    assert cli.make_config(cli.parse_args(["--models", "all"])).models == MODELS
    assert not any(m.startswith("preact") for m in Config().models)


def test_build_preact_model_stock_and_cifar_size():
    with torch.device("meta"):
        model = models.build_model("preact_resnet1001", num_classes=10)
    assert type(model) is preact.PreActResNet and type(model.layer1[0]) is preact.PreActBottleneck
    assert sum(isinstance(m, preact.PreActBottleneck) for m in model.modules()) == 333
    cfg = Config(image_size=224)
    assert models.image_size_for("preact_resnet1001", cfg) == 32 and models.image_size_for("resnet50", cfg) == 224


def test_memory_ratio_against_eager():
    def row(impl, peak, dtype="bf16"):
        r = results.make_row("models", "preact_resnet1001", "train", impl, dtype, "channels_last", 128)
        r.update(ms=10.0, peak_mem_bytes=peak)
        return r

    rows = [row("eager", 4000), row("fusedres[triton]", 3000), row("fusedres[cuda]", None),
            row("eager", 9000, "fp32"), row("fusedres[triton]", 8100, "fp32")]
    results.add_speedups(rows)
    assert rows[0]["peak_mem_ratio"] == {"eager": 1.0} and rows[1]["peak_mem_ratio"] == {"eager": 0.75}
    assert "peak_mem_ratio" not in rows[2] and rows[4]["peak_mem_ratio"] == {"eager": 0.9}
    table = results.format_tables(rows)
    assert "mem vs eager" in table and "0.75x" in table
    assert results.validate(results.document({k: "x" for k in results.META_KEYS}, rows)) == []


def test_models_level_runs_preact_on_cpu(monkeypatch):
    """The models level end to end on the CPU for a preact name (a depth-11 network stands in for ResNet-164 to
    keep the interpreter fast): eager and the fused reference backend both run at 32x32 with no error."""
    sizes = []
    monkeypatch.setattr(models, "build_model", lambda name, num_classes=1000: preact.preact_resnet_cifar(11, 10))
    real_candidate = models.candidate

    def spy(base, cand, mode, batch, cfg, device, image_size=None):
        sizes.append(image_size)
        return real_candidate(base, cand, mode, batch, cfg, device, image_size)

    monkeypatch.setattr(models, "candidate", spy)
    cfg = Config(batch=2, dtypes=("fp32",), repeats=1, warmup=1, target_ms=0.1, max_iters=1,
                 models=("preact_resnet164",), model_modes=("train",), image_size=64, num_classes=10,
                 impls=("eager", "fusedres[reference]"))
    rows = models.run(cfg, torch.device("cpu"), WallTimer())
    assert {(r["impl"], r["dtype"]) for r in rows} >= {("eager", "fp32"), ("fusedres[reference]", "fp32")}
    assert all(r.get("error") is None for r in rows), [r.get("error") for r in rows]
    assert sizes and set(sizes) == {32}


def test_conv_mode_candidates_planned_for_preact():
    """fusedres[triton]+conv / fusedres[reference]+conv (convert(mode="conv")) are planned for the pre-activation
    models, for a torchvision model only when --impl names a +conv impl, and the reference one is excluded by
    default like every reference candidate."""
    cfg = Config(dtypes=("bf16",))
    both = lambda d, f: ["triton", "reference"]  # noqa: E731
    impls = [c.impl for c in models.plan(cfg, "train", both, conv=models.conv_mode_for("preact_resnet1001", cfg))]
    assert "fusedres[triton]+conv" in impls and "fusedres[reference]+conv" not in impls
    assert not models.conv_mode_for("resnet50", cfg)
    asked = Config(dtypes=("bf16",), impls=("eager", "fusedres[triton]+conv"))
    assert models.conv_mode_for("resnet50", asked)
    assert {c.impl for c in models.plan(asked, "train", both, conv=True)} == {"eager", "fusedres[triton]+conv"}
    assert all(c.conv_mode == c.impl.endswith("+conv") for c in models.plan(cfg, "train", both, conv=True))
    compiled = Config(dtypes=("bf16",), impls=("fusedres[triton]+conv*",))  # conv mode under torch.compile
    plan = {c.impl: c for c in models.plan(compiled, "train", both, conv=True)}
    assert set(plan) == {"fusedres[triton]+conv", "fusedres[triton]+conv+compile"}
    assert plan["fusedres[triton]+conv+compile"].conv_mode and plan["fusedres[triton]+conv+compile"].compile_mode


def test_models_level_runs_preact_conv_mode_on_cpu(monkeypatch):
    """A conv-mode candidate end to end on the CPU (reference backend, a depth-11 stand-in): its model is built
    with convert(mode="conv") and the train and infer rows carry no error."""
    from fusedres.nn.preact_conv import ConvPreActBottleneck

    monkeypatch.setattr(models, "build_model", lambda name, num_classes=1000: preact.preact_resnet_cifar(11, 10))
    built = []
    real_convert = models.convert_model

    def spy(model, convert=None):
        out = real_convert(model, convert)
        built.append(type(out.layer1[0]))
        return out

    monkeypatch.setattr(models, "convert_model", spy)
    cfg = Config(batch=2, dtypes=("fp32",), repeats=1, warmup=1, target_ms=0.1, max_iters=1,
                 models=("preact_resnet164",), model_modes=("train", "infer"), num_classes=10,
                 impls=("eager", "fusedres[reference]+conv"))
    rows = models.run(cfg, torch.device("cpu"), WallTimer())
    assert {(r["impl"], r["mode"]) for r in rows} == {(i, m) for i in cfg.impls for m in cfg.model_modes}
    assert all(r.get("error") is None for r in rows), [r.get("error") for r in rows]
    assert built and set(built) == {ConvPreActBottleneck}
