"""scale_shift_act: act((x - mean) * scale + shift [+ residual | + second BN-apply]) with differentiable
per-channel vectors (the block tail of the conv training mode), against plain torch in float64."""
import pytest
import torch

from fusedres.ops.scale_shift_act import scale_shift_act
from helpers import assert_close, double_leaf, leaf


@pytest.fixture(autouse=True)
def _tiles(small_tiles, device):
    with torch.device(device):
        yield


def _torch(x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu):
    ch = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
    z = (x - ch(mean)) * ch(scale) + ch(shift)
    if residual is not None:
        z = z + residual
    if xb is not None and mean_b is None:
        z = z + xb * ch(scale_b)
    elif xb is not None:
        z = z + (xb - ch(mean_b)) * ch(scale_b) + ch(shift_b)
    return torch.relu(z) if relu else z


@pytest.mark.parametrize("mode", ["plain", "residual", "second", "weighted"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_torch(mode, relu, dtype, channels_last):
    shape = (2, 5, 3, 4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    act = lambda: torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)  # noqa: E731
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    vec = lambda: torch.randn(5, dtype=acc)  # noqa: E731
    t = dict(x=act(), mean=vec(), scale=vec(), shift=vec())
    if mode == "residual":
        t["residual"] = act()
    if mode == "second":
        t.update(xb=act(), mean_b=vec(), scale_b=vec(), shift_b=vec())
    if mode == "weighted":  # xb * scale_b: mean_b and shift_b absent
        t.update(xb=act(), scale_b=vec())
    leaves = {k: leaf(v) for k, v in t.items()}
    dleaves = {k: double_leaf(v) for k, v in t.items()}
    names = ["x", "mean", "scale", "shift", "residual", "xb", "mean_b", "scale_b", "shift_b"]
    y = scale_shift_act(*[leaves.get(n) for n in names], relu=relu)
    yd = _torch(*[dleaves.get(n) for n in names], relu)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    assert_close(y, yd, dtype, "y")
    g = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    y.backward(g)
    yd.backward(g.double())
    for k in t:
        assert_close(leaves[k].grad, dleaves[k].grad, torch.float32 if dtype == torch.float32 else dtype, k)


def test_opcheck():
    x = torch.randn(2, 5, 3, 4, requires_grad=True)
    v = [torch.randn(5, requires_grad=True) for _ in range(6)]
    xb = torch.randn(2, 5, 3, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.fusedres.scale_shift_act.default, (x, *v[:3], None, xb, *v[3:], True))
    torch.library.opcheck(torch.ops.fusedres.scale_shift_act.default,
                          (x, *v[:3], torch.randn(2, 5, 3, 4, requires_grad=True), None, None, None, None, True))
    torch.library.opcheck(torch.ops.fusedres.scale_shift_act.default, (x, *v[:3], None, xb, None, v[4], None, True))
