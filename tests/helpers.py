"""Shared test helpers: input factories, float64 references, per-dtype tolerances, backend parametrisation."""
import pytest
import torch

from fusedres import backends

# (rtol, atol) per dtype, against a float64 reference on the same (rounded) inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (1e-2, 2e-2),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backend_names(device):
    """Backends that can run on `device` here (cuda only where the extension is built and a GPU exists)."""
    probe = torch.empty(1, 1, 1, 1, device=device)
    return [name for name in backends.BACKENDS if not backends.not_supported_reasons(name, probe)]


def assert_close(actual, expected, dtype, what=""):
    """Compare with the dtype's tolerances; atol scales with the reference's magnitude."""
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


def activation(shape, dtype, device, channels_last, offset=0.0, scale=1.0):
    x = torch.randn(shape, dtype=torch.float64, device=device) * scale + offset
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def channel_params(c, device, dtype=torch.float32):
    """weight, bias, running_mean, running_var — random, never trivial."""
    weight = (torch.rand(c, device=device, dtype=dtype) + 0.5) * torch.sign(torch.randn(c, device=device, dtype=dtype))
    bias = torch.randn(c, device=device, dtype=dtype)
    running_mean = torch.randn(c, device=device, dtype=dtype) * 0.1
    running_var = torch.rand(c, device=device, dtype=dtype) + 0.5
    return weight, bias, running_mean, running_var


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def double_leaf(t):
    return t.detach().double().requires_grad_(True)


@pytest.fixture
def on_test_device(device):
    """Every tensor and module created in the test on the test device (the GPU where there is one, with TF32
    off so float32 references are exact; else the CPU, where Triton runs in its interpreter)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.device(device):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture
def small_tiles(monkeypatch):
    """Shrink the Triton tiles so tiny shapes span several tiles, programs and masked tails."""
    from fusedres.triton import bn_act as tbn
    monkeypatch.setattr(tbn, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(tbn, "FLAT_BLOCK", 64)


def tiny_resnet(width=8, num_classes=4):
    """A torchvision ResNet with few channels for 8x8 inputs: 3x3 stem, one BasicBlock, one downsampling
    BasicBlock (the dual_bn_act tail), average pool, linear head."""
    from torch import nn
    from torchvision.models import resnet as tv

    model = tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.maxpool = nn.Identity()
    model.layer1 = model._make_layer(tv.BasicBlock, width, 1)
    model.layer2 = model._make_layer(tv.BasicBlock, 2 * width, 1, stride=2)
    model.layer3 = nn.Identity()
    model.layer4 = nn.Identity()
    model.fc = nn.Linear(2 * width, num_classes)
    return model


def mixed_resnet(randomise_running_stats=False):
    """A torchvision ResNet (stock forward, 7x7 stem) with tiny layers: both block kinds, identity and projection
    shortcuts, stride 2, odd channel counts; BN affine (and optionally running) tensors randomised."""
    import torchvision
    from torch import nn
    from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

    m = torchvision.models.resnet18(num_classes=5)
    m.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
    m.bn1 = nn.BatchNorm2d(8)
    m.layer1 = nn.Sequential(BasicBlock(8, 8))
    m.layer2 = nn.Sequential(BasicBlock(8, 12, 2, downsample=nn.Sequential(conv1x1(8, 12, 2), nn.BatchNorm2d(12))))
    m.layer3 = nn.Sequential(Bottleneck(12, 5, 2, downsample=nn.Sequential(conv1x1(12, 20, 2), nn.BatchNorm2d(20))))
    m.layer4 = nn.Sequential(Bottleneck(20, 5))
    m.fc = nn.Linear(20, 5)
    return randomise_bns(m, randomise_running_stats)


@torch.no_grad()
def randomise_bns(model, running_stats=True):
    """Non-trivial BN weights and biases (and running statistics) so BN folding and fusion are exercised."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            if running_stats:
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
            mod.weight.uniform_(0.5, 1.5)
            mod.bias.normal_(0, 0.2)
    return model


def aten_ops_seen(fn) -> list[str]:
    """The aten op names (overload packets) fn dispatches, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


def train_bf16_autocast(model, xs, targets):
    """SGD steps (momentum) of model under CPU bf16 autocast, one per (x, target): the outputs, the parameter
    gradients of each step and the final state_dict."""
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outs, grads = [], []
    for x, t in zip(xs, targets):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        F.cross_entropy(out.float(), t).backward()
        outs.append(out.detach())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        opt.step()
    return outs, grads, model.state_dict()
