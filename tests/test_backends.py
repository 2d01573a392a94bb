"""The dispatcher: automatic choice, forcing, refusal reasons; and the backends' primitives cross-checked."""
import pytest
import torch

import fusedres
from fusedres import backends
from helpers import activation, backend_names, channel_params


def test_automatic_choice_prefers_kernels(device):
    x = torch.randn(2, 3, 4, 4, device=device)
    names = fusedres.available_backends(x)
    assert names[-1] == "reference"
    assert backends.select(x) is backends.load(names[0])
    if device == "cpu":  # tests run Triton under its interpreter on CPU tensors
        assert names[0] == "triton"


def test_force_with_context_manager_and_env(device, monkeypatch):
    x = torch.randn(2, 3, 4, 4, device=device)
    with fusedres.use_backend("reference"):
        assert backends.select(x) is backends.load("reference")
        with fusedres.use_backend(None):
            assert backends.select(x) is backends.load(fusedres.available_backends(x)[0])
    monkeypatch.setenv("FUSEDRES_BACKEND", "reference")
    assert backends.select(x) is backends.load("reference")
    monkeypatch.setenv("FUSEDRES_BACKEND", "auto")
    assert backends.select(x) is backends.load(fusedres.available_backends(x)[0])


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown fusedres backend 'cudnn'"):
        with fusedres.use_backend("cudnn"):
            pass


def test_forced_backend_that_refuses_raises_with_reason(monkeypatch):
    from fusedres.triton import bn_act as tbn
    monkeypatch.setattr(tbn, "_INTERPRET", False)
    x = torch.randn(2, 3, 4, 4)
    reasons = fusedres.not_supported_reasons("triton", x)
    assert any("Triton interpreter is off" in r for r in reasons)
    assert "triton" not in fusedres.available_backends(x)
    with fusedres.use_backend("triton"), pytest.raises(backends.BackendUnavailable, match="interpreter is off"):
        fusedres.bn_act(x, None, None, training=True)


def test_missing_backend_reason():
    x = torch.randn(2, 3, 4, 4)
    if backends.load("cuda") is None:
        assert fusedres.not_supported_reasons("cuda", x) == ["the cuda backend is not available in this installation"]
    else:
        assert fusedres.not_supported_reasons("cuda", x)  # CPU tensors never run on the CUDA backend


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_primitives_agree_across_backends(device, channels_last, small_tiles):
    """Every backend's four primitives against the reference backend, on the dual (xb) and residual paths."""
    shape = (3, 6, 5, 3)
    x = activation(shape, torch.float32, device, channels_last, offset=5.0, scale=3.0)
    xb = activation(shape, torch.float32, device, channels_last)
    dy = activation(shape, torch.float32, device, channels_last)
    ref = backends.load("reference")
    mean, var = ref.batch_stats(x)
    mean_b, var_b = ref.batch_stats(xb)
    (w, b, _, _), (wb, bb, _, _) = channel_params(6, device), channel_params(6, device)
    scale, scale_b = w * torch.rsqrt(var + 1e-5), wb * torch.rsqrt(var_b + 1e-5)
    k = [torch.randn(6, device=device) for _ in range(6)]
    cases = {
        "dual": (None, xb, mean_b, scale_b, bb),
        "residual": (xb, None, None, None, None),
    }
    for name in backend_names(device):
        be = backends.load(name)
        for a, b_ in zip(be.batch_stats(x), (mean, var)):
            torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)
        for case, (res, second, m_b, s_b, t_b) in cases.items():
            args = (x, mean, scale, b, res, second, m_b, s_b, t_b, True)
            torch.testing.assert_close(be.apply(*args), ref.apply(*args), rtol=1e-6, atol=1e-6, msg=case)
            got = be.backward_reduce(dy, *args, res is not None)
            want = ref.backward_reduce(dy, *args, res is not None)
            for g, w_ in zip(got, want):
                assert (g is None) == (w_ is None)
                if g is not None:
                    torch.testing.assert_close(g, w_, rtol=1e-5, atol=1e-5, msg=case)
            kb = k[3:] if second is not None else (None, None, None)
            got = be.backward_apply(dy, *args, *k[:3], *kb)
            want = ref.backward_apply(dy, *args, *k[:3], *kb)
            for g, w_ in zip(got, want):
                assert (g is None) == (w_ is None)
                if g is not None:
                    torch.testing.assert_close(g, w_, rtol=1e-5, atol=1e-5, msg=case)


def test_forced_backend_reaches_backward_threads(device):
    """use_backend is process-wide: autograd's worker threads (CUDA backward) see the forced choice."""
    import threading
    seen = []
    with fusedres.use_backend("reference"):
        t = threading.Thread(target=lambda: seen.append(backends.forced_backend()))
        t.start()
        t.join()
    assert seen == ["reference"]
