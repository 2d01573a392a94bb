"""How many distinct Triton compilations a ResNet-50 training run asks for, counted on the CPU with
`fusedres.triton.plan.Plan` (kernels record their launch specialisation instead of running; the conv launcher
acts as on an sm_90 GPU). A run: a training step (forward + backward) on a full batch and on a partial last
batch, then eval on a full and a partial batch, channels_last, bf16 autocast. Bounds from issue 12: at most 40
compilations with conv autotuning off, at most 120 with it on (docs/kernels.md states the measured counts).

Small images stand in for 224x224 ones: the conv kernel does not specialise on spatial sizes or the batch
(`do_not_specialize`), its tune key has no batch term, and ResNet-50's channel counts (multiples of 16 except
the stem's 3) are the same at any resolution. Batch 16 stands in for 256 (both multiples of 16), 5 and 8 for
the partial batches."""
import pytest
import torch

import fusedres
from fusedres.triton.plan import Plan

TRAIN, PARTIAL, EVAL, PARTIAL_EVAL, SIZE = 16, 5, 16, 8, 64
BOUNDS = {False: 40, True: 120}


def _run(mode):
    torch.manual_seed(0)
    model = fusedres.convert(fusedres.models.resnet50(num_classes=10), mode=mode).to(
        memory_format=torch.channels_last)
    for batch in (TRAIN, PARTIAL):
        x = torch.randn(batch, 3, SIZE, SIZE).to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
    model.eval()
    with torch.no_grad():
        for batch in (EVAL, PARTIAL_EVAL):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(torch.randn(batch, 3, SIZE, SIZE).to(memory_format=torch.channels_last))


@pytest.mark.parametrize("mode,autotune", [("bn", False), ("conv", False), ("conv", True)],
                         ids=["bn", "conv-autotune_off", "conv-autotune_on"])
def test_resnet50_run_compilations(mode, autotune):
    """bn mode launches no conv kernel, so autotuning changes nothing there."""
    with Plan(major=9, autotune=autotune) as plan:
        _run(mode)
    n = plan.count()
    print(f"resnet50 {mode} mode, autotune {'on' if autotune else 'off'}: {n} compilations "
          f"({plan.count('_conv_kernel')} conv), {plan.launches} launches, {len(plan.tuned)} tune keys")
    assert plan.launches > 0
    if mode == "conv":
        assert plan.count("_conv_kernel") > 0
    assert n <= BOUNDS[autotune], n


def test_plan_counts_what_a_launch_specialises():
    """The record follows Triton's launch specialisation: same-shape launches compile once; a size that stops
    being a multiple of 16 is a new compilation for a specialised argument, not for a do_not_specialize one."""
    from fusedres.triton import conv_bn_act as tconv
    x = torch.randn(2, 16, 8, 8).to(memory_format=torch.channels_last)
    w = torch.randn(32, 16, 3, 3)
    run = lambda x: tconv.conv_bn_act(x, w, None, None, False, None, None, None, None, None, False,  # noqa: E731
                                      (1, 1), (1, 1), (1, 1), 1, True, False)
    with Plan(major=9, autotune=False) as plan:
        run(x)
        n = plan.count("_conv_kernel")
        run(torch.randn(2, 16, 8, 8))          # same shape: nothing new
        assert plan.count("_conv_kernel") == n
        run(torch.randn(3, 16, 7, 7))          # batch and spatial size are not specialised
        assert plan.count("_conv_kernel") == n
        run(torch.randn(2, 24, 8, 8)[:, :16])  # C_in 16 but a view: x is copied to a dense channels_last tensor
        assert plan.count("_conv_kernel") == n
    with Plan(major=9, autotune=True) as plan:
        run(x)
        assert plan.count("_conv_kernel") == len(tconv._candidates(9, plan.smem, x.dtype, 16, 32, 3, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tuning times kernels on a GPU")
def test_tune_ahead_of_training_gpu(tmp_path, monkeypatch):
    """fusedres.tune times each conv shape once, writes the winners to the cache file, leaves the model's state
    as it was, and a second call (or a partial batch) times nothing."""
    from fusedres.triton import conv_bn_act as tconv
    monkeypatch.setenv("FUSEDRES_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FUSEDRES_CONV_AUTOTUNE", "1")
    monkeypatch.setattr(tconv, "_WINNERS", {})
    monkeypatch.setattr(tconv, "_LOADED", set())
    model = fusedres.convert(fusedres.models.resnet18(num_classes=10), mode="conv").cuda().to(
        memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    keys = fusedres.tune(model, x, autocast_dtype=torch.bfloat16)
    assert keys and (tmp_path / "conv_autotune.json").exists()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    assert fusedres.tune(model, x[:3], autocast_dtype=torch.bfloat16) == []
