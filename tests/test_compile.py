"""torch.compile(fullgraph=True) of converted ResNets: training steps and the eval forward trace as one graph
(no graph breaks) and compute what stock computes, in bn mode and conv mode (single-pass convolutions), NCHW and
channels_last.

The comparison runs in float64, where rounding cannot hide a wrong graph: two SGD steps of this tiny network
amplify rounding about 1e4-fold (float32 runs of stock and fused land 1e-5..1e-3 from float64, and which of the
two is closer depends on the seed and on the CPU's BatchNorm accumulating in double), so a float32 comparison
can only be loose or flaky. In float64 the same amplification leaves about 1e-12; the bound below is 1e-9, and a
wrong graph (a lost residual, a stale statistic) is off by 1e-3 or more."""
import copy

import pytest
import torch

import fusedres
from helpers import mixed_resnet
from model_compare import assert_close

TOL = 1e-9


def _run(model, forward, xs, targets, x_eval):
    """Two momentum-SGD steps (forward through `forward`; backward and the step in eager), then an eval forward;
    returns {quantity: tensor}: the losses, every parameter, every floating buffer, the eval output."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, t in zip(xs, targets):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(forward(x), t)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    out = {"losses": torch.stack(losses)}
    out.update({f"param {n}": p.detach().clone() for n, p in model.named_parameters()})
    out.update({f"buffer {n}": b.clone() for n, b in model.named_buffers()})
    model.eval()
    with torch.no_grad():
        out["eval output"] = forward(x_eval)
    return out


@pytest.mark.parametrize("mode,channels_last", [("bn", False), ("conv", True)])
def test_compiled_training_and_eval_match_stock(on_test_device, mode, channels_last):
    torch._dynamo.reset()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    stock = mixed_resnet(randomise_running_stats=True).double().to(memory_format=fmt)
    eager = fusedres.convert(copy.deepcopy(stock), mode=mode)
    compiled_model = fusedres.convert(copy.deepcopy(stock), mode=mode)
    compiled = torch.compile(compiled_model, fullgraph=True)  # fullgraph: any graph break raises
    xs = [torch.randn(4, 3, 16, 16, dtype=torch.float64).contiguous(memory_format=fmt) for _ in range(2)]
    ts = [torch.randint(0, 5, (4,)) for _ in range(2)]
    x_eval = torch.randn(2, 3, 16, 16, dtype=torch.float64).contiguous(memory_format=fmt)

    expected = _run(stock, stock, xs, ts, x_eval)
    for name, model, forward in (("eager", eager, eager), ("compiled", compiled_model, compiled)):
        got = _run(model, forward, xs, ts, x_eval)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if key.endswith("num_batches_tracked"):
                assert torch.equal(got[key], value), f"{name} {key}"
            else:
                assert_close(got[key], value, TOL, f"{name} {key}")


def test_compiled_eval_has_no_graph_breaks(on_test_device):
    """torch._dynamo.explain on the eval forward of a converted model: one graph, zero breaks, and the graph
    calls the fused ops (not a decomposition of them)."""
    torch._dynamo.reset()
    model = fusedres.convert(mixed_resnet(randomise_running_stats=True)).eval()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 16, 16))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    code = "\n".join(g.code for g in explanation.graphs)
    assert "fusedres.bn_act_eval" in code and "fusedres.dual_bn_act_eval" in code
