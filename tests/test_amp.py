"""Mixed precision: under torch.autocast (fp16, bf16) a converted ResNet gets and returns the dtypes stock does,
keeps its BatchNorm statistics in float32, is as close to a float64 run as stock is (within 2x stock's own
error), and trains with GradScaler."""
import copy

import pytest
import torch

import fusedres
from helpers import mixed_resnet
from model_compare import assert_like_stock

AMP_DTYPES = [torch.bfloat16, torch.float16]


def _models(device, mode="bn"):
    """A tiny torchvision ResNet with both block kinds and both shortcut kinds; 32x32 inputs keep every feature
    map at least 2x2 (torch 2.14.1's CPU bf16 conv weight-gradient gave sporadic garbage, ~1e17, on 1x1 maps
    in stock and fused models alike)."""
    stock = mixed_resnet().to(device)
    return stock, fusedres.convert(copy.deepcopy(stock), mode=mode), copy.deepcopy(stock).double()


def _dtype_trace(model, names):
    """Output dtype of each named submodule during the next forward."""
    seen, handles = {}, []
    for name in names:
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.dtype)))
    return seen, handles


@pytest.mark.parametrize("mode", ["bn", "conv"])
@pytest.mark.parametrize("dtype", AMP_DTYPES)
def test_autocast_dtypes_and_accuracy(device, dtype, mode):
    """bn mode (fused BN ops after stock convs) and conv mode (the Triton conv_bn_act runs in the autocast
    dtype, as F.conv2d does)."""
    stock, fused, ref = _models(device, mode)
    names = ["conv1", "maxpool", "layer1", "layer2.0", "layer3", "layer4", "avgpool", "fc"]
    x = torch.randn(8, 3, 32, 32, device=device)
    bn_truth = copy.deepcopy(stock.bn1).double()
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        conv_out = stock.conv1(x)
    traces = []
    for model in (stock, fused):
        seen, handles = _dtype_trace(model, names)
        with torch.autocast(device, dtype=dtype):
            out = model(x)
        for h in handles:
            h.remove()
        traces.append((seen, out))
    (seen_s, ys), (seen_f, yf) = traces
    assert seen_f == seen_s and yf.dtype == ys.dtype, (seen_f, seen_s)
    assert seen_f["layer1"] == dtype  # the fused block ran in the autocast dtype, like stock
    for (name, b), c in zip(fused.named_buffers(), stock.buffers()):
        assert b.dtype == c.dtype, name  # running statistics stay float32
        if b.is_floating_point():
            assert b.dtype == torch.float32
    # the stem BN saw the very same conv output in both: its statistics, against float64 statistics of that
    # output, within 2x stock's own error
    bn_truth.train()(conv_out.double())
    for name in ("running_mean", "running_var"):
        assert_like_stock(getattr(fused.bn1, name), getattr(stock.bn1, name), getattr(bn_truth, name),
                          f"{dtype} autocast stem {name}")
    # the model output (in `dtype`) against a float64 run, norm-wise, within 2x stock's own error + 1 eps of
    # `dtype`: the eps covers rounding the exact result to `dtype` (0.2 eps norm-wise here); stock's error is
    # ~2 eps, far from exact, so the usual 8 eps would swamp it. Measured, seeds 0-3, bn / conv mode:
    # bf16 stock 9.2e-3..1.6e-2, fused 1.2e-2..2.0e-2 / 1.4e-2..1.9e-2 (at most 1.5x stock's);
    # fp16 stock 1.4e-3..2.6e-3, fused 1.2e-3..2.7e-3 / 1.1e-3..2.3e-3 (at most 1.3x). The former bound,
    # max-abs err_f <= 1.5 err_s + 1e-3, judged one element and failed bf16 bn mode at seed 3.
    yd = ref(x.double())
    assert_like_stock(yf, ys, yd, f"{dtype} autocast {mode} mode output", ulps=1)


@pytest.mark.parametrize("dtype", AMP_DTYPES)
def test_grad_scaler_training(device, dtype):
    """Three autocast + GradScaler SGD steps: same loss-scale decisions as stock; gradients (first step) and
    parameters (after the last) no further from a float64 run than stock's are."""
    stock, fused, ref = _models(device)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (stock, fused, ref)]
    scalers = [torch.amp.GradScaler(device, init_scale=2.0 ** 10) for _ in range(2)]
    for step in range(3):
        x = torch.randn(8, 3, 32, 32, device=device)
        target = torch.randint(0, 5, (8,), device=device)
        for model, opt, scaler in zip((stock, fused), opts, scalers):
            opt.zero_grad()
            with torch.autocast(device, dtype=dtype):
                loss = torch.nn.functional.cross_entropy(model(x), target)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opts[2].zero_grad()
        torch.nn.functional.cross_entropy(ref(x.double()), target).backward()
        if step == 0:  # first step: all three start from the same weights
            scale = scalers[0].get_scale()
            for (name, p), q, r in zip(fused.named_parameters(), stock.parameters(), ref.parameters()):
                err_f = (p.grad.double() / scale - r.grad).abs().max().item()
                err_s = (q.grad.double() / scale - r.grad).abs().max().item()
                assert err_f <= 2 * err_s + 2e-3 * r.grad.abs().max().item() + 1e-6, (name, err_f, err_s)
        opts[2].step()
    assert scalers[1].get_scale() == scalers[0].get_scale()
    for (name, p), q, r in zip(fused.named_parameters(), stock.parameters(), ref.parameters()):
        assert p.dtype == torch.float32 and torch.isfinite(p).all(), name
        err_f, err_s = (p.double() - r).abs().max().item(), (q.double() - r).abs().max().item()
        assert err_f <= 2 * err_s + 1e-3 * r.abs().max().item(), (name, err_f, err_s)


@pytest.mark.parametrize("dtype", AMP_DTYPES)
def test_folded_model_under_autocast(device, dtype):
    """A folded (inference) model under autocast: every conv_bn_act, the stem's included, runs in the autocast
    dtype like stock's convs, and the output is no further from float64 than stock's."""
    stock = mixed_resnet(randomise_running_stats=True).to(device).eval()
    folded = fusedres.fold(stock)
    ref = copy.deepcopy(stock).double()
    x = torch.randn(4, 3, 32, 32, device=device)
    seen = {}
    folded.conv1.register_forward_hook(lambda m, i, o: seen.__setitem__("conv1", o.dtype))
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        ys, yf = stock(x), folded(x)
    assert seen["conv1"] == dtype and yf.dtype == ys.dtype
    with torch.no_grad():
        yd = ref(x.double())
    err_s = (ys.double() - yd).abs().max().item()
    err_f = (yf.double() - yd).abs().max().item()
    # Triton 3.8's interpreter converts float32 to bfloat16 by truncation, not round-to-nearest (measured: half
    # of 4096 random values differ from torch's cast, twice the mean error), and every folded layer stores
    # bf16: under the interpreter folded bf16 is 2-4x stock's error (4 seeds); compiled kernels round to nearest
    factor = 5.0 if device == "cpu" and dtype == torch.bfloat16 else 1.5
    assert err_f <= factor * err_s + 1e-3, (err_f, err_s)
