"""benchmarks/conv_bn_act.py: the ResNet-50 layer table and the harness end to end on tiny CPU shapes."""
import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "conv_bn_act.py"


def _load():
    spec = importlib.util.spec_from_file_location("conv_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_resnet50_layer_table():
    bench = _load()
    layers = bench.resnet50_layers()
    assert len(layers) == 1 + 4 * 5 + 3
    stem = layers[0]
    assert (stem.out_size, stem.flops(1)) == (112, 2 * 112 * 112 * 64 * 3 * 49)
    assert {l.out_size for l in layers if l.name.startswith("layer4")} == {7, 14}


def test_smoke_run_writes_results(tmp_path):
    bench = _load()
    assert bench.main(["--smoke", "--stats", "--layers", "layer1.0.conv3", "--out", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    impls = {r["impl"] for r in data["rows"]}
    assert impls == {"cudnn+eager", "fused", "cudnn conv+var_mean", "fused conv+stats"}
    assert all(r["max_rel_err"] < 1e-4 for r in data["rows"] if r["impl"] == "fused")
    assert next(tmp_path.glob("*.md")).read_text().startswith("# conv_bn_act benchmark")
